# The subnet-to-host table: one flat array of 64-bit entries, one per subnet of the Network, in
# a memfd (after a header that names the Network), so the next run can adopt it whole.
# The control plane writes entries with atomic stores; the loops read them with atomic loads.

from libc.stdint cimport uint32_t, uint64_t

from fastpath.system cimport pf_load

# An entry packs the peer's IPv4 address and UDP port (both host order) with a valid bit, so one
# 64-bit load gives a consistent (address, port) pair or zero for "no route".
cdef enum:
    ENTRY_VALID_SHIFT = 48
    ENTRY_ADDR_SHIFT = 16


cdef struct route_table_t:
    uint64_t *entries
    uint32_t network      # host order, already masked
    uint32_t netmask      # host order
    uint32_t shift        # 32 - SubnetLen
    uint32_t size         # number of subnets in the Network


cdef inline uint64_t table_lookup(const route_table_t *t, uint32_t dst) noexcept nogil:
    """The entry for dst (host order), or 0 when dst is outside the Network or has no route."""
    if (dst & t.netmask) != t.network:
        return 0
    return pf_load(&t.entries[(dst - t.network) >> t.shift])


cdef class RouteTable:
    cdef route_table_t table
    cdef readonly object network
    cdef readonly int subnet_len
    cdef readonly int fd          # the memfd holding the table: kept across a restart
    cdef readonly bint adopted    # whether it came from an earlier run
    cdef void *mapping
    cdef size_t mapping_bytes

    cdef uint32_t _index(self, subnet) except? 0xFFFFFFFF
