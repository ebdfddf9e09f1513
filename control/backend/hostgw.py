"""flannel's host-gw backend, as flanneld v0.20.2 sets it up: no device and no encapsulation;
each other host-gw lease becomes a route `<subnet> via <PublicIP> dev <external interface>`,
which the kernel accepts only when the peer is on the same network (one L2 hop away), and in a
dual-stack network `<IPv6 subnet> via <PublicIPv6> dev <external interface>` too."""

from __future__ import annotations

import errno
import ipaddress
import logging

from control.backend.common import BackendError, prune_routes_via_peers, routes_via_peers
from control.host.interface import ExternalInterface
from control.host.rtnl import RtNetlink
from control.subnet.config import NetworkConfig
from control.subnet.lease import PeerLease, Subnets, encode_lease

log = logging.getLogger("pyflanneld.hostgw")


class HostGwBackend:
    kind = "host-gw"
    devices: tuple[str, ...] = ()

    def __init__(self, config: NetworkConfig, rtnl: RtNetlink, ext: ExternalInterface,
                 public_ip: ipaddress.IPv4Address | None,
                 public_ipv6: ipaddress.IPv6Address | None) -> None:
        self._config = config
        self._rtnl = rtnl
        self._ext = ext
        self._public_ip = public_ip
        self._public_ipv6 = public_ipv6

    def prepare(self) -> None:
        if self._config.enable_ipv4 and self._public_ip != self._ext.address:
            raise BackendError("your PublicIP differs from interface IP, meaning that probably "
                               "you're on a NAT, which is not supported by host-gw backend")

    def lease_value(self) -> bytes:
        return encode_lease(self._public_ip, self.kind, public_ipv6=self._public_ipv6)

    def start(self, subnet: Subnets) -> int:
        return self._ext.mtu  # nothing is added to the packets

    def move(self, old: Subnets, new: Subnets) -> None:
        """Nothing of this host is addressed from its subnet."""

    def _routes(self, subnet: Subnets, lease: PeerLease) -> list:
        """(subnet, gateway) of the peer's routes, of the families this network has."""
        config = self._config
        return [(destination, gateway) for destination, gateway in routes_via_peers(
            {subnet: lease}) if (config.enable_ipv4 if destination.version == 4
                                 else config.enable_ipv6)]

    def add_peer(self, subnet: Subnets, lease: PeerLease, old: PeerLease | None) -> bool:
        if lease.backend_type != self.kind:
            log.warning("ignoring non-host-gw subnet %s: type=%s", subnet, lease.backend_type)
            return False
        if self._config.enable_ipv6 and subnet.ipv6 is not None and lease.public_ipv6 is None:
            log.warning("lease %s has no PublicIPv6: its IPv6 subnet is not routed", subnet)
        routes = sorted(self._routes(subnet, lease), key=lambda route: route[0].version)
        if not routes:
            return False
        for destination, gateway in routes:
            try:
                self._rtnl.replace_route(destination, self._ext.index, gateway=gateway)
            except OSError as err:
                why = (" (not on the network of " + self._ext.name + ")"
                       if err.errno == errno.ENETUNREACH else "")
                log.error("cannot route %s via %s%s: %s", destination, gateway, why, err)
                return False
        return True

    def remove_peer(self, subnet: Subnets, lease: PeerLease) -> None:
        for destination, gateway in self._routes(subnet, lease):
            try:
                self._rtnl.delete_route(destination, self._ext.index, gateway)
            except OSError as err:
                if err.errno not in (errno.ENOENT, errno.ESRCH):
                    log.error("deleting the route to %s: %s", destination, err)

    def prune(self, peers: dict[Subnets, PeerLease]) -> None:
        """Routes into the Network via a gateway that no current lease explains (hosts that
        left while this daemon was not running)."""
        try:
            prune_routes_via_peers(self._rtnl, self._ext, self._config, peers)
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
