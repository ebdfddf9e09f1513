"""Dual-stack and IPv6-only networks on etcd, beside the real flanneld v0.20.2 where it has the
mode: the vxlan and host-gw backends route both families as flanneld does (its lease, subnet.env,
devices, addresses, neighbours, forwarding entries and routes), and an IPv6-only network, where
flanneld's hosts take each other's lease, gives every pyflanneld host a subnet of its own.

The hosts have an IPv4 and an IPv6 address on eth0 (2001:db8:0:1::/64); flanneld is given
--public-ipv6, as its v0.20.2 needs to find the interface's IPv6 address beside --iface.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterator

import pytest

from control.subnet.lease import Subnets, shares_a_subnet
from tests.cluster import PREFIX, Flanneld, put_config, wait_for
from tests.etcd import EtcdServer
from tests.flanneld import REFERENCE_FLANNELD, RealFlanneld
from tests.test_backends import Mixed
from tests.testbed import Host, Testbed, tcp_transfer

NETWORK, NETWORK6 = "10.244.0.0/16", "fd00:10:244::/56"
REACH_SECONDS = 15.0


def dual_config(backend: str) -> dict[str, object]:
    return {"Network": NETWORK, "EnableIPv6": True, "IPv6Network": NETWORK6,
            "Backend": {"Type": backend}}


def add_container(bed: Testbed, daemon: Flanneld | RealFlanneld) -> None:
    """A container on the daemon's host with an address of each family the daemon leased."""
    env = daemon.subnet_env()
    bed.add_container(daemon.host, env.get("FLANNEL_SUBNET"), int(env["FLANNEL_MTU"]),
                      env.get("FLANNEL_NETWORK", NETWORK), env.get("FLANNEL_IPV6_SUBNET"),
                      env.get("FLANNEL_IPV6_NETWORK"))


def pings(src: Host, address: str) -> bool:
    return src.in_container("ping", "-c", "1", "-W", "1", address, check=False).returncode == 0


def reach_each_other(hosts: list[Host], families: tuple[str, ...] = ("ipv4", "ipv6")) -> None:
    """Every container pair pings both ways over each family, within REACH_SECONDS."""
    for src in hosts:
        for dst in hosts:
            if src is dst:
                continue
            for family in families:
                address = dst.container_ip if family == "ipv4" else dst.container_ipv6
                assert address, f"{dst.netns}'s container has no {family} address"
                wait_for(lambda src=src, address=address: pings(src, address), REACH_SECONDS,
                         f"{src.netns}'s container pinging {address}")


@pytest.fixture(scope="module", params=["vxlan", "host-gw"])
def dual(request: pytest.FixtureRequest) -> Iterator[Mixed]:
    """test_backends' Mixed, dual-stack: each container has an address of both families."""
    if not os.path.exists(REFERENCE_FLANNELD):
        pytest.skip(f"no reference flanneld at {REFERENCE_FLANNELD}")
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        flanneld: RealFlanneld | None = None
        pyflanneld: Flanneld | None = None
        try:
            put_config(etcd, "v3", dual_config(request.param))
            f_host = bed.add_host(ipv6=True)
            flanneld = RealFlanneld(REFERENCE_FLANNELD, bed, f_host, etcd,
                                    f"--public-ipv6={f_host.underlay_ipv6}").start()
            flanneld.wait_ipv6_subnet()
            add_container(bed, flanneld)
            p_host = bed.add_host(ipv6=True)
            pyflanneld = Flanneld(bed, p_host, etcd, "v3").start()
            pyflanneld.wait_ipv6_subnet()
            add_container(bed, pyflanneld)
            pyflanneld.wait_log("subnet added")
            try:
                reach_each_other([f_host, p_host])
            except AssertionError:  # flanneld v0.20.2 can miss a lease event: its listing not
                flanneld.stop()
                flanneld.start()
                reach_each_other([f_host, p_host])
            yield Mixed(bed, etcd, request.param, flanneld, pyflanneld)
        finally:
            if pyflanneld is not None:
                pyflanneld.stop()
            if flanneld is not None:
                flanneld.stop()
                flanneld.clean("flannel.1")
                flanneld.host.ip("link", "del", "flannel-v6.1", check=False)
            etcd.stop()


