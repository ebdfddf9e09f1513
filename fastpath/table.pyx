"""The Python face of the subnet-to-host table (lookups on the packet path are in table.pxd)."""

import ipaddress
import os
import socket
import stat
import struct

from libc.stdint cimport uint32_t, uint64_t
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap

from fastpath.system cimport pf_store

# Largest table we allocate (128 MiB). flannel allows SubnetLen up to 30, so a /8 Network needs
# 2**22 entries; anything past 2**24 is a mistake, not a cluster.
MAX_SUBNETS = 1 << 24

# The memfd starts with a header page: magic, network, SubnetLen, size. A table handed over
# from an earlier run is adopted only when they all match this run's.
cdef enum:
    HEADER_BYTES = 4096
MAGIC = 0x70666C726F757465  # "pflroute"


def kept_layout(int fd):
    """(Network, SubnetLen) of the table an earlier run left in memfd `fd`, or None."""
    try:
        words = struct.unpack("=4Q", os.pread(fd, 32, 0))
    except (OSError, struct.error):
        return None
    if words[0] != MAGIC or not 0 < words[2] <= 32:
        return None
    network = ipaddress.IPv4Network((words[1], words[2] - (words[3].bit_length() - 1)))
    return network, words[2]


cdef class RouteTable:
    """Maps each subnet of `network` (cut into /subnet_len) to a peer's (IPv4, UDP port).

    set() and delete() may be called from Python while the loops look entries up without a lock.
    With `fd`, a table that an earlier run left in that memfd is adopted (with its routes) when
    it is for the same Network and SubnetLen; otherwise, or without one, a new empty one is made.
    A regular file (a tmpfs one, where routes outlive the process) is made this table's when it
    does not hold one: the table lives in it from then on. The table owns the fd either way.
    """

    def __cinit__(self, network, int subnet_len, int fd=-1):
        self.fd = -1
        self.mapping = MAP_FAILED
        net = ipaddress.IPv4Network(network)
        if not net.prefixlen < subnet_len <= 32:
            raise ValueError(f"subnet length {subnet_len} must be in ({net.prefixlen}, 32] for {net}")
        size = 1 << (subnet_len - net.prefixlen)
        if size > MAX_SUBNETS:
            raise ValueError(f"{net} cut into /{subnet_len} gives {size} subnets, more than {MAX_SUBNETS}")
        header = (MAGIC, int(net.network_address), subnet_len, size)
        self.mapping_bytes = HEADER_BYTES + size * sizeof(uint64_t)
        self.adopted = fd >= 0 and os.fstat(fd).st_size == self.mapping_bytes
        if fd >= 0 and not self.adopted and stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, 0)  # whatever it held goes: zero-filled again, no routes
            os.ftruncate(fd, self.mapping_bytes)
            self.adopted = True  # the header check below finds it empty
        if fd >= 0 and not self.adopted:
            os.close(fd)
        if not self.adopted:
            fd = os.memfd_create("pyflannel-routes", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.mapping_bytes)  # zero-filled: no routes
        self.fd = fd
        self.mapping = mmap(NULL, self.mapping_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if self.mapping == MAP_FAILED:
            raise MemoryError("cannot map the route table")
        cdef uint64_t *words = <uint64_t *>self.mapping
        cdef uint64_t *entries = words + HEADER_BYTES // sizeof(uint64_t)
        cdef size_t i
        if self.adopted and (words[0], words[1], words[2], words[3]) != header:
            self.adopted = False
            for i in range(size):
                entries[i] = 0
        for i in range(4):
            words[i] = header[i]
        self.table.entries = entries
        self.network = net
        self.subnet_len = subnet_len
        self.table.network = int(net.network_address)
        self.table.netmask = int(net.netmask)
        self.table.shift = 32 - subnet_len
        self.table.size = size

    def __dealloc__(self):
        if self.mapping != MAP_FAILED:
            munmap(self.mapping, self.mapping_bytes)
        if self.fd >= 0:
            os.close(self.fd)

    def __len__(self):
        return self.table.size

    cdef uint32_t _index(self, subnet) except? 0xFFFFFFFF:
        sub = ipaddress.IPv4Network(subnet)
        if sub.prefixlen != self.subnet_len or not sub.subnet_of(self.network):
            raise ValueError(f"{sub} is not a /{self.subnet_len} subnet of {self.network}")
        return (int(sub.network_address) - self.table.network) >> self.table.shift

    def set(self, subnet, ip, int port):
        """Route `subnet` (e.g. "10.244.3.0/24") to UDP `port` at `ip`."""
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is not in 1..65535")
        cdef uint64_t addr = int(ipaddress.IPv4Address(ip))
        cdef uint64_t entry = (
            (<uint64_t>1 << ENTRY_VALID_SHIFT) | (addr << ENTRY_ADDR_SHIFT) | <uint64_t>port
        )
        pf_store(&self.table.entries[self._index(subnet)], entry)

    def delete(self, subnet):
        """Forget the route to `subnet`; a subnet with no route is fine."""
        pf_store(&self.table.entries[self._index(subnet)], 0)

    def routes(self) -> list:
        """Every route as (subnet, (ip, port)), in subnet order."""
        cdef uint32_t index
        cdef uint64_t entry
        found = []
        for index in range(self.table.size):
            entry = self.table.entries[index]
            if entry:
                found.append((index, entry))
        prefix = f"/{self.subnet_len}"
        return [
            (str(ipaddress.IPv4Address(self.table.network + (index << self.table.shift))) + prefix,
             (socket.inet_ntoa(((entry >> ENTRY_ADDR_SHIFT) & 0xFFFFFFFF).to_bytes(4, "big")),
              entry & 0xFFFF))
            for index, entry in found
        ]

    def lookup(self, dst):
        """(ip, port) for destination address `dst`, or None: the loops' lookup, from Python."""
        cdef uint64_t entry = table_lookup(&self.table, int(ipaddress.IPv4Address(dst)))
        if entry == 0:
            return None
        return (
            socket.inet_ntoa(((entry >> ENTRY_ADDR_SHIFT) & 0xFFFFFFFF).to_bytes(4, "big")),
            entry & 0xFFFF,
        )
