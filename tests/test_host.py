"""control.host.interface's netlink in a test host's namespace: the external interface by each of
flanneld's rules, and the TUN's address, MTU, state and route (on a TUN of its own here)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from control.host.interface import HostError, Netlink
from tests.testbed import Host, Testbed, inside

NETWORK = ipaddress.IPv4Network("10.244.0.0/16")
SUBNET = ipaddress.IPv4Network("10.244.3.0/24")
MOVED = ipaddress.IPv4Network("10.244.9.0/24")
NETWORK6 = ipaddress.IPv6Network("fd00::/48")
SUBNET6 = ipaddress.IPv6Network("fd00:0:0:3::/64")
MOVED6 = ipaddress.IPv6Network("fd00:0:0:9::/64")


@pytest.fixture
def host(testbed: Testbed) -> Host:
    host = testbed.add_host()
    host.ip("tuntap", "add", "dev", "tun0", "mode", "tun")
    host.ip("link", "set", "eth0", "mtu", "1400")
    return host


@pytest.fixture
def netlink(host: Host) -> Iterator[Netlink]:
    with inside(host.netns):  # the netlink socket stays in this namespace
        netlink = Netlink()
    try:
        yield netlink
    finally:
        netlink.close()


def test_external_interface_by_name_address_regex_and_default_route(
        host: Host, netlink: Netlink) -> None:
    host.ip("link", "set", "tun0", "up")
    # On a point-to-point address, this end's address is the interface's, not the peer's.
    host.ip("addr", "add", "192.0.2.1", "peer", "192.0.2.2", "dev", "tun0")
    eth0 = netlink.external_interface(["eth0"], [])
    assert (eth0.name, str(eth0.address), eth0.mtu) == ("eth0", host.underlay_ip, 1400)
    assert netlink.external_interface(["192.0.2.1"], []).name == "tun0"
    assert netlink.external_interface(["nosuch0", "tun0"], []).name == "tun0"
    assert netlink.external_interface([], [r"^192\.0\.2\."]).name == "tun0"
    assert netlink.external_interface([], ["^tun"]).name == "tun0"
    with pytest.raises(HostError, match="no default route"):
        netlink.external_interface([], [])
    host.ip("route", "add", "default", "dev", "tun0", "table", "100")  # not the main table
    with pytest.raises(HostError, match="no default route"):
        netlink.external_interface([], [])
    host.ip("route", "add", "default", "via", "198.18.0.254", "dev", "eth0")
    assert netlink.external_interface([], []) == eth0


def test_tun_is_addressed_routed_and_readdressed_as_flanneld_does(
        host: Host, netlink: Netlink) -> None:
    served = [(SUBNET, NETWORK), (SUBNET6, NETWORK6)]
    netlink.configure_tun("tun0", served, 1372)
    assert "inet 10.244.3.0/32 scope global tun0" in host.ip("-4", "addr", "show", "tun0").stdout
    assert "inet6 fd00:0:0:3::/128 scope global" in host.ip("-6", "addr", "show", "tun0").stdout
    link = host.ip("link", "show", "tun0").stdout
    assert "mtu 1372" in link and ",UP" in link
    routes = host.ip("-d", "route", "show", "dev", "tun0").stdout
    assert "unicast 10.244.0.0/16 proto boot scope global" in routes  # as flanneld's
    assert "unicast fd00::/48 proto boot" in host.ip("-6", "-d", "route", "show", "dev",
                                                     "tun0").stdout
    # Again, as on a TUN kept from the previous run: nothing doubles.
    netlink.configure_tun("tun0", served, 1372)
    assert host.ip("-4", "-o", "addr", "show", "tun0").stdout.count("inet ") == 1
    assert host.ip("route", "show", "dev", "tun0").stdout.count("10.244.0.0/16") == 1
    assert host.ip("-6", "route", "show", "dev", "tun0").stdout.count("fd00::/48") == 1

    netlink.readdress_tun("tun0", SUBNET, MOVED)
    netlink.readdress_tun("tun0", SUBNET6, MOVED6)
    addresses = host.ip("addr", "show", "tun0").stdout
    assert "10.244.9.0/32" in addresses and "10.244.3.0" not in addresses
    assert "fd00:0:0:9::/128" in addresses and "fd00:0:0:3::" not in addresses
    with pytest.raises(HostError, match="interface nosuch0 does not exist"):
        netlink.configure_tun("nosuch0", served, 1372)


def test_external_interface_as_flanneld_picks_ipv4_addresses(host: Host, netlink: Netlink
                                                            ) -> None:
    """A global address before a link-local one (whatever their order), loopback none; with
    no --iface, the interface that holds --public-ip, not the default route's."""
    host.ip("link", "set", "tun0", "up")
    host.ip("addr", "add", "169.254.0.1/16", "dev", "tun0")
    host.ip("addr", "add", "192.0.2.1/24", "dev", "tun0")
    assert netlink.external_interface(["tun0"], []).address == ipaddress.IPv4Address("192.0.2.1")
    host.ip("addr", "del", "192.0.2.1/24", "dev", "tun0")
    assert netlink.external_interface(["tun0"], []).address == \
        ipaddress.IPv4Address("169.254.0.1")
    with pytest.raises(HostError, match="^failed to find IPv4 address for interface lo$"):
        netlink.external_interface(["lo"], [])
    assert netlink.external_interface(["127.0.0.1"], []).name == "lo"  # named: taken as is
    host.ip("route", "add", "default", "via", "198.18.0.254", "dev", "eth0")
    ext = netlink.external_interface([], [], public_ip=ipaddress.IPv4Address("169.254.0.1"))
    assert (ext.name, ext.ipv6, ext.public_ipv6) == ("tun0", None, None)
    # A --public-ip that is no local address (behind NAT): the default route's interface.
    ext = netlink.external_interface([], [], public_ip=ipaddress.IPv4Address("203.0.113.9"))
    assert ext.name == "eth0"
    with pytest.raises(HostError, match="^none defined stack$"):
        netlink.external_interface([], [], ipv4=False, ipv6=False)
