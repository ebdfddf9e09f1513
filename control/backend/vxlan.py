"""flannel's vxlan backend, as flanneld v0.20.2 sets it up: the kernel's VXLAN device
`flannel.<VNI>` carries the packets; pyflanneld keeps its neighbours, forwarding entries and
routes equal to the leases.

Per other vxlan lease: a route `<subnet> via <subnet address> dev flannel.<VNI> onlink`, a
permanent neighbour `<subnet address> lladdr <VtepMAC>` and a forwarding entry `<VtepMAC> dst
<PublicIP>`; with DirectRouting, a peer on the external interface's own network gets a plain
route via its PublicIP instead. The device is kept across restarts when it still fits, so its
MAC, which the lease carries, stays the same.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import re

from control.backend.common import BackendError, prune_routes_via_peers
from control.host.interface import ExternalInterface
from control.host.rtnl import RtNetlink, VxlanLink
from control.subnet.config import NetworkConfig
from control.subnet.lease import PeerLease, encode_lease

log = logging.getLogger("pyflanneld.vxlan")

ENCAP_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
KERNEL_DEFAULT_PORT = 8472  # what Linux uses when no port is given, as flanneld gives none
MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


def random_mac() -> str:
    """flannel's mac.NewHardwareAddr: random, locally administered, unicast."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{octet:02x}" for octet in octets)


def vtep_mac(lease: PeerLease) -> str:
    """The VtepMAC of a vxlan lease; ValueError when BackendData does not hold one."""
    data = json.loads(lease.backend_data or "null")
    if not isinstance(data, dict):
        raise ValueError(f"BackendData {lease.backend_data!r} is not an object")
    mac = {key.lower(): value for key, value in data.items()}.get("vtepmac")
    if not isinstance(mac, str) or not MAC.fullmatch(mac):
        raise ValueError(f"VtepMAC {mac!r} is not a MAC address")
    return mac.lower()