def test_containers_reach_each_other_over_both_families_and_tcp_runs_over_ipv6(
        dual: Mixed) -> None:
    hosts = [dual.flanneld.host, dual.pyflanneld.host]
    reach_each_other(hosts)
    for src, dst in (hosts, hosts[::-1]):
        assert dst.container_netns and dst.container_ipv6 and src.container_netns
        assert tcp_transfer(dst.container_netns, dst.container_ipv6, src.container_netns,
                            nbytes=4 << 20) == 4 << 20


def leases(dual: Mixed) -> tuple[str, str, str, str]:
    """(flanneld's lease key, its value, pyflanneld's key, its value)."""
    found = dual.etcd.get_prefix(f"{PREFIX}/subnets/", "v3")
    keys = []
    for daemon in (dual.flanneld, dual.pyflanneld):
        subnet, subnet6 = daemon.wait_subnet(), daemon.wait_ipv6_subnet()
        keys.append(f"{PREFIX}/subnets/{subnet.network_address}-{subnet.prefixlen}&"
                    f"{subnet6.network_address}-{subnet6.prefixlen}")
    return keys[0], found[keys[0]], keys[1], found[keys[1]]


def test_the_lease_key_value_and_subnet_env_are_flanneld_s_but_for_the_host(dual: Mixed) -> None:
    """The key with the IPv6 subnet after `&`, and the value byte for byte flanneld's, this
    host's addresses (and VtepMACs) in place of flanneld's."""
    _, f_value, _, p_value = leases(dual)
    f_host, p_host = dual.flanneld.host, dual.pyflanneld.host
    ours = f_value.replace(f'"PublicIP":"{f_host.underlay_ip}"',
                           f'"PublicIP":"{p_host.underlay_ip}"').replace(
        f'"PublicIPv6":"{f_host.underlay_ipv6}"', f'"PublicIPv6":"{p_host.underlay_ipv6}"')
    if dual.backend == "vxlan":
        parsed = json.loads(f_value)
        for key, device in (("BackendData", "flannel.1"), ("BackendV6Data", "flannel-v6.1")):
            f_mac = parsed[key]["VtepMAC"]
            assert f_mac == f_host.link(device)["address"]
            ours = ours.replace(f'"VtepMAC":"{f_mac}"',
                                f'"VtepMAC":"{p_host.link(device)["address"]}"')
    assert ours != f_value and p_value == ours
    f_env, p_env = (daemon.subnet_env() for daemon in (dual.flanneld, dual.pyflanneld))
    for key in ("FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"):
        assert f_env.pop(key) != p_env.pop(key)
    assert p_env == f_env
    with open(dual.pyflanneld.subnet_file) as f, open(dual.flanneld.subnet_file) as g:
        assert [line.split("=")[0] for line in f] == [line.split("=")[0] for line in g]


