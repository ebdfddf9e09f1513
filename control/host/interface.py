"""The host's network through netlink: finding the external interface, addressing and routing
the TUN.

The calls run on the event loop itself, not in a worker thread: each is one rtnetlink request
(rtnl.py) that the kernel answers before the call returns, made at start-up and when the lease
moves.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from control.host.rtnl import IPAddress, IPNetwork, Link, RtNetlink

BROADCAST = ipaddress.IPv4Address("255.255.255.255")


class HostError(Exception):
    """The host's network is not as pyflanneld needs it; the message says what."""


@dataclass(frozen=True)
class ExternalInterface:
    """flanneld's backend.ExternalInterface. Each family's fields are None while it is off."""

    name: str
    index: int
    address: ipaddress.IPv4Address | None  # IfaceAddr: the UDP socket binds to it
    mtu: int
    ipv6: ipaddress.IPv6Address | None = None  # IfaceV6Addr: vxlan's IPv6 source
    public_ipv6: ipaddress.IPv6Address | None = None  # ExtV6Addr: the lease's PublicIPv6


def _global_unicast(address: IPAddress) -> bool:
    """Go's net.IP.IsGlobalUnicast, which flanneld prefers an interface's addresses by (the
    unique-local and documentation ranges count as global there, unlike Python's is_global)."""
    return not (address.is_unspecified or address.is_loopback or address.is_multicast
                or address.is_link_local or address == BROADCAST)


@dataclass(frozen=True)
class _Choice:
    index: int
    named: dict[int, IPAddress]  # by version: the address the choice was made by
    by_address: bool


