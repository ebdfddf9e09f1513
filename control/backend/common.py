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
from control.subnet.lease import PeerLease

log = logging.getLogger("pyflanneld.backend")


class BackendError(Exception):
    """The backend cannot run with this config on this host; retried like a bad config."""


class Backend(Protocol):
    kind: str  # the BackendType this backend's leases carry ("" for udp and alloc)
    device: str | None  # a kernel device it keeps across runs (vxlan's), else None

    def prepare(self) -> None: ...

    def lease_value(self) -> bytes: ...

    def start(self, subnet: ipaddress.IPv4Network) -> int: ...

    def kept(self) -> dict[str, int]: ...

    def move(self, old: ipaddress.IPv4Network, new: ipaddress.IPv4Network) -> None: ...

    def add_peer(self, subnet: ipaddress.IPv4Network, lease: PeerLease,
                 old: PeerLease | None) -> bool: ...

    def remove_peer(self, subnet: ipaddress.IPv4Network, lease: PeerLease) -> None: ...

    def prune(self, peers: dict[ipaddress.IPv4Network, PeerLease]) -> None: ...

    def status(self) -> str: ...

    def leave(self) -> None:
        """This host leaves the cluster: remove what was kept for a next run."""

    def stop(self) -> None: ...


def prune_routes_via_peers(rtnl: RtNetlink, ext: ExternalInterface,
                           network: ipaddress.IPv4Network,
                           peers: dict[ipaddress.IPv4Network, PeerLease]) -> None:
    """Delete the routes into the Network via a gateway out of the external interface that no
    routed peer explains (its subnet via its PublicIP): host-gw's, or vxlan DirectRouting's,
    to hosts that left while this daemon was not running. OSError if the kernel refuses."""
    for destination, gateway in rtnl.routes(ext.index):
        if (gateway is not None and destination.subnet_of(network)
                and (destination not in peers or peers[destination].public_ip != gateway)):
            log.info("removing route %s via %s, which no lease explains", destination, gateway)
            rtnl.delete_route(destination, ext.index, gateway)
