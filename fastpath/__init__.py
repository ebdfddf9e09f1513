"""pyflannel's data plane: flanneld's udp backend, TUN <-> UDP, in Cython without the GIL."""

from fastpath.dataplane import DEFAULT_BATCH, DEFAULT_MTU, FastPath
from fastpath.table import RouteTable

__all__ = ["DEFAULT_BATCH", "DEFAULT_MTU", "FastPath", "RouteTable"]
