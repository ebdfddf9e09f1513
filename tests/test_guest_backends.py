"""pyflanneld's vxlan and host-gw clusters on Debian 12's Linux 6.1, and mixed clusters with
flanneld v0.20.2 (udp, vxlan, host-gw), on two emulated guests (tests/guests.py) booted once for
the module.

Each cluster (a parameter of the module's `guest_cluster` fixture, so that pytest stops one
before it starts the next) has an etcd prefix of its own and a container in each guest. When it
stops, what its daemons leave as flanneld does (vxlan's device, host-gw's routes, flanneld's
iptables rules) and the containers are removed, so the next starts on clean guests. The mixed
clusters are skipped only where the reference flanneld is absent (a user's machine)."""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.cluster import Flanneld, LoggedDaemon, key_of, put_config, scrape, value, wait_for
from tests.conftest import require_host_network_tools
from tests.flanneld import REFERENCE_FLANNELD, reaches
from tests.guests import (
    SLOW,
    Guest,
    GuestBed,
    GuestFlanneld,
    GuestRealFlanneld,
    guest_testbed,
    ping,
    tcp_transfer,
)
from tests.test_backends import (
    CONFIGS,
    MTU,
    NETWORK,
    expected_value,
    masked_state,
    peer_route,
    routed,
    txqlen,
)
from tests.testbed import Host

PYFLANNELD = ["vxlan", "host-gw"]  # clusters of two pyflanneld guests
# Two pyflanneld guests with the udp backend in a dual-stack network: IPv6 over the kernel path
# behind a NIC (the ENCAP flags' way, docs/kernel-path.md), on 6.1.
UDP_DUAL = "udp-dual"
NETWORK6 = "fd00:10:244::/56"
MIXED = ["mixed-udp", "mixed-vxlan", "mixed-host-gw"]  # flanneld's guest and pyflanneld's
METRICS_PORT = 9126
METRICS = ("--metrics-port", str(METRICS_PORT), "--metrics-ip", "127.0.0.1")


@pytest.fixture(scope="module")
def guest_bed() -> Iterator[GuestBed]:
    """Two guests on a fresh testbed with a real etcd, booted once for the module."""
    require_host_network_tools()
    with guest_testbed(2) as bed:
        yield bed


@dataclass
class GuestCluster:
    kind: str  # a backend, or mixed-<backend>
    prefix: str
    guests: list[Guest]
    daemons: list[LoggedDaemon]  # a guest's each, in the guests' order
    subnets: list[ipaddress.IPv4Network]
    bed: GuestBed

    @property
    def backend(self) -> str:
        return backend_of(self.kind)


def backend_of(kind: str) -> str:
    return kind.removeprefix("mixed-").removesuffix("-dual")


def clean(guest: Guest) -> None:
    """What a cluster leaves in a guest: the container and cni0, and what flanneld leaves (and
    pyflanneld, which does as flanneld does): vxlan's device, host-gw's routes."""
    if guest.container_netns:
        guest.remove_container()
    guest.ip("link", "del", "flannel.1", check=False)
    guest.ip("route", "flush", "root", NETWORK)


@pytest.fixture(scope="module")
def guest_cluster(guest_bed: GuestBed, request: pytest.FixtureRequest
                  ) -> Iterator[GuestCluster]:
    """A cluster of `request.param` in the two guests, each with a container on its subnet,
    once each routes the other: pyflanneld in both, or (mixed-*) flanneld in the first and
    pyflanneld in the second."""
    kind: str = request.param
    backend = backend_of(kind)
    if kind in MIXED and not os.path.exists(REFERENCE_FLANNELD):
        pytest.skip(f"no reference flanneld at {REFERENCE_FLANNELD}")
    bed, etcd, guests = guest_bed.bed, guest_bed.etcd, guest_bed.guests
    prefix = f"/guest-{kind}/network"
    dual = {"EnableIPv6": True, "IPv6Network": NETWORK6} if kind == UDP_DUAL else {}
    put_config(etcd, "v3", CONFIGS[backend] | dual, prefix)
    first: LoggedDaemon = (
        GuestRealFlanneld(REFERENCE_FLANNELD, bed, guests[0], etcd, prefix) if kind in MIXED
        else GuestFlanneld(bed, guests[0], etcd, "v3", "--etcd-prefix", prefix, *METRICS))
    daemons = [first, GuestFlanneld(bed, guests[1], etcd, "v3", "--etcd-prefix", prefix,
                                    *METRICS)]
    # flanneld v0.20.2 can miss the lease of a host that joins at the same moment: beside it,
    # one host after the other; pyflanneld's start together.
    batches = [[first], daemons[1:]] if kind in MIXED else [daemons]
    subnets: list[ipaddress.IPv4Network] = []
    started = time.monotonic()
    try:
        for batch in batches:
            for daemon in batch:
                if os.path.exists(daemon.subnet_file):
                    os.unlink(daemon.subnet_file)  # the last cluster's: wait_subnet would read it
                daemon.start()
            subnets += [daemon.wait_subnet(timeout=SLOW) for daemon in batch]
        for daemon in daemons:
            assert daemon.subnet_env()["FLANNEL_MTU"] == str(MTU[backend])
        subnets6 = [daemon.subnet_env().get("FLANNEL_IPV6_SUBNET") for daemon in daemons]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda guest, subnet, subnet6: guest.add_container(
                str(subnet), MTU[backend], NETWORK, subnet6, NETWORK6 if dual else None),
                guests, subnets, subnets6))
        cluster = GuestCluster(kind, prefix, guests, daemons, subnets, guest_bed)
        routes_in(cluster)
        print(f"\n{kind} cluster in the guests: leases and routes in "
              f"{time.monotonic() - started:.1f} s")
        yield cluster
    finally:
        for daemon in daemons:  # together: under TCG each takes seconds to end
            if isinstance(daemon, Flanneld):
                daemon.terminate()
        if isinstance(first, GuestRealFlanneld):
            first.stop()
            first.clean(None)  # its iptables rules; clean() deletes its device
        stopped = [daemon.stop() for daemon in daemons if isinstance(daemon, Flanneld)]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(clean, guests))
    assert set(stopped) == {0}
    for daemon in daemons:
        assert "Traceback" not in daemon.log(), daemon.log()[-3000:]


