"""control.host.rtnl against the real kernel, in a test host's namespace, for what flanneld's vxlan
and host-gw backends do: a vxlan link made as flanneld makes flannel.1, routes through a gateway
(onlink on the vxlan link, plain on the underlay), permanent neighbours and fdb entries. Each
result is checked twice: with rtnl's own readers and with iproute2 (`ip -d link`, `ip route`,
`ip neigh`, `bridge fdb`), which parses the kernel's answers independently.

The remote hosts here (198.18.0.12 and .13) are addresses on the test underlay that no namespace
has; nothing is sent to them: every entry is permanent, so the kernel never resolves one.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import re
from collections.abc import Iterator

import pytest

from control.host.rtnl import RtNetlink, VxlanLink, format_mac, parse_mac
from tests.testbed import Host, Testbed, inside

VNI = 1
PORT = 8472
VXLAN_MTU = 1450  # the underlay's 1500 less vxlan's 50 bytes, as flanneld sets it
REMOTE_SUBNET = ipaddress.IPv4Network("10.244.64.0/24")
REMOTE_GATEWAY = REMOTE_SUBNET.network_address  # flanneld routes through the subnet's address
REMOTE_MAC = "1a:fd:f4:c0:3d:3b"  # the remote flannel.1's MAC
MOVED_MAC = "1a:fd:f4:c0:3d:3c"
REMOTE_HOST = ipaddress.IPv4Address("198.18.0.12")
MOVED_HOST = ipaddress.IPv4Address("198.18.0.13")
HOST_GW_SUBNET = ipaddress.IPv4Network("10.244.2.0/24")
MAC_PATTERN = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def ip_json(host: Host, *args: str) -> list[dict]:
    return json.loads(host.ip("-j", *args).stdout or "[]")


def link_json(host: Host, name: str) -> dict:
    (link,) = ip_json(host, "-d", "link", "show", name)
    return link


def index_of(host: Host, name: str) -> int:
    return link_json(host, name)["ifindex"]


def fdb_json(host: Host, dev: str) -> list[dict]:
    output = host.run("bridge", "-j", "fdb", "show", "dev", dev).stdout
    return [entry for entry in json.loads(output or "[]") if "dst" in entry]


@pytest.fixture
def host(testbed: Testbed) -> Host:
    """A fresh namespace per test: eth0 on the underlay, 198.18.0.N/24, MTU 1500. The testbed
    deletes it, and with it every link, route and entry a test made, even if the test fails."""
    return testbed.add_host()


@pytest.fixture
def rtnl(host: Host) -> Iterator[RtNetlink]:
    with inside(host.netns):  # the socket stays in this namespace
        rtnl = RtNetlink()
    try:
        yield rtnl
    finally:
        rtnl.close()  # else the open socket would keep the namespace alive


@pytest.fixture
def eth0(host: Host) -> int:
    return index_of(host, "eth0")


@pytest.fixture
def flannel(host: Host, rtnl: RtNetlink, eth0: int) -> Iterator[int]:
    """flannel.1 as flanneld makes it: `ip link add flannel.1 mtu 1450 txqlen 0 type vxlan id 1
    local <eth0's address> dev eth0 dstport 8472 nolearning`. Its index."""
    index = rtnl.add_vxlan("flannel.1", VNI, ipaddress.IPv4Address(host.underlay_ip), eth0,
                           PORT, learning=False, gbp=False, mtu=VXLAN_MTU)
    try:
        yield index
    finally:
        host.ip("link", "del", "flannel.1", check=False)  # if the test has not deleted it


def test_vxlan_made_like_flanneld_reads_back_field_by_field(
        host: Host, rtnl: RtNetlink, eth0: int, flannel: int) -> None:
    shown = link_json(host, "flannel.1")
    data = shown["linkinfo"]["info_data"]
    assert shown["linkinfo"]["info_kind"] == "vxlan"
    assert (data["id"], data["local"], data["link"], data["port"], data["learning"]) == (
        VNI, host.underlay_ip, "eth0", PORT, False)
    assert "gbp" not in data
    assert (shown["ifindex"], shown["mtu"], "UP" in shown["flags"]) == (flannel, VXLAN_MTU, False)
    # flanneld's txqlen, 0, which iproute2 leaves out (`ip link add` would make 1000).
    assert "txqlen" not in shown
    assert host.run("cat", "/sys/class/net/flannel.1/tx_queue_len").stdout == "0\n"
    text = host.ip("-d", "link", "show", "flannel.1").stdout
    assert f"vxlan id 1 local {host.underlay_ip} dev eth0 " in text
    assert "dstport 8472 nolearning" in text

    link = rtnl.vxlan("flannel.1")
    assert link == VxlanLink(index=flannel, name="flannel.1", mtu=VXLAN_MTU, mac=shown["address"],
                             up=False, vni=VNI, local=ipaddress.IPv4Address(host.underlay_ip),
                             link=eth0, port=PORT, learning=False, gbp=False)
    assert MAC_PATTERN.match(link.mac) and link.mac != "00:00:00:00:00:00"

    rtnl.set_up(flannel, VXLAN_MTU)
    up = rtnl.vxlan("flannel.1")
    assert up is not None and up.up
    assert "UP" in link_json(host, "flannel.1")["flags"]

    assert rtnl.link_kind(flannel) == "vxlan"
    assert rtnl.link_kind(eth0) == "veth"
    assert rtnl.link_kind(index_of(host, "lo")) is None
    with pytest.raises(OSError) as missing:
        rtnl.link_kind(1 << 30)
    assert missing.value.errno == errno.ENODEV


def test_fixed_mac_gbp_learning_and_the_kernels_defaults(
        host: Host, rtnl: RtNetlink, eth0: int) -> None:
    local = ipaddress.IPv4Address(host.underlay_ip)
    with open("/sys/module/vxlan/parameters/udp_port") as f:
        default_port = int(f.read())
    try:
        index = rtnl.add_vxlan("vx4096", 4096, local, eth0, 0, learning=True, gbp=True,
                               mtu=None, mac="0A:BB:CC:00:00:01")
        link = rtnl.vxlan("vx4096")
        assert link == VxlanLink(index=index, name="vx4096", mtu=VXLAN_MTU,
                                 mac="0a:bb:cc:00:00:01", up=False, vni=4096, local=local,
                                 link=eth0, port=default_port, learning=True, gbp=True)
        shown = link_json(host, "vx4096")
        data = shown["linkinfo"]["info_data"]
        assert (shown["address"], shown["mtu"], data["id"], data["port"]) == (
            "0a:bb:cc:00:00:01", VXLAN_MTU, 4096, default_port)
        assert data["learning"] is True and data["gbp"] is True

        # Without an underlay the kernel reports no IFLA_VXLAN_LINK and a 1500 MTU.
        bare = rtnl.add_vxlan("vxbare", 7, local, 0, 4789, learning=False, gbp=False, mtu=None)
        assert rtnl.vxlan("vxbare") == VxlanLink(
            index=bare, name="vxbare", mtu=1500, mac=link_json(host, "vxbare")["address"],
            up=False, vni=7, local=local, link=0, port=4789, learning=False, gbp=False)
        assert "link" not in link_json(host, "vxbare")["linkinfo"]["info_data"]

        # A malformed MAC is refused before anything is asked of the kernel.
        with pytest.raises(ValueError, match="not a MAC address"):
            rtnl.add_vxlan("vxbad", 8, local, eth0, PORT, False, False, None, mac="0a:bb:cc")
        assert rtnl.vxlan("vxbad") is None
    finally:
        for name in ("vx4096", "vxbare", "vxbad"):
            host.ip("link", "del", name, check=False)


def test_lookup_of_missing_and_non_vxlan_links_duplicates_and_delete(
        host: Host, rtnl: RtNetlink, eth0: int, flannel: int) -> None:
    assert rtnl.vxlan("nosuch0") is None
    with pytest.raises(ValueError, match="^eth0 exists and is not a vxlan device$"):
        rtnl.vxlan("eth0")
    with pytest.raises(OSError) as duplicate:
        rtnl.add_vxlan("flannel.1", VNI, ipaddress.IPv4Address(host.underlay_ip), eth0, PORT,
                       learning=False, gbp=False, mtu=VXLAN_MTU)
    assert duplicate.value.errno == errno.EEXIST
    assert rtnl.vxlan("flannel.1").index == flannel  # the first one, untouched

    rtnl.delete_link(flannel)
    assert rtnl.vxlan("flannel.1") is None
    assert host.ip("link", "show", "flannel.1", check=False).returncode != 0
    with pytest.raises(OSError) as gone:
        rtnl.delete_link(flannel)
    assert gone.value.errno == errno.ENODEV
    assert rtnl.link_kind(eth0) == "veth"  # the underlay is still there


def test_vxlan_onlink_routes_are_replaced_listed_and_deleted(
        host: Host, rtnl: RtNetlink, flannel: int) -> None:
    rtnl.set_up(flannel, VXLAN_MTU)
    # The remote subnet's address is on no link here: only onlink makes it a usable gateway.
    with pytest.raises(OSError) as unreachable:
        rtnl.replace_route(REMOTE_SUBNET, flannel, REMOTE_GATEWAY)
    assert unreachable.value.errno == errno.ENETUNREACH

    for _ in range(2):  # replacing is idempotent
        rtnl.replace_route(REMOTE_SUBNET, flannel, REMOTE_GATEWAY, onlink=True)
    # Protocol boot, as flanneld's routes: iproute2 names it only with -d.
    assert ip_json(host, "route", "show", "dev", "flannel.1") == [
        {"dst": str(REMOTE_SUBNET), "gateway": str(REMOTE_GATEWAY), "flags": ["onlink"]}]
    assert ip_json(host, "-d", "route", "show", "dev", "flannel.1")[0]["protocol"] == "boot"
    assert rtnl.routes(flannel) == [(REMOTE_SUBNET, REMOTE_GATEWAY)]

    moved = REMOTE_GATEWAY + 1
    rtnl.replace_route(REMOTE_SUBNET, flannel, moved, onlink=True)
    assert rtnl.routes(flannel) == [(REMOTE_SUBNET, moved)]
    assert [r["gateway"] for r in ip_json(host, "route", "show", "dev", "flannel.1")] == [
        str(moved)]

    # Without a gateway the route is as before this extension: the udp backend's.
    network = ipaddress.IPv4Network("10.244.0.0/16")
    rtnl.replace_route(network, flannel)
    assert "unicast 10.244.0.0/16 proto boot scope global" in host.ip(
        "-d", "route", "show", "dev", "flannel.1").stdout
    assert sorted(rtnl.routes(flannel)) == [(network, None), (REMOTE_SUBNET, moved)]

    with pytest.raises(OSError) as wrong_gateway:
        rtnl.delete_route(REMOTE_SUBNET, flannel, REMOTE_GATEWAY)
    assert wrong_gateway.value.errno == errno.ESRCH
    rtnl.delete_route(REMOTE_SUBNET, flannel, moved)
    rtnl.delete_route(network, flannel)
    assert rtnl.routes(flannel) == []
    assert ip_json(host, "route", "show", "dev", "flannel.1") == []
    with pytest.raises(OSError) as gone:
        rtnl.delete_route(REMOTE_SUBNET, flannel)
    assert gone.value.errno == errno.ESRCH


def test_host_gw_routes_and_the_default_route_on_the_underlay(
        host: Host, rtnl: RtNetlink, eth0: int) -> None:
    underlay = ipaddress.IPv4Network(f"{host.underlay_ip}/24", strict=False)
    default_gateway = ipaddress.IPv4Address("198.18.0.254")
    try:
        for _ in range(2):
            rtnl.replace_route(HOST_GW_SUBNET, eth0, REMOTE_HOST)
        assert f"{HOST_GW_SUBNET} via {REMOTE_HOST} proto boot " in host.ip(
            "-d", "route", "show", "dev", "eth0").stdout
        host.ip("route", "add", "default", "via", str(default_gateway), "dev", "eth0")
        host.ip("route", "add", "10.9.0.0/16", "dev", "eth0", "table", "100")  # not main
        expected = [(ipaddress.IPv4Network("0.0.0.0/0"), default_gateway),
                    (HOST_GW_SUBNET, REMOTE_HOST), (underlay, None)]
        assert sorted(rtnl.routes(eth0)) == expected
        assert sorted((r["dst"], r.get("gateway")) for r in ip_json(
            host, "route", "show", "dev", "eth0")) == sorted(
            ("default" if d.prefixlen == 0 else str(d), g and str(g)) for d, g in expected)

        rtnl.delete_route(HOST_GW_SUBNET, eth0)  # no gateway given: any
        assert (HOST_GW_SUBNET, REMOTE_HOST) not in rtnl.routes(eth0)
        assert str(HOST_GW_SUBNET) not in host.ip("route", "show", "dev", "eth0").stdout

        # A route that another protocol made (`ip route`'s default, static) is deleted too:
        # a delete matches any protocol, scope and type.
        left = ipaddress.IPv4Network("10.244.3.0/24")
        host.ip("route", "add", str(left), "via", str(MOVED_HOST), "dev", "eth0", "proto",
                "static")
        assert (left, MOVED_HOST) in rtnl.routes(eth0)
        rtnl.delete_route(left, eth0, MOVED_HOST)
        assert (left, MOVED_HOST) not in rtnl.routes(eth0)
        assert str(left) not in host.ip("route", "show", "dev", "eth0").stdout
    finally:
        host.ip("route", "del", str(HOST_GW_SUBNET), check=False)
        host.ip("route", "del", "10.244.3.0/24", check=False)
        host.ip("route", "del", "default", check=False)
        host.ip("route", "del", "10.9.0.0/16", "table", "100", check=False)


def test_ipv6_routes_and_addresses_are_left_out(host: Host, rtnl: RtNetlink, eth0: int) -> None:
    """Every request names its family: a route dump of family 0 would list IPv6 routes too
    (pyroute2's rtmsg() alone would say AF_INET, its ndmsg and ifaddrmsg 0)."""
    if host.run("cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6").stdout.strip() != "0":
        pytest.skip("IPv6 is off in the test namespace")
    host.ip("-6", "address", "add", "2001:db8:1::1/64", "dev", "eth0", "nodad")
    host.ip("-6", "route", "add", "default", "via", "2001:db8:1::fe", "dev", "eth0")
    host.ip("-6", "route", "add", "2001:db8:2::/64", "via", "2001:db8:1::2", "dev", "eth0")
    underlay = ipaddress.IPv4Network(f"{host.underlay_ip}/24", strict=False)
    assert rtnl.routes(eth0) == [(underlay, None)]
    assert eth0 not in rtnl.default_route_interfaces()
    assert [a for i, a in rtnl.addresses() if i == eth0] == [
        ipaddress.IPv4Address(host.underlay_ip)]
    assert "2001:db8:2::/64" in host.ip("-6", "route", "show", "dev", "eth0").stdout

def test_permanent_neighbours_are_replaced_listed_and_deleted(
        host: Host, rtnl: RtNetlink, eth0: int, flannel: int) -> None:
    rtnl.set_up(flannel, VXLAN_MTU)  # a link going down flushes even permanent entries
    for _ in range(2):
        rtnl.replace_neigh(flannel, REMOTE_GATEWAY, REMOTE_MAC.upper())
    assert ip_json(host, "neigh", "show", "dev", "flannel.1") == [
        {"dst": str(REMOTE_GATEWAY), "lladdr": REMOTE_MAC, "state": ["PERMANENT"]}]
    assert rtnl.neighbours(flannel) == [(REMOTE_GATEWAY, REMOTE_MAC)]

    rtnl.replace_neigh(flannel, REMOTE_GATEWAY, MOVED_MAC)
    assert rtnl.neighbours(flannel) == [(REMOTE_GATEWAY, MOVED_MAC)]
    assert f"{REMOTE_GATEWAY} lladdr {MOVED_MAC} PERMANENT" in host.ip(
        "neigh", "show", "dev", "flannel.1").stdout

    # Left out: an entry that is not permanent, and another link's.
    stale = ipaddress.IPv4Address("10.244.65.0")
    host.ip("neigh", "add", str(stale), "lladdr", REMOTE_MAC, "dev", "flannel.1", "nud", "stale")
    rtnl.replace_neigh(eth0, REMOTE_HOST, REMOTE_MAC)
    assert rtnl.neighbours(flannel) == [(REMOTE_GATEWAY, MOVED_MAC)]
    assert rtnl.neighbours(eth0) == [(REMOTE_HOST, REMOTE_MAC)]
    assert str(stale) in host.ip("neigh", "show", "dev", "flannel.1").stdout

    rtnl.delete_neigh(flannel, REMOTE_GATEWAY)
    rtnl.delete_neigh(eth0, REMOTE_HOST)
    assert rtnl.neighbours(flannel) == [] and rtnl.neighbours(eth0) == []
    assert str(REMOTE_GATEWAY) not in host.ip("neigh", "show", "dev", "flannel.1").stdout
    with pytest.raises(OSError) as gone:
        rtnl.delete_neigh(flannel, REMOTE_GATEWAY)
    assert gone.value.errno == errno.ENOENT


def test_fdb_entries_are_replaced_listed_and_deleted(
        host: Host, rtnl: RtNetlink, eth0: int, flannel: int) -> None:
    for _ in range(2):
        rtnl.replace_fdb(flannel, REMOTE_MAC, REMOTE_HOST)
    assert fdb_json(host, "flannel.1") == [
        {"mac": REMOTE_MAC, "dst": str(REMOTE_HOST), "flags": ["self"], "state": "permanent"}]
    assert rtnl.fdb(flannel) == [(REMOTE_MAC, REMOTE_HOST)]

    # The remote host moved: replacing the MAC's entry leaves no entry to the old host.
    rtnl.replace_fdb(flannel, REMOTE_MAC, MOVED_HOST)
    assert rtnl.fdb(flannel) == [(REMOTE_MAC, MOVED_HOST)]
    assert [(e["mac"], e["dst"]) for e in fdb_json(host, "flannel.1")] == [
        (REMOTE_MAC, str(MOVED_HOST))]

    rtnl.replace_fdb(flannel, MOVED_MAC, REMOTE_HOST)
    assert sorted(rtnl.fdb(flannel)) == [(REMOTE_MAC, MOVED_HOST), (MOVED_MAC, REMOTE_HOST)]
    assert sorted((e["mac"], e["dst"]) for e in fdb_json(host, "flannel.1")) == [
        (REMOTE_MAC, str(MOVED_HOST)), (MOVED_MAC, str(REMOTE_HOST))]
    assert rtnl.fdb(eth0) == []  # eth0's own entries have no remote

    # The kernel answers a delete naming another remote with success, deleting nothing.
    rtnl.delete_fdb(flannel, REMOTE_MAC, REMOTE_HOST)
    assert (REMOTE_MAC, MOVED_HOST) in rtnl.fdb(flannel)
    rtnl.delete_fdb(flannel, REMOTE_MAC, MOVED_HOST)
    rtnl.delete_fdb(flannel, MOVED_MAC, REMOTE_HOST)
    assert rtnl.fdb(flannel) == [] and fdb_json(host, "flannel.1") == []
    with pytest.raises(OSError) as gone:
        rtnl.delete_fdb(flannel, MOVED_MAC, REMOTE_HOST)
    assert gone.value.errno == errno.ENOENT


def test_mac_text_and_bytes() -> None:
    assert parse_mac("1A:fd:f4:c0:3d:3b") == bytes.fromhex("1afdf4c03d3b")
    assert parse_mac("a:b:c:d:e:f") == bytes.fromhex("0a0b0c0d0e0f")
    assert format_mac(bytes.fromhex("1afdf4c03d3b")) == "1a:fd:f4:c0:3d:3b"
    assert format_mac(parse_mac(REMOTE_MAC)) == REMOTE_MAC
    for bad in ("", "1a:fd:f4:c0:3d", "1a:fd:f4:c0:3d:3b:00", "1a:fd:f4:c0:3d:3g",
                "1a-fd-f4-c0-3d-3b", "1a:fd:f4:c0:3d:+b", "1a:fd:f4:c0:3d: b", "1a:fd:f4:c0::3b",
                "100:fd:f4:c0:3d:3b"):
        with pytest.raises(ValueError, match="not a MAC address"):
            parse_mac(bad)
