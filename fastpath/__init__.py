"""pyflannel's data plane: flanneld's udp backend, TUN <-> UDP, in Cython without the GIL."""

from fastpath.dataplane import DEFAULT_BATCH, FastPath
from fastpath.table import Peers6, RouteTable

__all__ = ["DEFAULT_BATCH", "FastPath", "Peers6", "RouteTable"]