def ipv6_state(host: Host, backend: str) -> dict[str, object]:
    """What the backend made for IPv6 on the host, as iproute2 shows it, with what differs from
    host to host (indexes, MACs, addresses, subnets) masked."""
    def masked(entries: list[dict], *keys: str) -> list[dict]:
        """In an order that does not depend on the subnets' (which are random)."""
        return sorted(({**entry, **{key: "*" for key in keys if key in entry}}
                       for entry in entries), key=lambda entry: json.dumps(entry, sort_keys=True))

    def listed(*command: str) -> list[dict]:
        return json.loads(host.run(*command).stdout or "[]")

    if backend == "host-gw":
        return {"routes": masked(listed("ip", "-6", "-d", "-j", "route", "show", "dev", "eth0",
                                        "root", NETWORK6), "dst", "gateway")}
    device = host.link("flannel-v6.1")
    device = {**device, "ifindex": "*", "address": "*", "stats64": "*",
              "linkinfo": {**device["linkinfo"], "info_data": {
                  **device["linkinfo"]["info_data"], "local6": "*"}}}
    (addresses,) = listed("ip", "-j", "-6", "addr", "show", "dev", "flannel-v6.1", "scope",
                          "global")
    return {"device": device,
            "addresses": masked(addresses["addr_info"], "local", "preferred_life_time",
                                "valid_life_time", "tentative"),
            "routes": masked(listed("ip", "-6", "-d", "-j", "route", "show", "dev",
                                    "flannel-v6.1", "root", NETWORK6), "dst", "gateway"),
            "neighbours": masked(listed("ip", "-6", "-j", "neigh", "show", "dev",
                                        "flannel-v6.1", "nud", "permanent"), "dst", "lladdr"),
            "fdb": masked([entry for entry in listed("bridge", "-j", "fdb", "show", "dev",
                                                     "flannel-v6.1") if "dst" in entry],
                          "mac", "dst")}


def test_the_ipv6_device_addresses_neighbours_fdb_and_routes_are_flanneld_s(dual: Mixed) -> None:
    f_state, p_state = (ipv6_state(daemon.host, dual.backend)
                        for daemon in (dual.flanneld, dual.pyflanneld))
    assert f_state["routes"], "flanneld routed no IPv6 subnet to compare with"
    assert p_state == f_state
    check_ipv6_peer_entries(dual.backend, dual.pyflanneld.host, dual.flanneld.host,
                            dual.flanneld.wait_ipv6_subnet())


def check_ipv6_peer_entries(backend: str, host: Host, peer: Host,
                            peer_subnet6: ipaddress.IPv6Network) -> None:
    """The peer's entries themselves on `host`: its IPv6 subnet via its PublicIPv6 (host-gw),
    or via its own address onlink with its IPv6 VtepMAC to its PublicIPv6 (vxlan)."""
    route = host.ip("-6", "route", "show", str(peer_subnet6)).stdout
    if backend == "host-gw":
        assert f"via {peer.underlay_ipv6} dev eth0" in route
    else:
        assert f"via {peer_subnet6.network_address} dev flannel-v6.1" in route
        assert "onlink" in route
        mac = peer.link("flannel-v6.1")["address"]
        assert f"{mac} dst {peer.underlay_ipv6} self permanent" in host.run(
            "bridge", "fdb", "show", "dev", "flannel-v6.1").stdout


def test_a_dual_stack_host_joining_and_leaving_is_routed_on_both_within_2s(dual: Mixed) -> None:
    hosts = (dual.flanneld.host, dual.pyflanneld.host)
    joining = Flanneld(dual.bed, dual.bed.add_host(ipv6=True), dual.etcd, "v3")
    device6 = "flannel-v6.1 " if dual.backend == "vxlan" else "eth0 "
    try:
        joining.start()
        subnet, subnet6 = joining.wait_subnet(), joining.wait_ipv6_subnet()
        wait_for(lambda: all(
            str(subnet) in host.ip("route").stdout
            and f"dev {device6}" in host.ip("-6", "route", "show", str(subnet6)).stdout
            for host in hosts), 2, "the host that joined routed for both families on both")
    finally:
        joining.stop()
    dual.etcd.delete(f"{PREFIX}/subnets/{subnet.network_address}-{subnet.prefixlen}&"
                     f"{subnet6.network_address}-{subnet6.prefixlen}", "v3")
    wait_for(lambda: not any(host.ip("-6", "route", "show", str(subnet6)).stdout.strip()
                             or str(subnet) in host.ip("route").stdout for host in hosts), 2,
             "the removed lease unrouted for both families on both")


