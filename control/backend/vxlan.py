"""flannel's vxlan backend, as flanneld v0.20.2 sets it up: the kernel's VXLAN device
`flannel.<VNI>` carries the packets, and in a network with IPv6 a second one, `flannel-v6.<VNI>`,
carries the IPv6 ones over the hosts' IPv6 addresses; pyflanneld keeps their neighbours,
forwarding entries and routes equal to the leases.

Per other vxlan lease and family: a route `<subnet> via <subnet address> dev <device> onlink`, a
permanent neighbour `<subnet address> lladdr <VtepMAC>` and a forwarding entry `<VtepMAC> dst
<PublicIP>` (the IPv6 ones from BackendV6Data's VtepMAC and PublicIPv6); with DirectRouting, a
peer on the external interface's own network gets a plain route via its public address instead.
A device is kept across restarts when it still fits, so its MAC, which the lease carries, stays
the same.
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
from control.host.rtnl import IPAddress, IPNetwork, RtNetlink, VxlanLink
from control.subnet.config import NetworkConfig, VxlanConfig
from control.subnet.lease import PeerLease, Subnets, encode_lease

log = logging.getLogger("pyflanneld.vxlan")

ENCAP_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
KERNEL_DEFAULT_PORT = 8472  # what Linux uses when no port is given, as flanneld gives none
MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


def random_mac() -> str:
    """flannel's mac.NewHardwareAddr: random, locally administered, unicast."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{octet:02x}" for octet in octets)


def vtep_mac(data_text: str | None, key: str = "BackendData") -> str:
    """The VtepMAC of a vxlan lease's BackendData (or BackendV6Data); ValueError when it does
    not hold one."""
    data = json.loads(data_text or "null")
    if not isinstance(data, dict):
        raise ValueError(f"{key} {data_text!r} is not an object")
    mac = {k.lower(): value for k, value in data.items()}.get("vtepmac")
    if not isinstance(mac, str) or not MAC.fullmatch(mac):
        raise ValueError(f"VtepMAC {mac!r} is not a MAC address")
    return mac.lower()