class Netlink:
    def __init__(self) -> None:
        self.rtnl = RtNetlink()  # for the backends' own requests

    def external_interface(self, ifaces: list[str], iface_regexes: list[str], *,
                           ipv4: bool = True, ipv6: bool = False,
                           public_ip: ipaddress.IPv4Address | None = None,
                           public_ipv6: ipaddress.IPv6Address | None = None,
                           ipv4_optional: bool = False) -> ExternalInterface:
        """flanneld's LookupExtIface for the families in use (the config's EnableIPv4 and
        EnableIPv6): the first --iface (a name, or an address of a family in use) that exists;
        else the first --iface-regex that matches an address of each family on one interface,
        then a name; else the interface that holds --public-ip, else --public-ipv6; else the
        default route's (in dual-stack the default routes of both families must leave by one
        interface). Each family's address is the one the interface was chosen by, else the
        interface's first global unicast one, else its first link-local one.

        Where flanneld v0.20.2 finds no IPv6 address in dual-stack (an --iface or --public-ip
        of IPv4 without --public-ipv6) or panics (an --iface of IPv6 without it), this finds
        the address of the other family on the same interface; where there is none it says so.
        In IPv6-only, an --iface of IPv6 is the address used, not the interface's first one
        (flannel issue 2045). With `ipv4_optional` (the udp backend, which sends over IPv6
        where the underlay has no IPv4) a dual-stack host whose interface has no IPv4 address
        (nor IPv4 default route) gets address None."""
        versions = [version for version, on in ((4, ipv4), (6, ipv6)) if on]
        if not versions:
            raise HostError("none defined stack")  # flanneld's words
        try:
            links = {link.index: link for link in self.rtnl.links()}
            addresses = {version: self.rtnl.addresses(version) for version in versions}
        except OSError as err:
            raise HostError(f"listing interfaces: {err}") from err

        def holder(address: IPAddress) -> int | None:
            """The interface with the address (only the families in use are listed)."""
            return next((i for i, a in addresses.get(address.version, ()) if a == address),
                        None)

        def preferred(index: int, version: int) -> list[IPAddress]:
            """flanneld's GetInterfaceIP4Addrs/IP6Addrs: global unicast first, then
            link-local; loopback and the rest are no interface's address."""
            own = [a for i, a in addresses[version] if i == index]
            return ([a for a in own if _global_unicast(a)]
                    + [a for a in own if a.is_link_local])

        by_name = {link.name: index for index, link in links.items()}
        choice: _Choice | None = None
        if ifaces:
            for spec in ifaces:
                try:
                    wanted = ipaddress.ip_address(spec)
                except ValueError:
                    if spec in by_name:
                        choice = _Choice(by_name[spec], {}, False)
                        break
                    continue
                index = holder(wanted)
                if index is not None:
                    choice = _Choice(index, {wanted.version: wanted}, True)
                    break
            if choice is None:
                raise HostError(f"no interface matches --iface {', '.join(ifaces)}")
        elif iface_regexes:
            choice = self._by_regex(iface_regexes, links, versions, preferred)
        else:
            for public in (public_ip, public_ipv6):
                index = None if public is None else holder(public)
                if public is not None and index is not None:
                    choice = _Choice(index, {public.version: public}, True)
                    break
            else:
                choice = _Choice(self._default_route_interface(
                    links, versions, ipv4_optional and 6 in versions), {}, False)

        link = links[choice.index]
        named = dict(choice.named)
        if choice.by_address and ipv4 and ipv6 and public_ipv6 is not None:
            # flanneld's dual-stack check: a local --public-ipv6 is the interface's IPv6
            # address, so it must be on the interface that was chosen by address.
            index = holder(public_ipv6)
            if index is not None and index != choice.index:
                raise HostError(f"v6 interface {links[index].name} must be the same with v4 "
                                f"interface {link.name}")
            if index is not None:
                named.setdefault(6, public_ipv6)

        found: dict[int, IPAddress] = {}
        for version in versions:
            candidates = [named[version]] if version in named else preferred(link.index,
                                                                             version)
            if not candidates and version == 4 and ipv4_optional and 6 in versions:
                continue  # an IPv6 underlay: the udp backend's datagrams go over IPv6
            if not candidates:
                raise HostError(f"failed to find IPv{version} address for interface "
                                f"{link.name}")  # flanneld's words
            found[version] = candidates[0]
        address6 = found.get(6)
        return ExternalInterface(link.name, link.index, found.get(4), link.mtu, address6,
                                 (public_ipv6 or address6) if ipv6 else None)

    @staticmethod
    def _by_regex(patterns: list[str], links: dict[int, Link], versions: list[int],
                  preferred: Callable[[int, int], list[IPAddress]]) -> _Choice:
        """flanneld's --iface-regex: for each regex in turn, the first interface with an
        address of each family in use that it matches, else the first whose name it
        matches."""
        for pattern in patterns:
            try:
                regex = re.compile(pattern)
            except re.error as err:
                raise HostError(f"could not compile the IP address regex '{pattern}': "
                                f"{err}") from err  # flanneld's words
            for index in sorted(links):
                matched = {version: next((a for a in preferred(index, version)
                                          if regex.search(str(a))), None)
                           for version in versions}
                if all(matched.values()):
                    return _Choice(index, {v: a for v, a in matched.items() if a}, False)
            for index in sorted(links):
                if regex.search(links[index].name):
                    return _Choice(index, {}, False)
        raise HostError(f"no interface matches --iface-regex {', '.join(patterns)}")

    def _default_route_interface(self, links: dict[int, Link], versions: list[int],
                                 ipv4_optional: bool = False) -> int:
        """The interface of the first default route of each family in use: one interface
        (with ipv4_optional, the IPv6 one's where there is no IPv4 default route)."""
        found: dict[int, int] = {}
        try:
            for version in versions:
                index = next((i for i in self.rtnl.default_route_interfaces(version)
                              if i in links), None)
                if index is None and version == 4 and ipv4_optional:
                    continue
                if index is None:
                    family = "" if version == 4 else "IPv6 "
                    raise HostError(f"no {family}default route to find the external "
                                    "interface: pass --iface")
                found[version] = index
        except OSError as err:
            raise HostError(f"listing routes: {err}") from err
        if len(set(found.values())) > 1:
            raise HostError(f"v6 default route interface {links[found[6]].name} must be the "
                            f"same with v4 default route interface {links[found[4]].name}")
        return found[4] if 4 in found else found[versions[-1]]

    def configure_tun(self, name: str, served: list[tuple[IPNetwork, IPNetwork]],
                      mtu: int) -> None:
        """As flanneld: for each (subnet, network) of `served`, one per family, the subnet's
        address as a /32 (/128) (a source address for host-to-container traffic, with no
        broadcast routes) and a route for the whole network; the MTU, up. A TUN kept from the
        previous run may have all of it already."""
        try:
            index = self._index(name)
            for subnet, _ in served:
                self.rtnl.set_only_address(index, subnet.network_address, subnet.max_prefixlen)
            self.rtnl.set_up(index, mtu)
            for _, network in served:
                self.rtnl.replace_route(network, index)
        except OSError as err:
            raise HostError(f"configuring {name}: {err}") from err

    def readdress_tun(self, name: str, old: IPNetwork, new: IPNetwork) -> None:
        """Move the TUN's /32 (/128) from the old lease to the new one."""
        try:
            index = self._index(name)
            self.rtnl.add_address(index, new.network_address, new.max_prefixlen)
            self.rtnl.delete_address(index, old.network_address, old.max_prefixlen)
        except OSError as err:
            raise HostError(f"readdressing {name}: {err}") from err

    def _index(self, name: str) -> int:
        found = [link.index for link in self.rtnl.links() if link.name == name]
        if not found:
            raise HostError(f"interface {name} does not exist")
        return found[0]

    def close(self) -> None:
        self.rtnl.close()