def test_a_restart_keeps_both_subnets_and_both_vtep_macs(dual: Mixed) -> None:
    daemon = dual.pyflanneld
    _, _, key, value = leases(dual)
    macs = ([daemon.host.link(device)["address"] for device in ("flannel.1", "flannel-v6.1")]
            if dual.backend == "vxlan" else [])
    daemon.stop()
    daemon.start()
    daemon.wait_log("subnet added")
    assert leases(dual)[2:] == (key, value)
    if macs:
        assert [daemon.host.link(device)["address"]
                for device in ("flannel.1", "flannel-v6.1")] == macs
    reach_each_other([dual.flanneld.host, daemon.host])


@pytest.mark.parametrize("backend", ["host-gw", "vxlan"])
def test_an_ipv6_only_network_in_etcd_gives_each_host_its_own_subnet(backend: str) -> None:
    """flanneld v0.20.2's hosts all advertise PublicIP 0.0.0.0 there and take each other's
    lease; pyflanneld finds its own by its PublicIPv6, and says what flanneld would do."""
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        daemons: list[Flanneld] = []
        try:
            put_config(etcd, "v3", {"EnableIPv4": False, "EnableIPv6": True,
                                    "IPv6Network": NETWORK6, "Backend": {"Type": backend}})
            for _ in range(3):
                daemon = Flanneld(bed, bed.add_host(ipv6=True), etcd, "v3").start()
                daemons.append(daemon)
                daemon.wait_ipv6_subnet()
            subnets = [daemon.wait_ipv6_subnet() for daemon in daemons]
            assert len(set(subnets)) == 3
            keys = sorted(etcd.get_prefix(f"{PREFIX}/subnets/", "v3"))
            assert keys == sorted(f"{PREFIX}/subnets/0.0.0.0-0&{s.network_address}-64"
                                  for s in subnets)
            assert all("FLANNEL_SUBNET" not in daemon.subnet_env() for daemon in daemons)
            daemons[0].wait_log("flanneld v0.20.2 cannot share an IPv6-only network")
            for daemon in daemons:
                add_container(bed, daemon)
                assert daemon.host.container_ip is None
            reach_each_other([daemon.host for daemon in daemons], ("ipv6",))
            # a restart takes back its own subnet, not another host's
            daemons[1].stop()
            daemons[1].start()
            daemons[1].wait_log("reusing it")
            assert daemons[1].wait_ipv6_subnet() == subnets[1]
        finally:
            for daemon in daemons:
                daemon.stop()
            etcd.stop()


def test_a_peer_lease_without_an_ipv6_subnet_is_routed_for_ipv4_and_logged() -> None:
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        daemon: Flanneld | None = None
        try:
            put_config(etcd, "v3", dual_config("host-gw"))
            daemon = Flanneld(bed, bed.add_host(ipv6=True), etcd, "v3").start()
            daemon.wait_ipv6_subnet()
            etcd.put(f"{PREFIX}/subnets/10.244.250.0-24",
                     '{"PublicIP":"198.18.0.250","PublicIPv6":null,"BackendType":"host-gw"}',
                     "v3")
            daemon.wait_log("lease 10.244.250.0/24 has no IPv6 subnet: routed for IPv4 only")
            daemon.wait_log("subnet added: 10.244.250.0/24 via 198.18.0.250")
            assert "via 198.18.0.250" in daemon.host.ip("route", "show",
                                                        "10.244.250.0/24").stdout
            assert daemon.process is not None and daemon.process.poll() is None
            assert "fd00" not in daemon.host.ip("-6", "route", "show", "dev", "eth0").stdout
        finally:
            if daemon is not None:
                daemon.stop()
            etcd.stop()


