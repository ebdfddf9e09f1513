"""The udp backend's receive-only vxlan device (fastpath/udp_tc.bpf.c): the kernel's own VXLAN
receive takes the headers off peers' whole TCP super-packets there, which the kernel path hands
it, and they reach flannel0 whole, with no copy. It never sends and has no neighbours, routes or
forwarding entries; its port is open on every address (the kernel's VXLAN socket binds the
wildcard address whatever the device's local address), and the kernel path's filter on it drops
all that udp_ingress did not hand it.

Made only on a veth underlay: whole super-packets cross only a veth (a peer on another machine
gets them cut by the NIC into datagrams), so elsewhere the device would never take a packet and
its port 8473 stays closed. Made down before the fast path starts, so that the filter is on it
before its port opens; put up once the fast path uses it. Like flanneld's flannel.<VNI> it stays
when pyflanneld stops (a restart through the fd store goes on using it, its filter still
guarding it); it goes when the fast path does not use it, and with the udp backend
(clear_other_backends).
"""

from __future__ import annotations

import errno
import logging

from control.host.interface import ExternalInterface
from control.host.rtnl import RtNetlink, VxlanLink
from fastpath import FastPath
from fastpath.udp_tc import RX_VXLAN_DEVICE, RX_VXLAN_PORT, RX_VXLAN_VNI, driver

log = logging.getLogger("pyflanneld.udp")


def _fits(link: VxlanLink, ext: ExternalInterface) -> bool:
    return (link.vni, link.port, link.local, link.link, link.learning) == (
        RX_VXLAN_VNI, RX_VXLAN_PORT, ext.address, ext.index, False)


def prepare_receiver(rtnl: RtNetlink, ext: ExternalInterface) -> bool:
    """The device for this external interface: the one there if it fits, else a new one, down.
    False when there is no use for one (not a veth underlay) or there can be none (a kernel
    without vxlan, the name taken by another kind of device), logged: the loops take whole
    super-packets then."""
    if driver(ext.name) != "veth":
        if delete_receiver(rtnl):
            log.info("deleted %s: super-packets arrive whole only over a veth, not over %s",
                     RX_VXLAN_DEVICE, ext.name)
        return False
    try:
        link = rtnl.vxlan(RX_VXLAN_DEVICE)
        if link is not None and not _fits(link, ext):
            log.info("recreating %s for %s", RX_VXLAN_DEVICE, ext.address)
            rtnl.delete_link(link.index)
            link = None
        if link is None:
            rtnl.add_vxlan(RX_VXLAN_DEVICE, RX_VXLAN_VNI, ext.address, ext.index, RX_VXLAN_PORT,
                           learning=False, gbp=False, mtu=None)
    except (OSError, ValueError) as err:  # ValueError: a device of another kind has the name
        log.warning("cannot make %s (%s): the loops take whole super-packets", RX_VXLAN_DEVICE,
                    err)
        return False
    try:  # it never sends: no IPv6 link-local address, router or neighbour solicitations
        with open(f"/proc/sys/net/ipv6/conf/{RX_VXLAN_DEVICE}/disable_ipv6", "w") as sysctl:
            sysctl.write("1")
    except OSError:
        pass
    return True


def finish_receiver(rtnl: RtNetlink, fastpath: FastPath) -> None:
    """Up when the started fast path uses the device, else gone."""
    try:
        link = rtnl.vxlan(RX_VXLAN_DEVICE)
    except (OSError, ValueError):
        link = None
    if fastpath.through_vxlan and link is not None:
        try:
            rtnl.set_up(link.index, link.mtu)
            return
        except OSError as err:
            why = (f"UDP port {RX_VXLAN_PORT} is taken by another socket"
                   if err.errno == errno.EADDRINUSE else str(err))
            log.warning("%s cannot go up (%s): the loops take whole super-packets",
                        RX_VXLAN_DEVICE, why)
    elif fastpath.vxlan_receiver:
        log.info("whole super-packets go through the loops, not %s: %s", RX_VXLAN_DEVICE,
                 fastpath.vxlan_missing)
    # The kernel path must not hand anything to a device that is not there.
    fastpath.forgo_vxlan(f"{RX_VXLAN_DEVICE} is not up")
    delete_receiver(rtnl)


def delete_receiver(rtnl: RtNetlink) -> bool:
    """Delete the device if it is there (and a vxlan device); returns whether it was."""
    try:
        link = rtnl.vxlan(RX_VXLAN_DEVICE)
        if link is None:
            return False
        rtnl.delete_link(link.index)
    except (OSError, ValueError):
        return False
    return True
