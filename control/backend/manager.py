"""The backend by its name, as flannel's pkg/backend/manager.go chooses one: each backend is
imported only when chosen, and the interface they implement (common.py) imports none of them."""

from __future__ import annotations

import ipaddress
import logging
import re

from control.backend.common import Backend, networks
from control.host.interface import ExternalInterface, Netlink
from control.host.rtnl import RtNetlink
from control.service.handover import release_resumed
from control.service.options import Options
from control.service.pinstore import PinStore
from control.subnet.config import NetworkConfig
from fastpath import FastPath

log = logging.getLogger("pyflanneld.backend")

VXLAN_DEVICE = re.compile(r"flannel(-v6)?\.\d+")


def make_backend(config: NetworkConfig, netlink: Netlink, ext: ExternalInterface,
                 public_ip: ipaddress.IPv4Address | None,
                 public_ipv6: ipaddress.IPv6Address | None, options: Options,
                 resumed: FastPath | None = None) -> Backend:
    """The backend for `config.backend_type`; each is imported only when chosen. `resumed`:
    the udp fast path the previous run kept, already forwarding; another backend ends it."""
    if config.backend_type == "udp":
        from control.backend.udp import UdpBackend

        return UdpBackend(config, netlink, ext, public_ip, public_ipv6, options, resumed)
    if resumed is not None:
        release_resumed(resumed)
    if config.backend_type == "vxlan":
        from control.backend.vxlan import VxlanBackend

        return VxlanBackend(config, netlink.rtnl, ext, public_ip, public_ipv6)
    if config.backend_type == "host-gw":
        from control.backend.hostgw import HostGwBackend

        return HostGwBackend(config, netlink.rtnl, ext, public_ip, public_ipv6)
    from control.backend.alloc import AllocBackend

    return AllocBackend(ext, public_ip, public_ipv6)


def clear_other_backends(config: NetworkConfig, rtnl: RtNetlink, ext: ExternalInterface,
                         keep_devices: tuple[str, ...], pins: PinStore | None = None) -> None:
    """Remove what another backend left on this host in an earlier run (the backend type
    changed in between): vxlan devices of flannel's naming other than `keep_devices`, and
    host-gw's routes into the Network out of the external interface. The udp backend's TUN
    goes with its process; a tc filter of its kernel path that a killed daemon left on the
    underlay is removed by the fast path itself, or here when udp no longer runs, with its
    receive device (control/backend/udp_receiver.py).

    vxlan with DirectRouting makes the same routes as host-gw for its peers on the external
    interface's network: those stay, so that a restart does not cut them off until the watch
    routes them again, and its reconcile removes any that no lease explains, as host-gw's does
    (prune_routes_via_peers)."""
    for link in rtnl.links():
        if VXLAN_DEVICE.fullmatch(link.name) and link.name not in keep_devices:
            if rtnl.link_kind(link.index) == "vxlan":
                log.info("deleting %s, left by an earlier vxlan backend", link.name)
                rtnl.delete_link(link.index)
    routes_on_ext = config.backend_type == "host-gw" or (
        config.vxlan is not None and config.vxlan.direct_routing)
    if not routes_on_ext:
        for network in networks(config):
            for destination, gateway in rtnl.routes(ext.index, network.version):
                if gateway is not None and destination.subnet_of(network):  # type: ignore[arg-type]
                    log.info("deleting route %s via %s, left by an earlier host-gw backend",
                             destination, gateway)
                    rtnl.delete_route(destination, ext.index, gateway)
    if config.backend_type != "udp":
        from control.backend.udp_receiver import delete_receiver
        from fastpath.udp_tc import RX_VXLAN_DEVICE, detach_underlay

        if detach_underlay(ext.index):
            log.info("removed the udp kernel path's filter from %s, left by an earlier run",
                     ext.name)
        if delete_receiver(rtnl):
            log.info("deleted %s, left by an earlier udp backend", RX_VXLAN_DEVICE)
        if pins is not None and pins.forget(None):
            log.info("removed the data plane an earlier udp backend kept for a restart (%s)",
                     pins.pin_dir)