class Vtep:
    """One VXLAN device of the backend: flannel.<VNI> for IPv4, flannel-v6.<VNI> for IPv6, each
    with the routes, neighbours and forwarding entries of its family."""

    def __init__(self, version: int, vxlan: VxlanConfig, rtnl: RtNetlink,
                 ext: ExternalInterface, local: IPAddress, network: IPNetwork) -> None:
        self.version = version
        self.device = f"flannel.{vxlan.vni}" if version == 4 else f"flannel-v6.{vxlan.vni}"
        self._vxlan = vxlan
        self._rtnl = rtnl
        self._ext = ext
        self._local = local  # the device's source: the interface's address of the family
        self._network = network
        self._port = vxlan.dst_port or KERNEL_DEFAULT_PORT  # the device's UDP port
        self.link: VxlanLink | None = None
        self._data_key = "BackendData" if version == 4 else "BackendV6Data"

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
        if link.local is not None and link.local != self._local:
            return f"vtep (external) IP: {self._local} vs {link.local}"
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
                # No MTU, as flanneld gives none: the kernel's default, the underlay's less 50
                # (IPv4) or 70 (IPv6).
                rtnl.add_vxlan(self.device, want.vni, self._local, self._ext.index,
                               want.dst_port, want.learning, want.gbp, None, random_mac())
                link = rtnl.vxlan(self.device)
                assert link is not None
                log.info("created %s: VNI %d, port %d, VtepMAC %s", self.device, want.vni,
                         link.port, link.mac)
            self.link = link
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

    def data(self) -> str:
        """BackendData (or BackendV6Data): flanneld writes the VNI as a uint16
        (vxlanLeaseAttrs), whatever the device's."""
        assert self.link is not None
        return json.dumps({"VNI": self._vxlan.vni & 0xFFFF, "VtepMAC": self.link.mac},
                          separators=(",", ":"))

    def readdress(self, subnet: IPNetwork) -> None:
        """The subnet's address as a /32 (/128) (a source for host-to-container traffic, no
        broadcast routes) and nothing else of the network on the device."""
        assert self.link is not None
        try:
            self._rtnl.set_only_address(self.link.index, subnet.network_address,
                                        subnet.max_prefixlen)
        except OSError as err:
            raise BackendError(f"addressing {self.device}: {err}") from err

    def _direct(self, public: IPAddress) -> bool:
        """DirectRouting: the peer is on a network of the external interface (a route to it
        without a gateway), so plain routing reaches it."""
        if not self._vxlan.direct_routing:
            return False
        return any(gateway is None and public in destination and destination.prefixlen > 0
                   for destination, gateway in self._rtnl.routes(self._ext.index,
                                                                 self.version))

    def add(self, subnet: IPNetwork, public: IPAddress, data: str | None) -> bool:
        try:
            mac = vtep_mac(data, self._data_key)
        except ValueError as err:
            log.error("ignoring lease %s: %s", subnet, err)
            return False
        assert self.link is not None
        index, rtnl = self.link.index, self._rtnl
        try:
            if self._direct(public):
                rtnl.replace_route(subnet, self._ext.index, gateway=public)
                log.info("%s is on %s's network: a direct route", public, self._ext.name)
                return True
            rtnl.replace_neigh(index, subnet.network_address, mac)
            rtnl.replace_fdb(index, mac, public)
            rtnl.replace_route(subnet, index, gateway=subnet.network_address, onlink=True)
        except OSError as err:
            log.error("routing %s via %s (VtepMAC %s) failed: %s", subnet, public, mac, err)
            return False
        return True

    def remove(self, subnet: IPNetwork, public: IPAddress, data: str | None) -> None:
        assert self.link is not None
        index = self.link.index
        # flanneld's order: the neighbour, the forwarding entry, then the routes.
        steps = [lambda: self._rtnl.delete_neigh(index, subnet.network_address)]
        try:
            mac = vtep_mac(data, self._data_key)
            steps.append(lambda: self._rtnl.delete_fdb(index, mac, public))
        except ValueError:
            pass
        steps += [lambda: self._rtnl.delete_route(subnet, index, subnet.network_address),
                  lambda: self._rtnl.delete_route(subnet, self._ext.index, public)]
        for step in steps:
            try:
                step()
            except OSError as err:
                if err.errno not in (errno.ENOENT, errno.ESRCH):
                    log.error("unrouting %s: %s", subnet, err)

    def prune(self, peers: dict[IPNetwork, tuple[IPAddress, str | None]]) -> None:
        """Remove what no current lease explains: routes, neighbours and forwarding entries
        of hosts that left while this daemon was not running. `peers`: each routed subnet of
        this family with its public address and backend data."""
        assert self.link is not None
        index, rtnl = self.link.index, self._rtnl
        wanted_fdb = set()
        for public, data in peers.values():
            try:
                wanted_fdb.add((vtep_mac(data, self._data_key), public))
            except ValueError:
                pass
        addresses = {subnet.network_address for subnet in peers}
        for destination, gateway in rtnl.routes(index, self.version):
            # Only routes via a gateway are a peer's: the kernel's own route for this host's
            # IPv6 /128 address is not.
            if (gateway is not None and destination.subnet_of(self._network)  # type: ignore[arg-type]
                    and destination not in peers):
                rtnl.delete_route(destination, index, gateway)
        for address, _ in rtnl.neighbours(index, self.version):
            if address not in addresses:
                rtnl.delete_neigh(index, address)
        for mac, dst in rtnl.fdb(index):
            if (mac, dst) not in wanted_fdb:
                rtnl.delete_fdb(index, mac, dst)


