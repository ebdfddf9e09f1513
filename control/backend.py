"""The backends behind one interface, as flannel's pkg/backend splits them from the lease policy:
the daemon and the watch never ask which one runs.

A backend's life: `prepare` (before the lease: what the lease value needs, such as the vxlan
device whose MAC it carries), `lease_value`, `start` on the leased subnet (returns the MTU for
subnet.env), then `add_peer`/`remove_peer` for every other host's lease and `prune` after each
full listing, `move` if this host's subnet changes, and `stop`. `kept` names the descriptors the
next run should go on with (control/handover.py).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Protocol

from control.config import NetworkConfig
from control.handover import release_resumed
from control.host import ExternalInterface, Netlink
from control.lease import PeerLease
from control.options import Options
from control.rtnl import RtNetlink
from fastpath import FastPath

log = logging.getLogger("pyflanneld.backend")

VXLAN_DEVICE = re.compile(r"flannel\.\d+")


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

    def stop(self) -> None: ...


def make_backend(config: NetworkConfig, netlink: Netlink, ext: ExternalInterface,
                 public_ip: ipaddress.IPv4Address, options: Options,
                 resumed: FastPath | None = None) -> Backend:
    """The backend for `config.backend_type`; each is imported only when chosen. `resumed`:
    the udp fast path the previous run kept, already forwarding; another backend ends it."""
    if config.backend_type == "udp":
        from control.udp import UdpBackend

        return UdpBackend(config, netlink, ext, public_ip, options, resumed)
    if resumed is not None:
        release_resumed(resumed)
    if config.backend_type == "vxlan":
        from control.vxlan import VxlanBackend

        return VxlanBackend(config, netlink.rtnl, ext, public_ip)
    if config.backend_type == "host-gw":
        from control.hostgw import HostGwBackend

        return HostGwBackend(config, netlink.rtnl, ext, public_ip)
    from control.alloc import AllocBackend

    return AllocBackend(ext, public_ip)


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


def clear_other_backends(config: NetworkConfig, rtnl: RtNetlink, ext: ExternalInterface,
                         keep_device: str | None) -> None:
    """Remove what another backend left on this host in an earlier run (the backend type
    changed in between): vxlan devices of flannel's naming other than `keep_device`, and
    host-gw's routes into the Network out of the external interface. The udp backend's TUN
    goes with its process; a tc filter of its kernel path that a killed daemon left on the
    underlay is removed by the fast path itself, or here when udp no longer runs, with its
    receive device (control/receiver.py).

    vxlan with DirectRouting makes the same routes as host-gw for its peers on the external
    interface's network: those stay, so that a restart does not cut them off until the watch
    routes them again, and its reconcile removes any that no lease explains, as host-gw's does
    (prune_routes_via_peers)."""
    for link in rtnl.links():
        if VXLAN_DEVICE.fullmatch(link.name) and link.name != keep_device:
            if rtnl.link_kind(link.index) == "vxlan":
                log.info("deleting %s, left by an earlier vxlan backend", link.name)
                rtnl.delete_link(link.index)
    routes_on_ext = config.backend_type == "host-gw" or (
        config.vxlan is not None and config.vxlan.direct_routing)
    if not routes_on_ext:
        for destination, gateway in rtnl.routes(ext.index):
            if gateway is not None and destination.subnet_of(config.network):
                log.info("deleting route %s via %s, left by an earlier host-gw backend",
                         destination, gateway)
                rtnl.delete_route(destination, ext.index, gateway)
    if config.backend_type != "udp":
        from control.receiver import delete_receiver
        from fastpath.udp_tc import RX_VXLAN_DEVICE, detach_underlay

        if detach_underlay(ext.index):
            log.info("removed the udp kernel path's filter from %s, left by an earlier run",
                     ext.name)
        if delete_receiver(rtnl):
            log.info("deleted %s, left by an earlier udp backend", RX_VXLAN_DEVICE)