def routes_in(cluster: GuestCluster) -> None:
    """Wait until each guest routes the other's subnet. flanneld v0.20.2 may have missed
    pyflanneld's lease (its watch keeps only a response's first event): after a restart its
    listing holds it."""
    a, b = cluster.guests
    f, p = cluster.daemons
    assert isinstance(p, Flanneld)
    p.wait_log("subnet added", timeout=SLOW)
    if cluster.kind not in MIXED:
        assert isinstance(f, Flanneld)
        f.wait_log("subnet added", timeout=SLOW)
        return
    deadline = time.monotonic() + 20  # pings from the guests' containers, 1 s each at most
    while not (reaches(a, b) and reaches(b, a)):  # type: ignore[arg-type]
        if time.monotonic() > deadline:
            assert isinstance(f, GuestRealFlanneld)
            f.stop()
            f.start()
            f.wait_subnet(timeout=SLOW)
            wait_for(lambda: reaches(a, b) and reaches(b, a),  # type: ignore[arg-type]
                     SLOW, "flanneld's guest and pyflanneld's reach each other")
            return


def peers(cluster: GuestCluster) -> list[tuple[Guest, Guest, ipaddress.IPv4Network]]:
    """(guest, its peer, the peer's subnet), both ways."""
    a, b = cluster.guests
    a_subnet, b_subnet = cluster.subnets
    return [(a, b, b_subnet), (b, a, a_subnet)]


def assert_vxlan_peer(host: Guest | Host, peer: Guest | Host, peer_subnet: ipaddress.IPv4Network
                      ) -> None:
    """The host's route, neighbour and forwarding entry for a vxlan peer, as flanneld's."""
    destination, route = peer_route("vxlan", peer, peer_subnet)  # type: ignore[arg-type]
    assert routed(host, destination) == route  # type: ignore[arg-type]
    peer_mac = peer.link("flannel.1")["address"]
    neighbours = host.ip("neigh", "show", "dev", "flannel.1").stdout
    assert f"{peer_subnet.network_address} lladdr {peer_mac} PERMANENT" in neighbours, neighbours
    fdb = host.run("bridge", "fdb", "show", "dev", "flannel.1").stdout
    assert f"{peer_mac} dst {peer.underlay_ip} self permanent" in fdb, fdb


@pytest.mark.parametrize("guest_cluster", PYFLANNELD, indirect=True)
def test_leases_devices_and_routes_are_flanneld_s(guest_cluster: GuestCluster) -> None:
    cluster = guest_cluster
    leases = cluster.bed.etcd.get_prefix(f"{cluster.prefix}/subnets/", "v3")
    assert leases == {key_of(subnet, cluster.prefix): expected_value(guest, cluster.backend)
                      for guest, subnet in zip(cluster.guests, cluster.subnets, strict=True)}
    for guest, peer, peer_subnet in peers(cluster):
        if cluster.backend == "host-gw":
            assert routed(guest, peer_subnet) == peer_route("host-gw", peer, peer_subnet)[1]
            assert guest.ip("link", "show", "flannel.1", check=False).returncode != 0
            continue
        device = guest.link("flannel.1")
        info = device["linkinfo"]["info_data"]
        assert (device["mtu"], info["id"], info["local"], info["link"], info["port"],
                info["learning"]) == (1450, 1, guest.underlay_ip, "eth0", 8472, False)
        assert "UP" in device["flags"] and txqlen(guest, "flannel.1") == 0
        own = cluster.subnets[cluster.guests.index(guest)]
        assert guest.ip("-4", "-o", "addr", "show", "flannel.1").stdout.split()[3] == (
            f"{own.network_address}/32")
        assert_vxlan_peer(guest, peer, peer_subnet)


