"""control.host.interface's external interface for IPv6-only and dual-stack configs, on hosts of
the namespace testbed with real interfaces, addresses (the underlay's IPv6 from 2001:db8::/32)
and default routes: one test per case of flanneld v0.20.2's LookupExtIface, each next to what
flanneld itself (../shared/reference/) logs on the same host, where it runs the case; where it
finds no IPv6 address or panics, pyflannel finds both addresses or says why not (issue 30)."""

from __future__ import annotations

import ipaddress
import os
import re
import time
from dataclasses import dataclass

import pytest

from control.host.interface import ExternalInterface, HostError, Netlink
from tests.cluster import PREFIX, put_config
from tests.etcd import EtcdServer
from tests.flanneld import REFERENCE_FLANNELD, RealFlanneld
from tests.testbed import Host, Testbed, inside

IPV6_ONLY_PREFIX = "/ipv6-only/network"
DUAL_CONFIG = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fc00::/48",
               "Backend": {"Type": "udp"}}
IPV6_ONLY_CONFIG = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fc00::/48",
                    "Backend": {"Type": "udp"}}
FLANNELD_SECONDS = 15.0


@dataclass
class Setup:
    bed: Testbed
    etcd: EtcdServer
    host: Host
    ipv4: ipaddress.IPv4Address  # eth0's
    ipv6: ipaddress.IPv6Address  # eth0's, from the underlay's 2001:db8::/64

    def other(self, name: str, *addresses: str) -> None:
        """Another interface, up, with only the given addresses (no automatic link-local): one
        end of a veth pair whose other end, up too, has no address."""
        self.host.ip("link", "add", name, "type", "veth", "peer", "name", f"{name}p")
        for device in (name, f"{name}p"):
            self.host.ip("link", "set", device, "addrgenmode", "none")
        for address in addresses:
            family = "-6" if ":" in address else "-4"
            self.host.ip(family, "addr", "add", address, "dev", name, "nodad")
        for device in (name, f"{name}p"):
            self.host.ip("link", "set", device, "up")


@pytest.fixture(scope="module")
def etcd_with_configs(bed_and_etcd: tuple[Testbed, EtcdServer]
                      ) -> tuple[Testbed, EtcdServer]:
    bed, etcd = bed_and_etcd
    put_config(etcd, "v3", DUAL_CONFIG)
    put_config(etcd, "v3", IPV6_ONLY_CONFIG, IPV6_ONLY_PREFIX)
    return bed, etcd


@pytest.fixture
def setup(etcd_with_configs: tuple[Testbed, EtcdServer]) -> Setup:
    """A fresh host: eth0 with its underlay IPv4 and an IPv6 of 2001:db8::/64, no default
    route."""
    bed, etcd = etcd_with_configs
    host = bed.add_host()
    ipv6 = ipaddress.IPv6Address(f"2001:db8::{len(bed.hosts)}")
    host.ip("-6", "addr", "add", f"{ipv6}/64", "dev", "eth0", "nodad")
    return Setup(bed, etcd, host, ipaddress.IPv4Address(host.underlay_ip), ipv6)


def detect(setup: Setup, ifaces: tuple[str, ...] = (), regexes: tuple[str, ...] = (), *,
           ipv4: bool = True, public_ip: str | None = None, public_ipv6: str | None = None,
           ipv4_optional: bool = False) -> ExternalInterface:
    with inside(setup.host.netns):
        netlink = Netlink()
    try:
        return netlink.external_interface(
            list(ifaces), list(regexes), ipv4=ipv4, ipv6=True,
            public_ip=None if public_ip is None else ipaddress.IPv4Address(public_ip),
            public_ipv6=None if public_ipv6 is None else ipaddress.IPv6Address(public_ipv6),
            ipv4_optional=ipv4_optional)
    finally:
        netlink.close()


@dataclass
class FlanneldSaw:
    """What flanneld logged of its LookupExtIface."""

    name: str | None = None
    address: str | None = None
    ipv6: str | None = None
    public_ipv6: str | None = None
    error: str | None = None
    panicked: bool = False
    log: str = ""


def flanneld_detects(setup: Setup, *flags: str, ipv4: bool = True) -> FlanneldSaw:
    """Run flanneld with `flags` (and no --iface but these) on the host's dual-stack (or
    IPv6-only) config until it runs its backend or exits, then read its log. flanneld runs
    after pyflannel's detection: what it leaves on the host (flannel0) is no interface to find."""
    if not os.path.exists(REFERENCE_FLANNELD):
        pytest.skip(f"no reference flanneld at {REFERENCE_FLANNELD}")
    daemon = RealFlanneld(REFERENCE_FLANNELD, setup.bed, setup.host, setup.etcd)
    daemon.command.remove("--iface=eth0")
    daemon.command += [*flags, f"--etcd-prefix={PREFIX if ipv4 else IPV6_ONLY_PREFIX}"]
    daemon.start()
    try:
        deadline = time.monotonic() + FLANNELD_SECONDS
        while "Running backend." not in daemon.log() and daemon.process is not None \
                and daemon.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        daemon.stop()
    log = daemon.log()
    saw = FlanneldSaw(panicked="panic:" in log, log=log)
    if found := re.search(r"Using interface with name (\S+) and address (\S+)", log):
        saw.name, saw.address = found.groups()
    if found := re.search(r"Using interface with name (\S+) and v6 address (\S+)", log):
        saw.name, saw.ipv6 = found.groups()
    if found := re.search(r"Using (\S*:\S*) as external address", log):
        saw.public_ipv6 = found.group(1)
    elif found := re.search(r"Defaulting external v6 address to interface address \((\S+)\)",
                            log):
        saw.public_ipv6 = None if found.group(1) == "<nil>" else found.group(1)
    if found := re.search(r"Failed to find any valid interface to use: (.*)", log):
        saw.error = found.group(1)
    return saw


