"""The host's network through netlink: finding the external interface, addressing and routing
the TUN.

Every pyroute2 call runs in one worker thread: pyroute2 0.9's sync IPRoute fails inside a running
event loop and its AsyncIPRoute does not run on uvloop, so the loop hands calls to the thread.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

T = TypeVar("T")


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
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyflanneld-netlink")
        self._ipr: IPRoute | None = None

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, functools.partial(call, *args))

    def _ip(self) -> IPRoute:
        if self._ipr is None:  # created in the worker thread, used only there
            self._ipr = IPRoute()
        return self._ipr

    async def external_interface(self, ifaces: list[str], iface_regexes: list[str]
                                 ) -> ExternalInterface:
        """flanneld's choice: the first --iface (a name or an IP) that exists; else the first
        --iface-regex that matches an IP, then a name; else the default route's interface."""
        return await self._run(self._find_external, ifaces, iface_regexes)

    def _find_external(self, ifaces: list[str], iface_regexes: list[str]) -> ExternalInterface:
        ipr = self._ip()
        links = {link["index"]: (link.get("ifname"), link.get("mtu"))
                 for link in ipr.get_links()}
        addresses = [(a["index"], ipaddress.IPv4Address(a.get("address")))
                     for a in ipr.get_addr(family=socket.AF_INET)]

        def on(index: int, address: ipaddress.IPv4Address | None = None) -> ExternalInterface:
            name, mtu = links[index]
            if address is None:
                address = next((a for i, a in addresses if i == index), None)
                if address is None:
                    raise HostError(f"interface {name} has no IPv4 address")
            return ExternalInterface(name, index, address, mtu)

        by_name = {name: index for index, (name, _) in links.items()}
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

        for route in ipr.get_default_routes(family=socket.AF_INET):
            if route.get("oif") in links:
                return on(route.get("oif"))
        raise HostError("no default route to find the external interface: pass --iface")

    async def configure_tun(self, name: str, subnet: ipaddress.IPv4Network,
                            network: ipaddress.IPv4Network, mtu: int) -> None:
        """As flanneld: the subnet's address as a /32 (a source address for host-to-container
        traffic, with no broadcast routes), the MTU, up, and a route for the whole Network."""
        await self._run(self._configure_tun, name, subnet, network, mtu)

    def _configure_tun(self, name: str, subnet: ipaddress.IPv4Network,
                       network: ipaddress.IPv4Network, mtu: int) -> None:
        ipr = self._ip()
        index = self._index(name)
        try:
            ipr.addr("add", index=index, address=str(subnet.network_address), prefixlen=32)
            ipr.link("set", index=index, mtu=mtu, state="up")
            ipr.route("replace", dst=str(network), oif=index)
        except NetlinkError as err:
            raise HostError(f"configuring {name}: {err}") from err

    async def readdress_tun(self, name: str, old: ipaddress.IPv4Network,
                            new: ipaddress.IPv4Network) -> None:
        """Move the TUN's /32 from the old lease to the new one."""
        await self._run(self._readdress_tun, name, old, new)

    def _readdress_tun(self, name: str, old: ipaddress.IPv4Network,
                       new: ipaddress.IPv4Network) -> None:
        ipr = self._ip()
        index = self._index(name)
        try:
            ipr.addr("add", index=index, address=str(new.network_address), prefixlen=32)
            ipr.addr("del", index=index, address=str(old.network_address), prefixlen=32)
        except NetlinkError as err:
            raise HostError(f"readdressing {name}: {err}") from err

    def _index(self, name: str) -> int:
        found = self._ip().link_lookup(ifname=name)
        if not found:
            raise HostError(f"interface {name} does not exist")
        return found[0]

    async def close(self) -> None:
        if self._ipr is not None:
            await self._run(self._ipr.close)
        self._worker.shutdown(wait=True)