def ping_both_ways(cluster: GuestCluster) -> None:
    a, b = cluster.guests
    for src, dst in ((a, b), (b, a)):
        assert dst.container_ip
        ping(src, dst.container_ip)


@pytest.mark.parametrize("guest_cluster", PYFLANNELD + ["mixed-udp", "mixed-vxlan"],
                         indirect=True)
def test_containers_ping_both_ways_and_tcp_arrives_intact(guest_cluster: GuestCluster) -> None:
    ping_both_ways(guest_cluster)
    a, b = guest_cluster.guests
    workdir = guest_cluster.bed.bed.workdir
    for src, dst in ((a, b), (b, a)):
        seconds = tcp_transfer(dst, src, 2 << 20,
                               f"{workdir}/{dst.netns}-{guest_cluster.kind}-tcp.log")
        print(f"\n{guest_cluster.kind}: 2 MiB of TCP from {src.netns}'s container to "
              f"{dst.netns}'s in {seconds:.1f} s")


@pytest.mark.parametrize("guest_cluster", ["mixed-udp"], indirect=True)
def test_beside_flanneld_pyflanneld_s_kernel_path_carries_the_udp_pings(
        guest_cluster: GuestCluster) -> None:
    """flanneld's C proxy on one side, pyflanneld's tc programs on 6.1 on the other: the
    datagrams flanneld sends come in through the kernel path, the answers go out through it,
    none through the loops."""
    f_guest, p_guest = guest_cluster.guests
    daemon = guest_cluster.daemons[1]
    assert isinstance(daemon, Flanneld) and f_guest.container_ip and p_guest.container_ip
    assert "kernel path on" in daemon.log()
    ping(f_guest, p_guest.container_ip)
    count = 10
    before = scrape(daemon, METRICS_PORT)
    result = f_guest.in_container("ping", "-c", str(count), "-i", "0.2", "-W", "2",
                                  p_guest.container_ip, check=False)
    assert f"{count} received" in result.stdout, result.stdout
    after = scrape(daemon, METRICS_PORT)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for direction in ("rx", "tx"):
        assert moved("pyflannel_kernelpath_packets_total", direction=direction) == count
        assert moved("pyflannel_fastpath_packets_total", direction=direction) == 0


@pytest.mark.parametrize("guest_cluster", [UDP_DUAL], indirect=True)
def test_dual_stack_udp_carries_ipv6_in_the_kernel_path_behind_a_nic(
        guest_cluster: GuestCluster) -> None:
    """The udp backend in a dual-stack network on 6.1, behind virtio NICs: the containers ping
    each other over both families, IPv6 pings go out and come in through the tc programs
    (bpf_skb_change_proto and the ENCAP flags on this kernel), none through the loops, and TCP
    over IPv6 arrives intact both ways, its super-packets leaving as UDP-tunnel ones."""
    a, b = guest_cluster.guests
    assert a.container_ipv6 and b.container_ipv6
    ping_both_ways(guest_cluster)
    for src, dst in ((a, b), (b, a)):
        assert dst.container_ipv6
        ping(src, dst.container_ipv6)
    count = 10
    for src, dst, daemon in ((a, b, guest_cluster.daemons[0]), (b, a, guest_cluster.daemons[1])):
        assert dst.container_ipv6 and isinstance(daemon, Flanneld)
        assert "kernel path on" in daemon.log()
        before = scrape(daemon, METRICS_PORT)
        result = src.in_container("ping", "-c", str(count), "-i", "0.2", "-W", "2",
                                  dst.container_ipv6, check=False)
        assert f"{count} received" in result.stdout, result.stdout
        after = scrape(daemon, METRICS_PORT)
        for direction in ("rx", "tx"):
            assert value(after, "pyflannel_kernelpath_packets_total", direction=direction) - value(
                before, "pyflannel_kernelpath_packets_total", direction=direction) == count
            assert value(after, "pyflannel_fastpath_packets_total", direction=direction) == value(
                before, "pyflannel_fastpath_packets_total", direction=direction)
    # TCP/IPv6 super-packets leave as UDP-tunnel ones, cut by the NIC's GSO: none reaches the
    # sender's loops.
    workdir = guest_cluster.bed.bed.workdir
    for src, dst, daemon in ((a, b, guest_cluster.daemons[0]), (b, a, guest_cluster.daemons[1])):
        assert isinstance(daemon, Flanneld)
        before = scrape(daemon, METRICS_PORT)
        seconds = tcp_transfer(dst, src, 2 << 20, f"{workdir}/{dst.netns}-dual-tcp6.log",
                               ipv6=True)
        after = scrape(daemon, METRICS_PORT)
        print(f"\n{UDP_DUAL}: 2 MiB of TCP/IPv6 from {src.netns}'s container to {dst.netns}'s "
              f"in {seconds:.1f} s")
        assert value(after, "pyflannel_kernelpath_superpackets_total", direction="tx") > value(
            before, "pyflannel_kernelpath_superpackets_total", direction="tx")
        assert value(after, "pyflannel_fastpath_packets_total", direction="tx") == value(
            before, "pyflannel_fastpath_packets_total", direction="tx")


