"""flannel's udp backend: the fast path (fastpath/) between flannel0 and UDP port Backend.Port,
its route table kept equal to the leases. Leases of any type are routed, as flanneld's udp
backend routes them.

With IPv6 in the network the fast path carries IPv6 packets too, each one datagram over IPv4 as
an IPv4 one, where flanneld's udp backend carries none (it leases an IPv6 subnet and drops what
is not IPv4). So an IPv6 packet goes only to a pyflannel host: a udp lease with a PublicIPv6,
which this backend writes and flanneld's never does (`"PublicIPv6":null`).

Where the underlay has no IPv4 address (the interface has none) or the network is IPv6-only,
the datagrams go over IPv6 instead (outer IPv6): the socket is bound to this host's IPv6 address
and each datagram goes to the peer lease's PublicIPv6, carrying either family. Only pyflannel
hosts do it (flanneld's udp backend has no IPv6), only the loops carry it (the kernel path is
IPv4's), and a restart starts a new fast path (nothing is handed over)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable

from control.backend.common import BackendError
from control.backend.udp_receiver import delete_receiver, finish_receiver, prepare_receiver
from control.host.interface import ExternalInterface, HostError, Netlink
from control.host.rtnl import IPNetwork
from control.service.handover import kept_names, release_resumed
from control.service.options import Options
from control.service.pinstore import PinStore
from control.subnet.config import NetworkConfig
from control.subnet.lease import PeerLease, Subnets, encode_lease
from fastpath import FastPath
from fastpath.hello import HELLO_SECONDS
from fastpath.table import MAX_SUBNETS

log = logging.getLogger("pyflanneld.udp")

UDP_ENCAP_OVERHEAD = 28  # outer IPv4 + UDP headers
UDP6_ENCAP_OVERHEAD = 48  # outer IPv6 + UDP headers
GREET_AGAIN_SECONDS = (0.05, 0.5)  # a new peer's further hellos (add_peer)


class UdpBackend:
    kind = ""  # flanneld's udp backend writes no BackendType
    devices: tuple[str, ...] = ()

    def __init__(self, config: NetworkConfig, netlink: Netlink, ext: ExternalInterface,
                 public_ip: ipaddress.IPv4Address | None,
                 public_ipv6: ipaddress.IPv6Address | None, options: Options,
                 resumed: FastPath | None = None) -> None:
        """resumed: the fast path the previous run kept, forwarding since this run began."""
        self._config = config
        self._resumed = resumed
        self._netlink = netlink
        self._ext = ext
        self._public_ip = public_ip
        self._public_ipv6 = public_ipv6
        self._options = options
        self.fastpath: FastPath | None = None
        self._subnet: ipaddress.IPv4Network | None = None  # this host's, once started
        self._ipv6 = config.ipv6_network if config.enable_ipv6 else None  # what it carries
        # Datagrams over IPv6: an underlay without IPv4, or an IPv6-only network.
        self._outer6 = ext.address is None or config.network is None
        self._unreachable: set[str] = set()  # leases without PublicIPv6, logged once
        self._pins = PinStore.of(options)

    def prepare(self) -> None:
        config = self._config
        if self._outer6 and self._ext.ipv6 is None:
            raise BackendError("the udp backend sends over IPv6 here (no IPv4 underlay or "
                               "network) but the interface has no IPv6 address")
        for network, subnet_len, name in ((config.network, config.subnet_len, "SubnetLen"),
                                          (self._ipv6, config.ipv6_subnet_len, "IPv6SubnetLen")):
            if network is None:
                continue
            subnets = 1 << (subnet_len - network.prefixlen)
            if subnets > MAX_SUBNETS:
                raise BackendError(f"{subnets} subnets are more than the fast path's table "
                                   f"holds ({MAX_SUBNETS}): use a longer {name}")

    @property
    def _bind(self) -> str:
        """The address the socket is bound to: the interface's (IPv6 over outer IPv6)."""
        return str(self._ext.ipv6 if self._outer6 else self._ext.address)

    def lease_value(self) -> bytes:
        return encode_lease(self._public_ip, public_ipv6=self._public_ipv6)

    def start(self, subnets: Subnets) -> int:
        config, ext, options = self._config, self._ext, self._options
        assert subnets.ipv4 is not None or self._outer6  # prepare() asked for IPv4
        mtu = ext.mtu - (UDP6_ENCAP_OVERHEAD if self._outer6 else UDP_ENCAP_OVERHEAD)
        fp = self._resumed
        if fp is not None and self._outer6:
            log.warning("udp backend: the fast path the previous run kept sends over IPv4, this "
                        "one over IPv6: starting a new one")
            release_resumed(fp)
            fp = None
        if fp is not None:
            table6 = fp.table6
            made_for = (fp.table.network, fp.table.subnet_len, fp.bind_ip, fp.port, fp.mtu,
                        fp.underlay, table6 and (table6.network, table6.subnet_len))
            wanted = (config.network, config.subnet_len, str(ext.address), config.port, mtu,
                      ext.name, self._ipv6 and (self._ipv6, config.ipv6_subnet_len))
            if made_for == wanted:
                log.info("udp backend: went on with the fast path the previous run kept (its "
                         "TUN, socket and routes), forwarding since this run began")
                self.fastpath = fp
                return self._started(subnets, mtu)
            log.warning("udp backend: the fast path the previous run kept was made for %s, "
                        "not %s: starting a new one", made_for, wanted)
            release_resumed(fp)
        levers = options.fastpath_levers
        if self._outer6:
            if levers.get("kernel", "off") != "off":
                log.info("udp backend: the kernel path carries IPv4 underlays only: the loops "
                         "carry everything")
            levers.update(kernel="off", whole_superpackets=False, plain_superpackets=False,
                          vxlan_receiver="")
            log.info("udp backend: datagrams go over IPv6 from %s; a restart starts a new fast "
                     "path (the loops' routes name IPv6 peers that are not handed over)",
                     self._bind)
            if delete_receiver(self._netlink.rtnl):
                log.info("deleted the receive device of an earlier run (outer IPv6)")
            if self._pins is not None and self._pins.forget(None):
                log.info("udp backend: dropped what --fastpath-pin-dir kept for an IPv4 "
                         "underlay: over IPv6 nothing is kept")
        elif not options.fastpath_vxlan_receive:
            if delete_receiver(self._netlink.rtnl):
                log.info("deleted the receive device of an earlier run "
                         "(--fastpath-vxlan-receive is off)")
        elif not prepare_receiver(self._netlink.rtnl, ext):
            levers["vxlan_receiver"] = ""
        handed = self._pins.routes_fds(self._ipv6 is not None) \
            if self._pins and not self._outer6 else None
        if self._ipv6 is not None:
            levers.update(ipv6_network=self._ipv6, ipv6_subnet_len=config.ipv6_subnet_len)
        try:
            self.fastpath = fp = FastPath(
                config.network, config.subnet_len, self._bind, config.port, mtu=mtu,
                underlay=ext.name, handed=handed, **levers)
            fp.start()
        except (OSError, ValueError) as err:  # ValueError: an MTU below IPv6's 1280
            raise BackendError(f"starting the udp backend on {self._where}: {err}") from err
        return self._started(subnets, mtu)

    def _started(self, subnets: Subnets, mtu: int) -> int:
        """Address and route the running fast path's TUN, and say how it runs."""
        config, fp = self._config, self.fastpath
        assert fp is not None
        self._subnet = subnets.ipv4
        served: list[tuple[IPNetwork, IPNetwork]] = []
        if subnets.ipv4 is not None and config.network is not None:
            served.append((subnets.ipv4, config.network))
        if self._ipv6 is not None and subnets.ipv6 is not None:
            served.append((subnets.ipv6, self._ipv6))
        try:
            self._netlink.configure_tun(fp.tun_name, served, mtu)
        except HostError as err:
            raise BackendError(f"starting the udp backend on {self._where}: {err}") from err
        finish_receiver(self._netlink.rtnl, fp)
        if self._pins is not None and not self._outer6:
            self._pins.keep(fp)
        if fp.nice_error:
            log.warning("udp backend: cannot give the packet threads nice %d: %s", fp.nice,
                        fp.nice_error)
        if fp.kernel_missing and not fp.outer6:
            log.warning("udp backend: the kernel path cannot run here (%s): the loops carry "
                        "everything", fp.kernel_missing)
        if fp.offload_missing:
            log.warning("udp backend: this kernel lacks %s: the fast path goes without it",
                        fp.offload_missing)
        if fp.whole_superpackets and not fp.sends_whole:
            log.info("udp backend: TCP super-packets go out whole only from the kernel path "
                     "(--fastpath-kernel on) onto a veth that takes them (TSO on): not here")
        log.info("udp backend: %s (MTU %d) <-> %s, batch %d, offloads %s, UDP coalescing "
                 "%s, nice %d, kernel path %s, source check %s, whole super-packets %s, VXLAN "
                 "receive %s, plain super-packets %s", fp.tun_name, mtu, self._where, fp.slots,
                 "on" if fp.offload else "off",
                 "on" if fp.udp_coalesce else "off", fp.nice, fp.kernel,
                 "on" if fp.verify_source else "off",
                 "on" if fp.sends_whole else "off", "on" if fp.through_vxlan else "off",
                 "on" if fp.sends_plain else "off")
        return mtu

    @property
    def _where(self) -> str:
        """The socket's address and port, as logged: 198.18.0.1:8285, [2001:db8::1]:8285."""
        return f"[{self._bind}]:{self._config.port}" if self._outer6 else \
            f"{self._bind}:{self._config.port}"

    def move(self, old: Subnets, new: Subnets) -> None:
        assert self.fastpath is not None and (new.ipv4 is not None or self._outer6)
        for before, after in ((old.ipv4, new.ipv4), (old.ipv6, new.ipv6)):
            if before is not None and after is not None and before != after:
                self._netlink.readdress_tun(self.fastpath.tun_name, before, after)
        self._subnet = new.ipv4

    def add_peer(self, subnets: Subnets, lease: PeerLease, old: PeerLease | None) -> bool:
        assert self.fastpath is not None
        if self._outer6:
            return self._add_peer6(subnets, lease)
        subnet = subnets.ipv4
        if subnet is None or lease.public_ip is None:
            log.warning("ignoring lease %s: no IPv4 subnet or PublicIP", subnets)
            return False
        if self._ipv6 is not None and subnets.ipv6 is not None:
            if self._carries_ipv6(lease):
                self.fastpath.set_route(subnets.ipv6, str(lease.public_ip), self._config.port)
            else:
                if old is None:
                    log.info("lease %s: IPv4 only, as flanneld's udp backend (no PublicIPv6) "
                             "carries no IPv6", subnets)
                self._forget_ipv6(subnets.ipv6)
        self.fastpath.set_route(subnet, str(lease.public_ip), self._config.port)
        if old is None or old.public_ip != lease.public_ip:
            # A new peer hears at once that this host takes whole super-packets, not at the
            # next greeting (up to HELLO_SECONDS): until then its TCP super-packets to this
            # host go through its loops, which stall while its daemon restarts. And again
            # moments later: a hello that arrives before the peer has this host's lease (two
            # hosts that start together) fails its source check.
            self._greet(subnet, str(lease.public_ip))
            for delay in GREET_AGAIN_SECONDS:
                asyncio.get_running_loop().call_later(delay, self._greet, subnet,
                                                      str(lease.public_ip))
        return True

    def _add_peer6(self, subnets: Subnets, lease: PeerLease) -> bool:
        """add_peer over outer IPv6: both families' subnets go to the lease's PublicIPv6; a
        lease without one (flanneld's udp backend writes none) cannot be reached from here."""
        assert self.fastpath is not None
        if lease.public_ipv6 is None:
            if subnets.name not in self._unreachable:
                self._unreachable.add(subnets.name)
                log.warning("udp backend: lease %s has no PublicIPv6: this host sends over "
                            "IPv6 and cannot reach it", subnets.name)
            return False
        self._unreachable.discard(subnets.name)
        peer, port = str(lease.public_ipv6), self._config.port
        if self.fastpath.table is not None and subnets.ipv4 is not None:
            self.fastpath.set_route(subnets.ipv4, peer, port)
        if self._ipv6 is not None and subnets.ipv6 is not None:
            if self._carries_ipv6(lease):
                self.fastpath.set_route(subnets.ipv6, peer, port)
            else:
                self._forget_ipv6(subnets.ipv6)
        return True

    def _greet(self, subnet: ipaddress.IPv4Network, public_ip: str) -> None:
        """Say hello to one peer now (greet_peers says hello to all every HELLO_SECONDS)."""
        if self.fastpath is not None and self.fastpath.running and self._subnet is not None:
            self.fastpath.greet(self._subnet.network_address,
                                {(public_ip, self._config.port): subnet.network_address})

    @staticmethod
    def _carries_ipv6(lease: PeerLease) -> bool:
        """A pyflannel udp host's lease: flanneld's udp backend writes no PublicIPv6."""
        return lease.backend_type == "" and lease.public_ipv6 is not None

    def _forget_ipv6(self, subnet: ipaddress.IPv6Network) -> None:
        assert self.fastpath is not None and self.fastpath.table6 is not None
        if any(ipaddress.IPv6Network(routed) == subnet
               for routed, _ in self.fastpath.table6.routes()):
            self.fastpath.del_route(subnet)

    def remove_peer(self, subnets: Subnets, lease: PeerLease) -> None:
        assert self.fastpath is not None
        self._unreachable.discard(subnets.name)
        if subnets.ipv4 is not None and self.fastpath.table is not None:
            self.fastpath.del_route(subnets.ipv4)
        if self._ipv6 is not None and subnets.ipv6 is not None:
            self._forget_ipv6(subnets.ipv6)

    def prune(self, peers: dict[Subnets, PeerLease]) -> None:
        """A table taken over from the previous run may hold routes no lease explains now."""
        assert self.fastpath is not None
        routed: set[IPNetwork] = {subnets.ipv4 for subnets, lease in peers.items()
                                  if subnets.ipv4 and not (self._outer6
                                                           and lease.public_ipv6 is None)}
        routed |= {subnets.ipv6 for subnets, lease in peers.items()
                   if subnets.ipv6 is not None and self._carries_ipv6(lease)}
        tables = [self.fastpath.table, self.fastpath.table6]
        for table in tables:
            for subnet, _ in table.routes() if table is not None else ():
                if ipaddress.ip_network(subnet) not in routed:
                    log.info("removing route %s, which no lease explains", subnet)
                    self.fastpath.del_route(subnet)

    async def greet_peers(self, own_subnet: Callable[[], Subnets | None],
                          peers: Callable[[], dict[Subnets, PeerLease]]) -> None:
        """Every HELLO_SECONDS, say hello to every peer (fastpath/hello.py: a pyflannel peer
        then sends this host TCP super-packets whole) and follow the underlay's TSO setting."""
        while True:
            own = own_subnet()
            if (self.fastpath is not None and own is not None and own.ipv4 is not None
                    and not self._outer6):  # hellos are the kernel path's, IPv4's
                through_vxlan = self.fastpath.through_vxlan
                for peer, why in self.fastpath.refresh().items():
                    log.warning("udp backend: no more plain super-packets to %s: %s", peer, why)
                if through_vxlan and not self.fastpath.through_vxlan:
                    log.warning("udp backend: whole super-packets go through the loops from "
                                "now on: %s", self.fastpath.vxlan_missing)
                hosts = {(str(lease.public_ip), self._config.port): peer.ipv4.network_address
                         for peer, lease in peers().items()
                         if peer.ipv4 is not None and lease.public_ip is not None}
                self.fastpath.greet(own.ipv4.network_address, hosts)
            await asyncio.sleep(HELLO_SECONDS)

    def kept(self) -> dict[str, int]:
        if self.fastpath is None or not self.fastpath.running:
            return {}
        return kept_names(self.fastpath.kept())

    def status(self) -> str:
        return f"udp on {self.fastpath.tun_name}" if self.fastpath else "udp"

    def leave(self) -> None:
        """What --fastpath-pin-dir kept for a next run goes: the pins, the routes file, and the
        TUN's persistence (it goes as the fast path stops)."""
        if self._pins is not None:
            self._pins.forget(None if self._outer6 else self.fastpath)

    def stop(self) -> None:
        if self.fastpath is not None:
            self.fastpath.stop()
            stats = self.fastpath.stats()
            log.info("fast path stopped: %d packets sent, %d received",
                     stats["tx"]["packets"], stats["rx"]["packets"])
