"""The Python face of the subnet-to-host table (lookups on the packet path are in table.pxd)."""

import collections
import ipaddress
import os
import socket
import stat
import struct

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap

from fastpath.system cimport pf_store, pf_store_release

# Largest table we allocate (128 MiB). flannel allows SubnetLen up to 30, so a /8 Network needs
# 2**22 entries; anything past 2**24 is a mistake, not a cluster.
MAX_SUBNETS = 1 << 24

# The memfd starts with a header page: magic, network, SubnetLen, size (an IPv6 table: its magic,
# the network's high and low halves, SubnetLen, size). A table handed over from an earlier run is
# adopted only when they all match this run's.
cdef enum:
    HEADER_BYTES = 4096
MAGIC = 0x70666C726F757465  # "pflroute"
MAGIC6 = 0x70666C726F757436  # "pflrout6"
LOW64 = (1 << 64) - 1


def kept_layout(int fd):
    """(Network, SubnetLen) of the table an earlier run left in memfd `fd`, or None."""
    try:
        words = struct.unpack("=5Q", os.pread(fd, 40, 0))
    except (OSError, struct.error):
        return None
    if words[0] == MAGIC and 0 < words[2] <= 32:
        return ipaddress.IPv4Network((words[1], words[2] - (words[3].bit_length() - 1))), words[2]
    if words[0] == MAGIC6 and 0 < words[3] <= 128:
        return ipaddress.IPv6Network(((words[1] << 64) | words[2],
                                      words[3] - (words[4].bit_length() - 1))), words[3]
    return None


cdef class Peers6:
    """The IPv6 addresses of the peers an outer-IPv6 fast path sends to, each at an index that
    route entries name (in their 32 address bits): one array, shared by the fast path's tables
    and read by the loops without a lock. An address is written before the first entry that
    names it is published, and keeps its index while any entry names it. A freed index is
    taken again only once every other free index has been (never-used ones first, then the
    freed in the order they were freed), so a loop that loaded an entry just before it changed
    still finds that entry's peer at its index."""

    def __cinit__(self):
        self.addrs = <uint8_t *>calloc(MAX_PEERS6, 16)  # untouched pages cost nothing
        if self.addrs == NULL:
            raise MemoryError("cannot allocate the IPv6 peers' addresses")
        self.index_of = {}
        self.refs = {}
        self.freed = collections.deque()
        self.fresh = 0

    def __dealloc__(self):
        free(self.addrs)

    cdef uint32_t acquire(self, bytes address) except? 0xFFFFFFFF:
        """The index of `address` (16 bytes), given one if it has none, counted once more."""
        cdef uint32_t index
        if address in self.index_of:
            index = self.index_of[address]
        else:
            if self.fresh < MAX_PEERS6:
                index = self.fresh
                self.fresh += 1
            elif self.freed:
                index = self.freed.popleft()
            else:
                raise ValueError(f"more than {MAX_PEERS6} IPv6 peers")
            memcpy(self.addrs + 16 * <size_t>index, <const char *>address, 16)
            self.index_of[address] = index
            self.refs[index] = 0
        self.refs[index] += 1
        return index

    cdef void release(self, uint32_t index):
        """One entry fewer names `index`; with none left it is free (its address stays, for a
        loop that still holds an old entry)."""
        left = self.refs.get(index, 0) - 1
        if left > 0:
            self.refs[index] = left
            return
        self.refs.pop(index, None)
        address = self.address(index)
        self.index_of.pop(ipaddress.IPv6Address(address).packed, None)
        self.freed.append(index)

    def address(self, uint32_t index) -> str:
        """The address at `index` (whatever was last written there)."""
        if index >= MAX_PEERS6:
            raise IndexError(index)
        return str(ipaddress.IPv6Address(bytes(self.addrs[16 * index:16 * index + 16])))

    def index(self, address):
        """The index `address` holds, or None."""
        return self.index_of.get(ipaddress.IPv6Address(address).packed)

    def __len__(self):
        """Peers with an index now."""
        return len(self.index_of)

    def free_order(self) -> list:
        """The freed indices in the order they will be taken again (after the never-used)."""
        return list(self.freed)