def test_a_host_that_does_not_give_way_on_a_shared_ipv6_subnet_makes_this_one_move() -> None:
    """What a flanneld host writes when it picked this host's IPv6 subnet at the same moment
    and created its key later: flanneld does not look for such a clash (a pyflanneld host in its
    place gives way at once, tests/test_lease_race.py). Routing it would take this host's own
    IPv6 traffic away, so it is left out, and once it has stayed a while this host moves."""
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        daemon: Flanneld | None = None
        try:
            put_config(etcd, "v3", dual_config("host-gw"))
            daemon = Flanneld(bed, bed.add_host(ipv6=True), etcd, "v3").start()
            own = Subnets(daemon.wait_subnet(), daemon.wait_ipv6_subnet())
            clash = Subnets(ipaddress.IPv4Network("10.244.250.0/24"), own.ipv6)
            etcd.put(f"{PREFIX}/subnets/{clash.name}",
                     '{"PublicIP":"198.18.0.250","PublicIPv6":"2001:db8:0:1::250",'
                     '"BackendType":"host-gw"}', "v3")
            daemon.wait_log(f"ignoring lease {clash}: it shares a subnet with this host's lease")
            assert "10.244.250.0" not in daemon.host.ip("route", "show").stdout
            assert "2001:db8:0:1::250" not in daemon.host.ip("-6", "route", "show").stdout
            daemon.wait_log(f"lease {clash} still shares a subnet with this host's lease {own}",
                            timeout=15.0)
            daemon.wait_log(f"subnet added: {clash} via 198.18.0.250, 2001:db8:0:1::250")
            wait_for(lambda: daemon.wait_ipv6_subnet() != own.ipv6, 10.0,
                     "subnet.env with the new IPv6 subnet")
            moved = Subnets(daemon.wait_subnet(), daemon.wait_ipv6_subnet())
            assert not shares_a_subnet(moved, clash)
            keys = etcd.get_prefix(f"{PREFIX}/subnets/", "v3")
            assert sorted(keys) == sorted(f"{PREFIX}/subnets/{s.name}" for s in (clash, moved))
            assert "via 2001:db8:0:1::250" in daemon.host.ip("-6", "route", "show",
                                                              str(own.ipv6)).stdout
            assert daemon.process is not None and daemon.process.poll() is None
        finally:
            if daemon is not None:
                daemon.stop()
            etcd.stop()


def test_flanneld_taking_this_host_s_ipv6_subnet_back_from_its_subnet_file_makes_this_one_move(
        ) -> None:
    """flanneld v0.20.2 takes its previous subnets back from its subnet file when no lease has
    the IPv4 one, without looking at the IPv6 one: a flanneld host whose subnet file names this
    host's IPv6 subnet (its own old one, since taken) leases it again beside this host's. This
    host moves, and both reach each other over both families."""
    if not os.path.exists(REFERENCE_FLANNELD):
        pytest.skip(f"no reference flanneld at {REFERENCE_FLANNELD}")
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        flanneld: RealFlanneld | None = None
        daemon: Flanneld | None = None
        try:
            put_config(etcd, "v3", dual_config("host-gw"))
            daemon = Flanneld(bed, bed.add_host(ipv6=True), etcd, "v3").start()
            own = Subnets(daemon.wait_subnet(), daemon.wait_ipv6_subnet())
            f_host = bed.add_host(ipv6=True)
            flanneld = RealFlanneld(REFERENCE_FLANNELD, bed, f_host, etcd,
                                    f"--public-ipv6={f_host.underlay_ipv6}").start()
            first = Subnets(flanneld.wait_subnet(), flanneld.wait_ipv6_subnet())
            flanneld.stop()
            etcd.delete(f"{PREFIX}/subnets/{first.name}", "v3")
            with open(flanneld.subnet_file) as f:
                env = f.read()
            with open(flanneld.subnet_file, "w") as f:
                f.write(env.replace(f"FLANNEL_IPV6_SUBNET={first.ipv6.network_address + 1}/",
                                    f"FLANNEL_IPV6_SUBNET={own.ipv6.network_address + 1}/"))
            flanneld.start(previous=True)
            clash = Subnets(first.ipv4, own.ipv6)
            daemon.wait_log(f"lease {clash} still shares a subnet with this host's lease {own}",
                            timeout=20.0)
            wait_for(lambda: daemon.wait_ipv6_subnet() != own.ipv6, 10.0,
                     "subnet.env with the new IPv6 subnet")
            moved = Subnets(daemon.wait_subnet(), daemon.wait_ipv6_subnet())
            assert not shares_a_subnet(moved, clash)
            assert f"{PREFIX}/subnets/{clash.name}" in etcd.get_prefix(f"{PREFIX}/subnets/", "v3")
            add_container(bed, daemon)
            add_container(bed, flanneld)
            try:
                reach_each_other([daemon.host, f_host])
            except AssertionError:  # flanneld v0.20.2 can miss a lease event
                flanneld.stop()
                flanneld.start(previous=True)
                reach_each_other([daemon.host, f_host])
        finally:
            if daemon is not None:
                daemon.stop()
            if flanneld is not None:
                flanneld.stop()
                flanneld.clean(None)
            etcd.stop()


