"""flannel's host-gw backend, as flanneld v0.20.2 sets it up: no device and no encapsulation;
each other host-gw lease becomes a route `<subnet> via <PublicIP> dev <external interface>`,
which the kernel accepts only when the peer is on the same network (one L2 hop away)."""

from __future__ import annotations

import errno
import ipaddress
import logging

from control.backend.common import BackendError, prune_routes_via_peers
from control.host.interface import ExternalInterface
from control.host.rtnl import RtNetlink
from control.subnet.config import NetworkConfig
from control.subnet.lease import PeerLease, encode_lease

log = logging.getLogger("pyflanneld.hostgw")


class HostGwBackend:
    kind = "host-gw"
    device = None

    def __init__(self, config: NetworkConfig, rtnl: RtNetlink, ext: ExternalInterface,
                 public_ip: ipaddress.IPv4Address) -> None:
        self._config = config
        self._rtnl = rtnl
        self._ext = ext
        self._public_ip = public_ip

    def prepare(self) -> None:
        if self._public_ip != self._ext.address:
            raise BackendError("your PublicIP differs from interface IP, meaning that probably "
                               "you're on a NAT, which is not supported by host-gw backend")

    def lease_value(self) -> bytes:
        return encode_lease(self._public_ip, self.kind)

    def start(self, subnet: ipaddress.IPv4Network) -> int:
        return self._ext.mtu  # nothing is added to the packets

    def move(self, old: ipaddress.IPv4Network, new: ipaddress.IPv4Network) -> None:
        """Nothing of this host is addressed from its subnet."""

    def add_peer(self, subnet: ipaddress.IPv4Network, lease: PeerLease,
                 old: PeerLease | None) -> bool:
        if lease.backend_type != self.kind:
            log.warning("ignoring non-host-gw subnet %s: type=%s", subnet, lease.backend_type)
            return False
        try:
            self._rtnl.replace_route(subnet, self._ext.index, gateway=lease.public_ip)
        except OSError as err:
            why = (" (not on the network of " + self._ext.name + ")"
                   if err.errno == errno.ENETUNREACH else "")
            log.error("cannot route %s via %s%s: %s", subnet, lease.public_ip, why, err)
            return False
        return True

    def remove_peer(self, subnet: ipaddress.IPv4Network, lease: PeerLease) -> None:
        try:
            self._rtnl.delete_route(subnet, self._ext.index, lease.public_ip)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ESRCH):
                log.error("deleting the route to %s: %s", subnet, err)

    def prune(self, peers: dict[ipaddress.IPv4Network, PeerLease]) -> None:
        """Routes into the Network via a gateway that no current lease explains (hosts that
        left while this daemon was not running)."""
        try:
            prune_routes_via_peers(self._rtnl, self._ext, self._config.network, peers)
        except OSError as err:
            log.error("removing stale routes from %s: %s", self._ext.name, err)

    def kept(self) -> dict[str, int]:
        return {}  # the kernel's devices and routes outlive the process by themselves

    def status(self) -> str:
        return f"host-gw on {self._ext.name}"

    def leave(self) -> None:
        """Nothing kept for a next run but the kernel's own state, as flanneld leaves it."""

    def stop(self) -> None:
        """The routes stay, as flanneld leaves them: a restart keeps forwarding."""