cdef class RouteTable:
    """Maps each subnet of `network` (cut into /subnet_len) to a peer's (IPv4, UDP port); the
    network is IPv4 (flannel's Network) or IPv6 (its IPv6Network), `version` says which.

    set() and delete() may be called from Python while the loops look entries up without a lock.
    With `fd`, a table that an earlier run left in that memfd is adopted (with its routes) when
    it is for the same Network and SubnetLen; otherwise, or without one, a new empty one is made.
    A regular file (a tmpfs one, where routes outlive the process) is made this table's when it
    does not hold one: the table lives in it from then on. The table owns the fd either way.
    """

    def __cinit__(self, network, int subnet_len, int fd=-1):
        self.fd = -1
        self.mapping = MAP_FAILED
        net = ipaddress.ip_network(network)
        bits = net.max_prefixlen
        if not net.prefixlen < subnet_len <= bits:
            raise ValueError(f"subnet length {subnet_len} must be in ({net.prefixlen}, {bits}] "
                             f"for {net}")
        size = 1 << (subnet_len - net.prefixlen)
        if size > MAX_SUBNETS:
            raise ValueError(f"{net} cut into /{subnet_len} gives {size} subnets, more than {MAX_SUBNETS}")
        base = int(net.network_address)
        if net.version == 4:
            header = (MAGIC, base, subnet_len, size)
        else:
            header = (MAGIC6, base >> 64, base & LOW64, subnet_len, size)
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
        if self.adopted and tuple([words[i] for i in range(len(header))]) != header:
            self.adopted = False
            for i in range(size):
                entries[i] = 0
        for i in range(len(header)):
            words[i] = header[i]
        self.network = net
        self.subnet_len = subnet_len
        self.version = net.version
        mask = int(net.netmask)
        if net.version == 4:
            self.table.entries = entries
            self.table.network = base
            self.table.netmask = mask
            self.table.shift = 32 - subnet_len
            self.table.size = size
        else:
            self.table6.entries = entries
            self.table6.network[0] = base >> 64
            self.table6.network[1] = base & LOW64
            self.table6.netmask[0] = mask >> 64
            self.table6.netmask[1] = mask & LOW64
            self.table6.shift = 128 - subnet_len
            self.table6.size = size

    def __dealloc__(self):
        if self.mapping != MAP_FAILED:
            munmap(self.mapping, self.mapping_bytes)
        if self.fd >= 0:
            os.close(self.fd)

    def __len__(self):
        return 1 << (self.subnet_len - self.network.prefixlen)

    cdef uint64_t *_entry(self, subnet) except NULL:
        sub = ipaddress.ip_network(subnet)
        if (sub.version != self.version or sub.prefixlen != self.subnet_len
                or not sub.subnet_of(self.network)):
            raise ValueError(f"{sub} is not a /{self.subnet_len} subnet of {self.network}")
        cdef uint64_t index = (int(sub.network_address) - int(self.network.network_address)) >> (
            self.network.max_prefixlen - self.subnet_len)
        return (self.table.entries if self.version == 4 else self.table6.entries) + index

    def carry_over_ipv6(self, Peers6 peers6):
        """Send over IPv6 from now on: the peers are IPv6 addresses in `peers6` (an empty
        table only: its entries then name indices there)."""
        if self.routes():
            raise ValueError("a table with routes cannot change its peers' family")
        self.peers6 = peers6

    def set(self, subnet, ip, int port):
        """Route `subnet` (e.g. "10.244.3.0/24", or "fd00:0:0:3::/64" in an IPv6 table) to UDP
        `port` at the IPv4 address `ip` (an IPv6 one once carry_over_ipv6() was called)."""
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is not in 1..65535")
        cdef uint64_t *slot = self._entry(subnet)
        cdef uint64_t addr
        cdef uint64_t old
        if self.peers6 is None:
            addr = int(ipaddress.IPv4Address(ip))
        else:
            addr = self.peers6.acquire(ipaddress.IPv6Address(ip).packed)
        cdef uint64_t entry = (
            (<uint64_t>1 << ENTRY_VALID_SHIFT) | (addr << ENTRY_ADDR_SHIFT) | <uint64_t>port
        )
        if self.peers6 is None:
            pf_store(slot, entry)
            return
        old = slot[0]
        pf_store_release(slot, entry)  # after acquire() wrote the address
        if old:
            self.peers6.release(<uint32_t>(old >> ENTRY_ADDR_SHIFT))

    def delete(self, subnet):
        """Forget the route to `subnet`; a subnet with no route is fine."""
        cdef uint64_t *slot = self._entry(subnet)
        cdef uint64_t old = slot[0]
        pf_store(slot, 0)
        if self.peers6 is not None and old:
            self.peers6.release(<uint32_t>(old >> ENTRY_ADDR_SHIFT))

    def routes(self) -> list:
        """Every route as (subnet, (ip, port)), in subnet order."""
        cdef uint64_t *entries = self.table.entries if self.version == 4 else self.table6.entries
        cdef uint64_t index
        cdef uint64_t entry
        found = []
        for index in range(len(self)):
            entry = entries[index]
            if entry:
                found.append((index, entry))
        base = int(self.network.network_address)
        shift = self.network.max_prefixlen - self.subnet_len
        return [
            (str(ipaddress.ip_network((base + (index << shift), self.subnet_len))),
             self._endpoint(entry))
            for index, entry in found
        ]

    def lookup(self, dst):
        """(ip, port) for destination address `dst`, or None: the loops' lookup, from Python."""
        cdef uint64_t entry
        cdef const uint8_t[:] packed
        if self.version == 4:
            entry = table_lookup(&self.table, int(ipaddress.IPv4Address(dst)))
        else:
            packed = ipaddress.IPv6Address(dst).packed
            entry = table_lookup6(&self.table6, &packed[0])
        return self._endpoint(entry) if entry else None

    def _endpoint(self, uint64_t entry) -> tuple:
        """The (ip, port) an entry packs (or names, over IPv6)."""
        cdef uint32_t addr = (entry >> ENTRY_ADDR_SHIFT) & 0xFFFFFFFF
        if self.peers6 is not None:
            return (self.peers6.address(addr), entry & 0xFFFF)
        return (socket.inet_ntoa(int(addr).to_bytes(4, "big")), entry & 0xFFFF)