def found_as_flanneld(ext: ExternalInterface, saw: FlanneldSaw) -> None:
    assert (ext.name, ext.address and str(ext.address), str(ext.ipv6), str(ext.public_ipv6)) \
        == (saw.name, saw.address, saw.ipv6, saw.public_ipv6)


def default_routes(setup: Setup, ipv6_device: str = "eth0") -> None:
    setup.host.ip("route", "add", "default", "via", "198.18.0.254", "dev", "eth0")
    setup.host.ip("-6", "route", "add", "default", "dev", ipv6_device)


def test_dual_stack_default_routes_on_one_interface(setup: Setup) -> None:
    default_routes(setup)
    ext = detect(setup)
    assert (ext.name, ext.address, ext.ipv6, ext.public_ipv6) == \
        ("eth0", setup.ipv4, setup.ipv6, setup.ipv6)
    found_as_flanneld(ext, flanneld_detects(setup))


def test_dual_stack_default_routes_on_two_interfaces_is_flanneld_s_error(
        setup: Setup) -> None:
    setup.other("oth0", "2001:db8:1::1/64")
    default_routes(setup, ipv6_device="oth0")
    message = "v6 default route interface oth0 must be the same with v4 default route " \
              "interface eth0"
    with pytest.raises(HostError) as raised:
        detect(setup)
    assert str(raised.value) == message
    assert flanneld_detects(setup).error == message


def test_no_ipv6_default_route(setup: Setup) -> None:
    setup.host.ip("route", "add", "default", "via", "198.18.0.254", "dev", "eth0")
    with pytest.raises(HostError, match="^no IPv6 default route to find the external "
                                        "interface: pass --iface$"):
        detect(setup)


def test_iface_ipv4_with_public_ipv6_on_the_same_interface(setup: Setup) -> None:
    ext = detect(setup, (str(setup.ipv4),), public_ipv6=str(setup.ipv6))
    assert (ext.name, ext.address, ext.ipv6, ext.public_ipv6) == \
        ("eth0", setup.ipv4, setup.ipv6, setup.ipv6)
    found_as_flanneld(ext, flanneld_detects(setup, f"--iface={setup.ipv4}",
                                            f"--public-ipv6={setup.ipv6}"))


def test_iface_ipv4_with_public_ipv6_elsewhere_is_flanneld_s_error(setup: Setup) -> None:
    setup.other("oth0", "2001:db8:1::1/64")
    message = "v6 interface oth0 must be the same with v4 interface eth0"
    with pytest.raises(HostError) as raised:
        detect(setup, (str(setup.ipv4),), public_ipv6="2001:db8:1::1")
    assert str(raised.value) == message
    saw = flanneld_detects(setup, f"--iface={setup.ipv4}", "--public-ipv6=2001:db8:1::1")
    # flanneld tries each --iface and then says none would do, having logged why.
    assert saw.name is None and message in saw.log


def test_iface_ipv4_alone_finds_the_ipv6_address_too(setup: Setup) -> None:
    ext = detect(setup, (str(setup.ipv4),))
    assert (ext.name, ext.address, ext.ipv6, ext.public_ipv6) == \
        ("eth0", setup.ipv4, setup.ipv6, setup.ipv6)
    # flanneld v0.20.2 finds no IPv6 address here (fixed upstream in v0.27.4).
    saw = flanneld_detects(setup, f"--iface={setup.ipv4}")
    assert (saw.name, saw.address, saw.ipv6, saw.public_ipv6) == \
        ("eth0", str(setup.ipv4), None, None)


def test_public_ip_alone_finds_the_ipv6_address_too(setup: Setup) -> None:
    ext = detect(setup, public_ip=str(setup.ipv4))
    assert (ext.name, ext.address, ext.ipv6, ext.public_ipv6) == \
        ("eth0", setup.ipv4, setup.ipv6, setup.ipv6)
    saw = flanneld_detects(setup, f"--public-ip={setup.ipv4}")
    assert (saw.name, saw.address, saw.ipv6, saw.public_ipv6) == \
        ("eth0", str(setup.ipv4), None, None)