@pytest.mark.parametrize("guest_cluster", PYFLANNELD, indirect=True)
def test_a_third_host_joining_is_routed_and_unrouted_when_it_leaves(
        guest_cluster: GuestCluster) -> None:
    """A namespace host on this machine's kernel joins the guests' cluster: the guests route
    it as flanneld does, the containers ping both ways; its lease removed, it is unrouted."""
    cluster = guest_cluster
    bed, etcd = cluster.bed.bed, cluster.bed.etcd
    third = Flanneld(bed, bed.add_host(), etcd, "v3", "--etcd-prefix", cluster.prefix)
    third.start()
    try:
        subnet = third.wait_subnet()
        bed.add_container(third.host, str(subnet), MTU[cluster.backend], NETWORK)
        destination, route = peer_route(cluster.backend, third.host, subnet)
        for guest in cluster.guests:
            wait_for(lambda g=guest: routed(g, destination) == route, SLOW,
                     f"{guest.netns} routes the third host")
            if cluster.backend == "vxlan":
                assert_vxlan_peer(guest, third.host, subnet)
        assert third.host.container_ip
        for guest in cluster.guests:
            assert guest.container_ip
            ping(guest, third.host.container_ip)
            result = third.host.in_container("ping", "-c", "1", "-W", "5", guest.container_ip,
                                             check=False)
            assert result.returncode == 0, result.stdout
    finally:
        assert third.stop() == 0
    etcd.delete(key_of(subnet, cluster.prefix), "v3")
    for guest in cluster.guests:
        wait_for(lambda g=guest: not routed(g, destination), SLOW,
                 f"{guest.netns} unroutes the host that left")
        if cluster.backend == "vxlan":
            assert str(subnet.network_address) not in guest.ip(
                "neigh", "show", "dev", "flannel.1").stdout
            assert third.host.underlay_ip not in guest.run(
                "bridge", "fdb", "show", "dev", "flannel.1").stdout


@pytest.mark.parametrize("guest_cluster", ["mixed-vxlan", "mixed-host-gw"], indirect=True)
def test_beside_flanneld_the_lease_device_and_routes_are_flanneld_s_but_for_the_host(
        guest_cluster: GuestCluster) -> None:
    """On 6.1 as on 6.18: pyflanneld's lease value is flanneld's byte for byte but for its
    PublicIP and VtepMAC, what it made (device, addresses, routes, neighbours, forwarding
    entries, as iproute2 shows them) is what flanneld made, and the containers reach each
    other."""
    cluster = guest_cluster
    ping_both_ways(cluster)
    (f_guest, p_guest), (f_subnet, p_subnet) = cluster.guests, cluster.subnets
    leases = cluster.bed.etcd.get_prefix(f"{cluster.prefix}/subnets/", "v3")
    f_value, p_value = (leases[key_of(subnet, cluster.prefix)] for subnet in (f_subnet, p_subnet))
    ours = f_value.replace(f'"PublicIP":"{f_guest.underlay_ip}"',
                           f'"PublicIP":"{p_guest.underlay_ip}"')
    if cluster.backend == "vxlan":
        f_mac = json.loads(f_value)["BackendData"]["VtepMAC"]
        assert f_mac == f_guest.link("flannel.1")["address"]
        ours = ours.replace(f'"VtepMAC":"{f_mac}"',
                            f'"VtepMAC":"{p_guest.link("flannel.1")["address"]}"')
    assert ours != f_value and p_value == ours
    f_state, p_state = (masked_state(guest, cluster.backend)  # type: ignore[arg-type]
                        for guest in cluster.guests)
    assert f_state["routes"], "flanneld routed nothing to compare with"
    assert p_state == f_state
