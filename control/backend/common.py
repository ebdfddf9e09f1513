"""The backends behind one interface, as flannel's pkg/backend splits them from the lease policy:
the daemon and the watch never ask which one runs. manager.py chooses one by name.

A backend's life: `prepare` (before the lease: what the lease value needs, such as the vxlan
device whose MAC it carries), `lease_value`, `start` on the leased subnet (returns the MTU for
subnet.env), then `add_peer`/`remove_peer` for every other host's lease and `prune` after each
full listing, `move` if this host's subnet changes, and `stop`. `kept` names the descriptors the
next run should go on with (control/service/handover.py).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Protocol

from control.host.interface import ExternalInterface
from control.host.rtnl import RtNetlink
from control.subnet.config import NetworkConfig
from control.subnet.lease import PeerLease, Subnets

log = logging.getLogger("pyflanneld.backend")


class BackendError(Exception):
    """The backend cannot run with this config on this host; retried like a bad config."""


class Backend(Protocol):
    kind: str  # the BackendType this backend's leases carry ("" for udp and alloc)
    devices: tuple[str, ...]  # kernel devices it keeps across runs (vxlan's)

    def prepare(self) -> None: ...

    def lease_value(self) -> bytes: ...

    def start(self, subnet: Subnets) -> int: ...

    def kept(self) -> dict[str, int]: ...

    def move(self, old: Subnets, new: Subnets) -> None: ...

    def add_peer(self, subnet: Subnets, lease: PeerLease, old: PeerLease | None) -> bool: ...

    def remove_peer(self, subnet: Subnets, lease: PeerLease) -> None: ...

    def prune(self, peers: dict[Subnets, PeerLease]) -> None: ...

    def status(self) -> str: ...

    def leave(self) -> None:
        """This host leaves the cluster: remove what was kept for a next run."""

    def stop(self) -> None: ...


def networks(config: NetworkConfig) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The Network and the IPv6Network, those the config enables."""
    return [network for network, enabled in ((config.network, config.enable_ipv4),
                                             (config.ipv6_network, config.enable_ipv6))
            if enabled and network is not None]


def routes_via_peers(peers: dict[Subnets, PeerLease]
                     ) -> set[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                    ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """(subnet, gateway) of each route a peer explains: its IPv4 subnet via its PublicIP, its
    IPv6 subnet via its PublicIPv6."""
    routes: set = set()
    for subnets, lease in peers.items():
        if subnets.ipv4 is not None and lease.public_ip is not None:
            routes.add((subnets.ipv4, lease.public_ip))
        if subnets.ipv6 is not None and lease.public_ipv6 is not None:
            routes.add((subnets.ipv6, lease.public_ipv6))
    return routes


def prune_routes_via_peers(rtnl: RtNetlink, ext: ExternalInterface, config: NetworkConfig,
                           peers: dict[Subnets, PeerLease]) -> None:
    """Delete the routes into the Network (or the IPv6Network) via a gateway out of the
    external interface that no routed peer explains: host-gw's, or vxlan DirectRouting's, to
    hosts that left while this daemon was not running. OSError if the kernel refuses."""
    explained = routes_via_peers(peers)
    for network in networks(config):
        for destination, gateway in rtnl.routes(ext.index, network.version):
            if (gateway is not None and destination.subnet_of(network)  # type: ignore[arg-type]
                    and (destination, gateway) not in explained):
                log.info("removing route %s via %s, which no lease explains", destination,
                         gateway)
                rtnl.delete_route(destination, ext.index, gateway)