class VxlanBackend:
    kind = "vxlan"

    def __init__(self, config: NetworkConfig, rtnl: RtNetlink, ext: ExternalInterface,
                 public_ip: ipaddress.IPv4Address) -> None:
        assert config.vxlan is not None
        self._config = config
        self._vxlan = config.vxlan
        self._rtnl = rtnl
        self._ext = ext
        self._public_ip = public_ip
        self.device = f"flannel.{config.vxlan.vni}"
        self._port = config.vxlan.dst_port or KERNEL_DEFAULT_PORT  # the device's UDP port
        self._link: VxlanLink | None = None

    def _incompatible(self, link: VxlanLink) -> str:
        """flanneld's vxlanLinksIncompat: why an existing device does not fit ("" if it does).
        The port compared is the one the device gets: flanneld compares Backend.Port itself,
        so with a Port above 65535 it recreates its device, and changes its VtepMAC, at every
        restart."""
        want, port = self._vxlan, self._port
        if link.vni != want.vni:
            return f"vni: {want.vni} vs {link.vni}"
        if link.link and link.link != self._ext.index:
            return f"vtep (external) interface: {self._ext.index} vs {link.link}"
        if link.local is not None and link.local != self._ext.address:
            return f"vtep (external) IP: {self._ext.address} vs {link.local}"
        if link.port != port:
            return f"port: {port} vs {link.port}"
        if link.gbp != want.gbp:
            return f"gbp: {want.gbp} vs {link.gbp}"
        if link.learning != want.learning:
            return f"learning: {want.learning} vs {link.learning}"
        return ""

    def prepare(self) -> None:
        """The device, before the lease that carries its MAC; up already, so that a UDP port
        another socket holds is found now (the kernel opens the port when it goes up)."""
        rtnl, want = self._rtnl, self._vxlan
        if not 0 <= want.port <= 65535:  # 0 is Port left out
            # flanneld takes it without a word; say what the device gets instead.
            log.warning("Backend.Port %d is outside 1-65535: %s uses port %d, as flanneld's "
                        "does (%s)", want.port, self.device, self._port,
                        "its low 16 bits" if want.dst_port else "the kernel's default")
        try:
            try:
                link = rtnl.vxlan(self.device)
            except ValueError:  # a device of another kind has the name
                link = None
                index = next(li.index for li in rtnl.links() if li.name == self.device)
                log.warning("%s exists and is not a vxlan device; recreating it", self.device)
                rtnl.delete_link(index)
            if link is not None:
                why = self._incompatible(link)
                if why:
                    log.warning("%s already exists with incompatible configuration: %s; "
                                "recreating device", self.device, why)
                    rtnl.delete_link(link.index)
                    link = None
                else:
                    log.info("reusing %s (VtepMAC %s)", self.device, link.mac)
            if link is None:
                rtnl.add_vxlan(self.device, want.vni, self._ext.address, self._ext.index,
                               want.dst_port, want.learning, want.gbp, None, random_mac())
                link = rtnl.vxlan(self.device)
                assert link is not None
                log.info("created %s: VNI %d, port %d, VtepMAC %s", self.device, want.vni,
                         link.port, link.mac)
            self._link = link
            rtnl.set_up(link.index, link.mtu)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise BackendError(f"{self.device}: UDP port {self._port} is taken by another "
                                   "socket") from err
            raise BackendError(f"setting up {self.device}: {err}") from err
        try:  # as flanneld: no IPv6 router advertisements on the device
            with open(f"/proc/sys/net/ipv6/conf/{self.device}/accept_ra", "w") as sysctl:
                sysctl.write("0")
        except OSError:
            pass

    def lease_value(self) -> bytes:
        assert self._link is not None
        # flanneld writes the VNI as a uint16 (vxlanLeaseAttrs), whatever the device's.
        data = json.dumps({"VNI": self._vxlan.vni & 0xFFFF, "VtepMAC": self._link.mac},
                          separators=(",", ":"))
        return encode_lease(self._public_ip, self.kind, data)

    def start(self, subnet: ipaddress.IPv4Network) -> int:
        """The subnet's address as a /32 (a source for host-to-container traffic, no broadcast
        routes) and nothing else of the Network on the device; MTU for subnet.env."""
        self._readdress(subnet)
        return self._ext.mtu - ENCAP_OVERHEAD

    def _readdress(self, subnet: ipaddress.IPv4Network) -> None:
        assert self._link is not None
        index = self._link.index
        try:
            self._rtnl.set_only_address(index, subnet.network_address, 32)
        except OSError as err:
            raise BackendError(f"addressing {self.device}: {err}") from err

    def move(self, old: ipaddress.IPv4Network, new: ipaddress.IPv4Network) -> None:
        self._readdress(new)

    def _direct(self, lease: PeerLease) -> bool:
        """DirectRouting: the peer is on a network of the external interface (a route to it
        without a gateway), so plain routing reaches it."""
        if not self._vxlan.direct_routing:
            return False
        return any(gateway is None and lease.public_ip in destination
                   and destination.prefixlen > 0
                   for destination, gateway in self._rtnl.routes(self._ext.index))

    def add_peer(self, subnet: ipaddress.IPv4Network, lease: PeerLease,
                 old: PeerLease | None) -> bool:
        if lease.backend_type != self.kind:
            log.warning("ignoring non-vxlan subnet %s: type=%s", subnet, lease.backend_type)
            return False
        try:
            mac = vtep_mac(lease)
        except ValueError as err:
            log.error("ignoring lease %s: %s", subnet, err)
            return False
        if old is not None and old.backend_type == self.kind:
            self.remove_peer(subnet, old)
        assert self._link is not None
        index, rtnl = self._link.index, self._rtnl
        try:
            if self._direct(lease):
                rtnl.replace_route(subnet, self._ext.index, gateway=lease.public_ip)
                log.info("%s is on %s's network: a direct route", lease.public_ip,
                         self._ext.name)
                return True
            rtnl.replace_neigh(index, subnet.network_address, mac)
            rtnl.replace_fdb(index, mac, lease.public_ip)
            rtnl.replace_route(subnet, index, gateway=subnet.network_address, onlink=True)
        except OSError as err:
            log.error("routing %s via %s (VtepMAC %s) failed: %s", subnet, lease.public_ip, mac,
                      err)
            return False
        return True

    def remove_peer(self, subnet: ipaddress.IPv4Network, lease: PeerLease) -> None:
        assert self._link is not None
        index = self._link.index
        # flanneld's order: the neighbour, the forwarding entry, then the routes.
        steps = [lambda: self._rtnl.delete_neigh(index, subnet.network_address)]
        try:
            mac = vtep_mac(lease)
            steps.append(lambda: self._rtnl.delete_fdb(index, mac, lease.public_ip))
        except ValueError:
            pass
        steps += [lambda: self._rtnl.delete_route(subnet, index, subnet.network_address),
                  lambda: self._rtnl.delete_route(subnet, self._ext.index, lease.public_ip)]
        for step in steps:
            try:
                step()
            except OSError as err:
                if err.errno not in (errno.ENOENT, errno.ESRCH):
                    log.error("unrouting %s: %s", subnet, err)

    def prune(self, peers: dict[ipaddress.IPv4Network, PeerLease]) -> None:
        """Remove what no current lease explains: routes, neighbours and forwarding entries
        of hosts that left while this daemon was not running. With DirectRouting also the
        direct routes that no routed peer explains (clear_other_backends leaves them here: they
        may be a host-gw run's as well as this backend's own)."""
        assert self._link is not None
        index, rtnl = self._link.index, self._rtnl
        wanted_fdb = set()
        for lease in peers.values():
            try:
                wanted_fdb.add((vtep_mac(lease), lease.public_ip))
            except ValueError:
                pass
        addresses = {subnet.network_address for subnet in peers}
        try:
            for destination, gateway in rtnl.routes(index):
                if destination.subnet_of(self._config.network) and destination not in peers:
                    rtnl.delete_route(destination, index, gateway)
            if self._vxlan.direct_routing:
                prune_routes_via_peers(rtnl, self._ext, self._config.network, peers)
            for address, _ in rtnl.neighbours(index):
                if address not in addresses:
                    rtnl.delete_neigh(index, address)
            for mac, dst in rtnl.fdb(index):
                if (mac, dst) not in wanted_fdb:
                    rtnl.delete_fdb(index, mac, dst)
        except OSError as err:
            log.error("removing stale entries from %s: %s", self.device, err)

    def kept(self) -> dict[str, int]:
        return {}  # the kernel's devices and routes outlive the process by themselves

    def status(self) -> str:
        return f"vxlan on {self.device}"

    def leave(self) -> None:
        """Nothing kept for a next run but the kernel's own state, as flanneld leaves it."""

    def stop(self) -> None:
        """The device and its entries stay, as flanneld leaves them: a restart reuses them."""
