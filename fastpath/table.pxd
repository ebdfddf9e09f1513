# The subnet-to-host table: one flat array of 64-bit entries, one per subnet of the Network, in
# a memfd (after a header that names the Network), so the next run can adopt it whole.
# The control plane writes entries with atomic stores; the loops read them with atomic loads.
# An IPv6 Network (flannel's IPv6Network cut into IPv6SubnetLen subnets) gets a table of its own
# of the same entries: the subnet is the 128-bit address's bits between the two lengths.

from libc.stdint cimport uint8_t, uint32_t, uint64_t

from fastpath.system cimport pf_load

# An entry packs the peer's IPv4 address and UDP port (both host order) with a valid bit, so one
# 64-bit load gives a consistent (address, port) pair or zero for "no route". Over an IPv6
# underlay (outer IPv6) the 32 address bits are an index into the peers' IPv6 addresses
# (Peers6), written before the entry that names them is published.
cdef enum:
    ENTRY_VALID_SHIFT = 48
    ENTRY_ADDR_SHIFT = 16
    MAX_PEERS6 = 1 << 16   # outer IPv6 peers one fast path sends to (16 bytes each, 1 MiB)


cdef struct route_table_t:
    uint64_t *entries
    uint32_t network      # host order, already masked
    uint32_t netmask      # host order
    uint32_t shift        # 32 - SubnetLen
    uint32_t size         # number of subnets in the Network


# Host-order 128-bit addresses as two 64-bit halves: the high one first.
cdef struct route_table6_t:
    uint64_t *entries
    uint64_t network[2]   # already masked
    uint64_t netmask[2]
    uint32_t shift        # 128 - SubnetLen
    uint32_t size         # number of subnets in the Network; 0: no IPv6 Network, no routes


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline uint64_t pf_load64be(const uint8_t *p) {
        uint64_t v;
        memcpy(&v, p, 8);
        return __builtin_bswap64(v);
    }
    """
    uint64_t pf_load64be(const uint8_t *p) nogil


cdef inline uint64_t table_lookup6(const route_table6_t *t, const uint8_t *dst) noexcept nogil:
    """The entry for the 16-byte address at dst, or 0 when it is outside the IPv6 Network or has
    no route: the longest (the only) prefix that matches is its subnet's."""
    cdef uint64_t hi = pf_load64be(dst)
    cdef uint64_t lo = pf_load64be(dst + 8)
    if t.size == 0 or (hi & t.netmask[0]) != t.network[0] or (lo & t.netmask[1]) != t.network[1]:
        return 0
    hi &= ~t.netmask[0]
    lo &= ~t.netmask[1]
    cdef uint64_t index
    if t.shift >= 64:
        index = hi >> (t.shift - 64)
    elif t.shift == 0:
        index = lo  # /128 subnets: at most 2**24 of them, so the high half holds no subnet bits
    else:
        index = (hi << (64 - t.shift)) | (lo >> t.shift)
    return pf_load(&t.entries[index])


cdef inline uint64_t table_lookup(const route_table_t *t, uint32_t dst) noexcept nogil:
    """The entry for dst (host order), or 0 when dst is outside the Network or has no route."""
    if (dst & t.netmask) != t.network:
        return 0
    return pf_load(&t.entries[(dst - t.network) >> t.shift])


cdef class Peers6:
    cdef uint8_t *addrs           # MAX_PEERS6 addresses of 16 bytes (network order), by index
    cdef dict index_of            # address (16 bytes) -> its index
    cdef dict refs                # index -> entries that name it
    cdef object freed             # indices given back, the longest free first
    cdef uint32_t fresh           # the next index never used

    cdef uint32_t acquire(self, bytes address) except? 0xFFFFFFFF
    cdef void release(self, uint32_t index)


cdef class RouteTable:
    cdef route_table_t table      # the IPv4 Network's (version 4)
    cdef route_table6_t table6    # the IPv6 Network's (version 6)
    cdef readonly int version
    cdef readonly object network
    cdef readonly int subnet_len
    cdef readonly int fd          # the memfd holding the table: kept across a restart
    cdef readonly bint adopted    # whether it came from an earlier run
    cdef readonly Peers6 peers6   # outer IPv6: whose addresses the entries' indices name
    cdef void *mapping
    cdef size_t mapping_bytes

    cdef uint64_t *_entry(self, subnet) except NULL