def test_iface_ipv6_alone_finds_the_ipv4_address_too(setup: Setup) -> None:
    ext = detect(setup, (str(setup.ipv6),))
    assert (ext.name, ext.address, ext.ipv6, ext.public_ipv6) == \
        ("eth0", setup.ipv4, setup.ipv6, setup.ipv6)
    saw = flanneld_detects(setup, f"--iface={setup.ipv6}")
    assert saw.panicked and saw.name is None  # a nil interface


def test_iface_ipv6_on_an_interface_without_ipv4_says_so(setup: Setup) -> None:
    setup.other("oth0", "2001:db8:1::1/64")
    with pytest.raises(HostError) as raised:
        detect(setup, ("2001:db8:1::1",))
    assert str(raised.value) == "failed to find IPv4 address for interface oth0"


def test_an_interface_without_ipv4_serves_the_udp_backend_over_ipv6(setup: Setup) -> None:
    """ipv4_optional (the udp backend, which then sends over IPv6): no IPv4 address, by
    --iface or by the IPv6 default route alone, is address None, not an error."""
    setup.other("oth0", "2001:db8:1::1/64")
    ext = detect(setup, ("2001:db8:1::1",), ipv4_optional=True)
    assert (ext.name, ext.address, str(ext.ipv6), str(ext.public_ipv6)) == \
        ("oth0", None, "2001:db8:1::1", "2001:db8:1::1")
    ext = detect(setup, ("oth0",), ipv4_optional=True)
    assert (ext.name, ext.address, str(ext.ipv6)) == ("oth0", None, "2001:db8:1::1")
    setup.host.ip("-6", "route", "add", "default", "dev", "oth0")
    ext = detect(setup, ipv4_optional=True)
    assert (ext.name, ext.address, str(ext.ipv6)) == ("oth0", None, "2001:db8:1::1")
    with pytest.raises(HostError, match="^no default route"):
        detect(setup)


def test_public_ipv6_alone_finds_the_ipv4_address_too(setup: Setup) -> None:
    setup.other("oth0", "192.0.2.1/24", "2001:db8:1::1/64")
    ext = detect(setup, public_ipv6="2001:db8:1::1")
    assert (ext.name, str(ext.address), str(ext.ipv6), str(ext.public_ipv6)) == \
        ("oth0", "192.0.2.1", "2001:db8:1::1", "2001:db8:1::1")
    # flanneld finds the interface by --public-ipv6 and then no IPv4 address.
    saw = flanneld_detects(setup, "--public-ipv6=2001:db8:1::1")
    assert (saw.name, saw.address, saw.ipv6) == ("oth0", None, "2001:db8:1::1")


def test_iface_regex_matches_an_address_of_each_family_on_one_interface(
        setup: Setup) -> None:
    # oth0 comes after eth0 and matches for IPv6 only; eth0 matches both.
    setup.other("oth0", "2001:db8:1::1/64")
    ext = detect(setup, regexes=(r"^(198\.18\.|2001:db8:)",))
    assert (ext.name, ext.address, ext.ipv6) == ("eth0", setup.ipv4, setup.ipv6)
    found_as_flanneld(ext, flanneld_detects(setup, r"--iface-regex=^(198\.18\.|2001:db8:)"))
    # Only oth0's IPv6 matches: no interface has both, and no name matches.
    with pytest.raises(HostError, match="no interface matches --iface-regex"):
        detect(setup, regexes=(r"^2001:db8:1::",))


def test_ipv6_only_default_route(setup: Setup) -> None:
    setup.host.ip("-6", "route", "add", "default", "dev", "eth0")
    ext = detect(setup, ipv4=False)
    assert (ext.name, ext.address, ext.ipv6, ext.public_ipv6) == \
        ("eth0", None, setup.ipv6, setup.ipv6)
    found_as_flanneld(ext, flanneld_detects(setup, ipv4=False))


def test_ipv6_only_global_unicast_before_link_local(setup: Setup) -> None:
    setup.other("oth0", "fe80::1/64", "fd00:1::1/64")
    ext = detect(setup, ("oth0",), ipv4=False)
    assert (ext.ipv6, ext.public_ipv6) == (ipaddress.IPv6Address("fd00:1::1"),) * 2
    found_as_flanneld(ext, flanneld_detects(setup, "--iface=oth0", ipv4=False))
    setup.host.ip("-6", "addr", "del", "fd00:1::1/64", "dev", "oth0")
    assert detect(setup, ("oth0",), ipv4=False).ipv6 == ipaddress.IPv6Address("fe80::1")


def test_ipv6_only_iface_address_is_the_one_used(setup: Setup) -> None:
    second = ipaddress.IPv6Address(f"2001:db8::100:{len(setup.bed.hosts)}")
    setup.host.ip("-6", "addr", "add", f"{second}/64", "dev", "eth0", "nodad")
    first = detect(setup, ("eth0",), ipv4=False).ipv6
    assert first in (setup.ipv6, second)
    other = second if first == setup.ipv6 else setup.ipv6
    assert detect(setup, (str(other),), ipv4=False).ipv6 == other
    # flanneld takes the interface's first IPv6 address whichever was given (flannel 2045).
    assert flanneld_detects(setup, f"--iface={other}", ipv4=False).ipv6 == str(first)