class VxlanBackend:
    kind = "vxlan"

    def __init__(self, config: NetworkConfig, rtnl: RtNetlink, ext: ExternalInterface,
                 public_ip: ipaddress.IPv4Address | None,
                 public_ipv6: ipaddress.IPv6Address | None) -> None:
        assert config.vxlan is not None
        self._config = config
        self._vxlan = config.vxlan
        self._rtnl = rtnl
        self._ext = ext
        self._public_ip = public_ip
        self._public_ipv6 = public_ipv6
        self._vteps: dict[int, Vtep] = {}
        if config.enable_ipv4 and config.network is not None:
            self._vteps[4] = Vtep(4, config.vxlan, rtnl, ext, ext.address, config.network)
        if config.enable_ipv6 and config.ipv6_network is not None:
            if ext.ipv6 is None:
                raise BackendError(f"{ext.name} has no IPv6 address for flannel-v6."
                                   f"{config.vxlan.vni} to send from")
            self._vteps[6] = Vtep(6, config.vxlan, rtnl, ext, ext.ipv6, config.ipv6_network)
        self.devices = tuple(vtep.device for vtep in self._vteps.values())

    def prepare(self) -> None:
        want = self._vxlan
        if not 0 <= want.port <= 65535:  # 0 is Port left out
            # flanneld takes it without a word; say what the device gets instead.
            log.warning("Backend.Port %d is outside 1-65535: %s uses port %d, as flanneld's "
                        "does (%s)", want.port, ", ".join(self.devices),
                        want.dst_port or KERNEL_DEFAULT_PORT,
                        "its low 16 bits" if want.dst_port else "the kernel's default")
        for vtep in self._vteps.values():
            vtep.prepare()

    def lease_value(self) -> bytes:
        vtep4, vtep6 = self._vteps.get(4), self._vteps.get(6)
        return encode_lease(self._public_ip, self.kind,
                            vtep4.data() if vtep4 is not None else None,
                            self._public_ipv6 if vtep6 is not None else None,
                            vtep6.data() if vtep6 is not None else None)

    def start(self, subnet: Subnets) -> int:
        """Each device's subnet address; the MTU for subnet.env: flanneld's, the IPv4 device's
        for both families (the IPv6 device's is 20 less, and IPv6 TCP finds it by Packet Too
        Big)."""
        self.move(subnet, subnet)
        return self._ext.mtu - ENCAP_OVERHEAD

    def move(self, old: Subnets, new: Subnets) -> None:
        for version, vtep in self._vteps.items():
            own = new.ipv4 if version == 4 else new.ipv6
            if own is not None:
                vtep.readdress(own)

    def _families(self, subnets: Subnets, lease: PeerLease
                  ) -> list[tuple[Vtep, IPNetwork, IPAddress, str | None]]:
        """(device, subnet, public address, backend data) of each family the peer and this
        host share."""
        found: list[tuple[Vtep, IPNetwork, IPAddress, str | None]] = []
        vtep4, vtep6 = self._vteps.get(4), self._vteps.get(6)
        if vtep4 is not None and subnets.ipv4 is not None and lease.public_ip is not None:
            found.append((vtep4, subnets.ipv4, lease.public_ip, lease.backend_data))
        if vtep6 is not None and subnets.ipv6 is not None and lease.public_ipv6 is not None:
            found.append((vtep6, subnets.ipv6, lease.public_ipv6, lease.backend_v6_data))
        return found

    def add_peer(self, subnets: Subnets, lease: PeerLease, old: PeerLease | None) -> bool:
        if lease.backend_type != self.kind:
            log.warning("ignoring non-vxlan subnet %s: type=%s", subnets, lease.backend_type)
            return False
        families = self._families(subnets, lease)
        if not families:
            log.warning("ignoring lease %s: no subnet and public address of this network's "
                        "families", subnets)
            return False
        if 6 in self._vteps and subnets.ipv6 is not None and lease.public_ipv6 is None:
            log.warning("lease %s has no PublicIPv6: its IPv6 subnet is not routed", subnets)
        if old is not None and old.backend_type == self.kind:
            self.remove_peer(subnets, old)
        return all([vtep.add(subnet, public, data) for vtep, subnet, public, data in families])

    def remove_peer(self, subnets: Subnets, lease: PeerLease) -> None:
        for vtep, subnet, public, data in self._families(subnets, lease):
            vtep.remove(subnet, public, data)

    def prune(self, peers: dict[Subnets, PeerLease]) -> None:
        """Remove what no current lease explains, on each device. With DirectRouting also the
        direct routes that no routed peer explains (clear_other_backends leaves them here: they
        may be a host-gw run's as well as this backend's own)."""
        per_device: dict[int, dict[IPNetwork, tuple[IPAddress, str | None]]] = {
            version: {} for version in self._vteps}
        for subnets, lease in peers.items():
            for vtep, subnet, public, data in self._families(subnets, lease):
                per_device[vtep.version][subnet] = (public, data)
        for version, vtep in self._vteps.items():
            try:
                vtep.prune(per_device[version])
            except OSError as err:
                log.error("removing stale entries from %s: %s", vtep.device, err)
        if self._vxlan.direct_routing:
            try:
                prune_routes_via_peers(self._rtnl, self._ext, self._config, peers)
            except OSError as err:
                log.error("removing stale direct routes from %s: %s", self._ext.name, err)

    def kept(self) -> dict[str, int]:
        return {}  # the kernel's devices and routes outlive the process by themselves

    def status(self) -> str:
        return f"vxlan on {', '.join(self.devices)}"

    def leave(self) -> None:
        """Nothing kept for a next run but the kernel's own state, as flanneld leaves it."""

    def stop(self) -> None:
        """The devices and their entries stay, as flanneld leaves them: a restart reuses
        them."""
