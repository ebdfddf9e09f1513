"""The host's network through netlink: finding the external interface, addressing and routing
the TUN.

The calls run on the event loop itself, not in a worker thread: each is one rtnetlink request
(rtnl.py) that the kernel answers before the call returns, made at start-up and when the lease
moves.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from control.host.rtnl import RtNetlink


class HostError(Exception):
    """The host's network is not as pyflanneld needs it; the message says what."""


@dataclass(frozen=True)
class ExternalInterface:
    name: str
    index: int
    address: ipaddress.IPv4Address  # the interface's IPv4 address: the UDP socket binds to it
    mtu: int


class Netlink:
    def __init__(self) -> None:
        self.rtnl = RtNetlink()  # for the backends' own requests

    def external_interface(self, ifaces: list[str], iface_regexes: list[str]
                           ) -> ExternalInterface:
        """flanneld's choice: the first --iface (a name or an IP) that exists; else the first
        --iface-regex that matches an IP, then a name; else the default route's interface."""
        try:
            links = {link.index: link for link in self.rtnl.links()}
            addresses = self.rtnl.ipv4_addresses()
        except OSError as err:
            raise HostError(f"listing interfaces: {err}") from err

        def on(index: int, address: ipaddress.IPv4Address | None = None) -> ExternalInterface:
            link = links[index]
            if address is None:
                address = next((a for i, a in addresses if i == index), None)
                if address is None:
                    raise HostError(f"interface {link.name} has no IPv4 address")
            return ExternalInterface(link.name, index, address, link.mtu)

        by_name = {link.name: index for index, link in links.items()}
        for spec in ifaces:
            try:
                wanted = ipaddress.IPv4Address(spec)
            except ValueError:
                if spec in by_name:
                    return on(by_name[spec])
                continue
            for index, address in addresses:
                if address == wanted:
                    return on(index, address)
        if ifaces:
            raise HostError(f"no interface matches --iface {', '.join(ifaces)}")

        for pattern in iface_regexes:
            regex = re.compile(pattern)
            for index, address in addresses:
                if regex.search(str(address)):
                    return on(index, address)
            for name, index in by_name.items():
                if regex.search(name):
                    return on(index)
        if iface_regexes:
            raise HostError(f"no interface matches --iface-regex {', '.join(iface_regexes)}")

        try:
            default_routes = self.rtnl.default_route_interfaces()
        except OSError as err:
            raise HostError(f"listing routes: {err}") from err
        for index in default_routes:
            if index in links:
                return on(index)
        raise HostError("no default route to find the external interface: pass --iface")

    def configure_tun(self, name: str, subnet: ipaddress.IPv4Network,
                      network: ipaddress.IPv4Network, mtu: int) -> None:
        """As flanneld: the subnet's address as a /32 (a source address for host-to-container
        traffic, with no broadcast routes), the MTU, up, and a route for the whole Network. A
        TUN kept from the previous run may have all of it already."""
        try:
            index = self._index(name)
            self.rtnl.set_only_address(index, subnet.network_address, 32)
            self.rtnl.set_up(index, mtu)
            self.rtnl.replace_route(network, index)
        except OSError as err:
            raise HostError(f"configuring {name}: {err}") from err

    def readdress_tun(self, name: str, old: ipaddress.IPv4Network,
                      new: ipaddress.IPv4Network) -> None:
        """Move the TUN's /32 from the old lease to the new one."""
        try:
            index = self._index(name)
            self.rtnl.add_address(index, new.network_address, 32)
            self.rtnl.delete_address(index, old.network_address, 32)
        except OSError as err:
            raise HostError(f"readdressing {name}: {err}") from err

    def _index(self, name: str) -> int:
        found = [link.index for link in self.rtnl.links() if link.name == name]
        if not found:
            raise HostError(f"interface {name} does not exist")
        return found[0]

    def close(self) -> None:
        self.rtnl.close()