def test_the_udp_backend_carries_ipv6_between_pyflannel_hosts_and_ipv4_to_flanneld() -> None:
    """flanneld's udp backend leases an IPv6 subnet but carries only IPv4 (it writes
    `"PublicIPv6":null`): pyflannel hosts carry IPv6 between themselves, each datagram over
    IPv4, and send none to it."""
    if not os.path.exists(REFERENCE_FLANNELD):
        pytest.skip(f"no reference flanneld at {REFERENCE_FLANNELD}")
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        flanneld: RealFlanneld | None = None
        daemons: list[Flanneld] = []
        try:
            put_config(etcd, "v3", dual_config("udp"))
            f_host = bed.add_host(ipv6=True)
            flanneld = RealFlanneld(REFERENCE_FLANNELD, bed, f_host, etcd,
                                    f"--public-ipv6={f_host.underlay_ipv6}").start()
            flanneld.wait_ipv6_subnet()
            add_container(bed, flanneld)
            for _ in range(2):
                daemon = Flanneld(bed, bed.add_host(ipv6=True), etcd, "v3").start()
                daemons.append(daemon)
                daemon.wait_ipv6_subnet()
                add_container(bed, daemon)
            a, b = daemons
            for daemon in daemons:
                daemon.wait_log("subnet added", count=2)
                daemon.wait_log("IPv4 only, as flanneld's udp backend (no PublicIPv6) carries "
                                "no IPv6")
            reach_each_other([a.host, b.host])
            try:
                reach_each_other([f_host, a.host], ("ipv4",))
            except AssertionError:  # flanneld v0.20.2 can miss a lease event
                flanneld.stop()
                flanneld.start()
                reach_each_other([f_host, a.host, b.host], ("ipv4",))
            assert a.host.container_netns and b.host.container_ipv6 and b.host.container_netns
            assert tcp_transfer(b.host.container_netns, b.host.container_ipv6,
                                a.host.container_netns, nbytes=4 << 20) == 4 << 20
            # No IPv6 to flanneld's host: its container's IPv6 address is unreachable.
            assert f_host.container_ipv6
            assert not pings(a.host, f_host.container_ipv6)
            found = etcd.get_prefix(f"{PREFIX}/subnets/", "v3").values()
            assert f'{{"PublicIP":"{f_host.underlay_ip}","PublicIPv6":null}}' in found
            assert (f'{{"PublicIP":"{a.host.underlay_ip}","PublicIPv6":'
                    f'"{a.host.underlay_ipv6}"}}') in found
            f_env, a_env = flanneld.subnet_env(), a.subnet_env()
            assert list(a_env) == list(f_env) and a_env["FLANNEL_MTU"] == f_env["FLANNEL_MTU"]
        finally:
            for daemon in daemons:
                daemon.stop()
            if flanneld is not None:
                flanneld.stop()
                flanneld.clean(None)
            etcd.stop()
