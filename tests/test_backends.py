"""The vxlan and host-gw backends on both etcd APIs: what flanneld v0.20.2 writes and sets up
(lease values, devices, neighbours, forwarding entries, routes, subnet.env), read back with
independent tools (etcd, `ip`, `bridge`), traffic between containers across the hosts, and
every change of backend between runs; then the same beside the reference flanneld in one
cluster, compared with what it makes."""

from __future__ import annotations

import ctypes
import ipaddress
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from control.backend.vxlan import vtep_mac
from control.host.rtnl import RtNetlink
from fastpath.udp_tc import BPF_TCX_INGRESS, LIBBPF_SONAMES, RX_VXLAN_DEVICE
from tests.cluster import PREFIX, Cluster, Flanneld, key_of, put_config, wait_for
from tests.etcd import EtcdServer
from tests.flanneld import (
    REFERENCE_FLANNELD,
    RealFlanneld,
    beside_flanneld,
    reaches,
    wait_reachable,
)
from tests.testbed import Host, Testbed, inside, tcp_transfer

NETWORK = "10.244.0.0/16"
UDP = {"Network": NETWORK}
VXLAN = {"Network": NETWORK, "Backend": {"Type": "vxlan"}}
HOST_GW = {"Network": NETWORK, "Backend": {"Type": "host-gw"}}
VXLAN_DIRECT = {"Network": NETWORK, "Backend": {"Type": "vxlan", "DirectRouting": True}}
# Every vxlan key flanneld v0.20.2 reads, none at its default.
VXLAN_42 = {"Network": NETWORK, "Backend": {"Type": "vxlan", "VNI": 42, "Port": 4789,
                                            "GBP": True, "Learning": True}}
CONFIGS = {"udp": UDP, "vxlan": VXLAN, "host-gw": HOST_GW, "vxlan-direct": VXLAN_DIRECT,
           "vxlan-42": VXLAN_42}
# The underlay's 1500 less the encapsulation: IPv4 and UDP (28), VXLAN's 50, or none.
MTU = {"udp": 1472, "vxlan": 1450, "host-gw": 1500, "vxlan-direct": 1450, "vxlan-42": 1450}


def txqlen(host: Host, device: str) -> int:
    """The device's transmit queue length; iproute2 prints none when it is 0."""
    return int(host.run("cat", f"/sys/class/net/{device}/tx_queue_len").stdout)


def expected_value(host: Host, backend: str, device: str = "flannel.1", vni: int = 1) -> str:
    if backend == "udp":
        return f'{{"PublicIP":"{host.underlay_ip}","PublicIPv6":null}}'
    if backend == "host-gw":
        return f'{{"PublicIP":"{host.underlay_ip}","PublicIPv6":null,"BackendType":"host-gw"}}'
    mac = host.link(device)["address"]
    return (f'{{"PublicIP":"{host.underlay_ip}","PublicIPv6":null,"BackendType":"vxlan",'
            f'"BackendData":{{"VNI":{vni},"VtepMAC":"{mac}"}}}}')


def routed(host: Host, subnet: ipaddress.IPv4Network | str) -> str:
    return host.ip("route", "show", str(subnet)).stdout.strip()


# route_kept's polls: at least this many, on average at most this far apart (seconds). A poll
# takes 1.2 ms on a quiet machine (0.2 ms the dump, 1 ms the sleep), 5.5 ms with the machine
# busy with a second test run: 10 ms still sees any gap a delete-and-add would leave.
MIN_POLLS, MAX_POLL_INTERVAL = 20, 0.010


@contextmanager
def route_kept(host: Host, destination: ipaddress.IPv4Network, gateway: str) -> Iterator[None]:
    """Fail unless the route `destination via gateway dev eth0` is in the host's main table
    all the while the body runs: a thread polls the kernel through netlink every millisecond
    or so (`ip route` would miss a gap of a few milliseconds). How many polls that makes
    depends on how long the body takes (a restart's listing of the leases took 0.1-0.2 s
    here): what must hold is that they came close enough together, and enough of them."""
    with inside(host.netns):  # the socket stays in the host's namespace
        rtnl = RtNetlink()
    eth0 = host.link("eth0")["ifindex"]
    wanted = (destination, ipaddress.IPv4Address(gateway))
    done = threading.Event()
    polls, missing = 0, 0

    def poll() -> None:
        nonlocal polls, missing
        while not done.is_set():
            missing += wanted not in rtnl.routes(eth0)
            polls += 1
            time.sleep(0.001)

    thread = threading.Thread(target=poll)
    started = time.monotonic()
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        rtnl.close()
    seconds = time.monotonic() - started
    assert polls >= MIN_POLLS and seconds / polls < MAX_POLL_INTERVAL, \
        f"{polls} polls in {seconds:.3f} s: too few or too far apart to tell"
    assert missing == 0, f"{destination} via {gateway} missing in {missing} of {polls} polls"


def restarted_subnet(daemon: Flanneld) -> ipaddress.IPv4Network:
    """The subnet of a daemon just started again, once this run has written subnet.env (the
    last run's is there from the start)."""
    daemon.wait_log(f"wrote {daemon.subnet_file}: FLANNEL_SUBNET")
    return daemon.wait_subnet()


def start_hosts(cluster: Cluster, backend: str, count: int
                ) -> list[tuple[Flanneld, ipaddress.IPv4Network]]:
    """The backend's config, then count daemons one after the other, each with a container
    on its subnet."""
    cluster.config(CONFIGS[backend])
    started = []
    for _ in range(count):
        daemon = cluster.daemon()
        subnet = daemon.wait_subnet()
        assert daemon.subnet_env()["FLANNEL_MTU"] == str(MTU[backend])
        cluster.bed.add_container(daemon.host, str(subnet), MTU[backend])
        started.append((daemon, subnet))
    return started


@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_two_hosts_carry_traffic_with_flanneld_s_leases_devices_and_routes(
        cluster: Cluster, backend: str) -> None:
    (a, a_subnet), (b, b_subnet) = start_hosts(cluster, backend, 2)
    assert cluster.leases() == {key_of(a_subnet, cluster.prefix): expected_value(a.host, backend),
                                key_of(b_subnet, cluster.prefix): expected_value(b.host, backend)}
    for daemon, peer, peer_subnet in ((a, b, b_subnet), (b, a, a_subnet)):
        wait_for(lambda d=daemon, s=peer_subnet: routed(d.host, s), 2, "the peer routed")
        host = daemon.host
        # Protocol boot, as flanneld's: `ip route` shows no `proto`.
        if backend == "host-gw":
            assert routed(host, peer_subnet).split() == [
                str(peer_subnet), "via", peer.host.underlay_ip, "dev", "eth0"]
            assert host.ip("link", "show", "flannel.1", check=False).returncode != 0
            continue
        device = host.link("flannel.1")
        info = device["linkinfo"]["info_data"]
        assert (device["mtu"], info["id"], info["local"], info["link"], info["port"],
                info["learning"]) == (1450, 1, host.underlay_ip, "eth0", 8472, False)
        assert device["ifname"] == "flannel.1" and "UP" in device["flags"]
        assert txqlen(host, "flannel.1") == 0 and "txqlen" not in device  # as flanneld's
        own = daemon.wait_subnet()
        assert host.ip("-4", "-o", "addr", "show", "flannel.1").stdout.split()[3] == (
            f"{own.network_address}/32")
        peer_mac = peer.host.link("flannel.1")["address"]
        gateway = str(peer_subnet.network_address)
        assert routed(host, peer_subnet).split() == [
            str(peer_subnet), "via", gateway, "dev", "flannel.1", "onlink"]
        neigh = host.ip("neigh", "show", "dev", "flannel.1").stdout.split()
        assert neigh == [gateway, "lladdr", peer_mac, "PERMANENT"]
        fdb = host.run("bridge", "fdb", "show", "dev", "flannel.1").stdout
        assert f"{peer_mac} dst {peer.host.underlay_ip} self permanent" in fdb
    for src, dst in ((a.host, b.host), (b.host, a.host)):
        assert reaches(src, dst)
        assert dst.container_netns and dst.container_ip and src.container_netns
        assert tcp_transfer(dst.container_netns, dst.container_ip, src.container_netns,
                            nbytes=8 << 20) == 8 << 20


@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_a_host_joining_and_a_lease_removed_are_routed_within_2s(cluster: Cluster,
                                                                   backend: str) -> None:
    (a, _), = start_hosts(cluster, backend, 1)
    c = cluster.daemon()
    c_subnet = c.wait_subnet()
    wait_for(lambda: routed(a.host, c_subnet), 2, "a host that joined routed")
    c.stop()  # or it would take its lease again
    cluster.etcd.delete(key_of(c_subnet, cluster.prefix), cluster.api)
    wait_for(lambda: not routed(a.host, c_subnet), 2, "a removed lease unrouted")
    if backend == "vxlan":  # the route goes last
        assert a.host.ip("neigh", "show", "dev", "flannel.1").stdout.strip() == ""
        assert "dst" not in a.host.run("bridge", "fdb", "show", "dev", "flannel.1").stdout


def test_a_vxlan_restart_keeps_subnet_device_and_mac_and_drops_what_left_meanwhile(
        cluster: Cluster) -> None:
    (a, a_subnet), (b, b_subnet) = start_hosts(cluster, "vxlan", 2)
    wait_for(lambda: reaches(a.host, b.host), 5, "b reached")
    mac, index = (a.host.link("flannel.1")[key] for key in ("address", "ifindex"))
    a.stop()
    gone = cluster.daemon()  # a host that leaves while a is down
    gone_subnet = gone.wait_subnet()
    gone.stop()
    cluster.etcd.delete(key_of(gone_subnet, cluster.prefix), cluster.api)
    cluster.put(f"/subnets/{gone_subnet.network_address}-24",
                '{"PublicIP":"198.18.0.250","BackendType":"host-gw"}')  # another backend's
    a.start()
    assert a.wait_subnet() == a_subnet
    a.wait_log("ignoring non-vxlan subnet")
    assert (a.host.link("flannel.1")["address"], a.host.link("flannel.1")["ifindex"]
            ) == (mac, index)
    assert cluster.leases()[key_of(a_subnet, cluster.prefix)] == expected_value(a.host, "vxlan")
    wait_for(lambda: reaches(a.host, b.host) and reaches(b.host, a.host), 5, "both ways again")
    assert not routed(a.host, gone_subnet)


# Every ordered pair of the three backends once, each run on what the one before left.
BACKEND_WALK = ["udp", "vxlan", "host-gw", "udp", "host-gw", "vxlan", "udp"]


def tc_programs(host: Host) -> int:
    """How many programs hang on the host's eth0 ingress, where the udp backend's kernel path
    puts one: tcx links as the kernel counts them (BPF_PROG_QUERY through libbpf in the host's
    namespace; bpftool 7.1's `net show` does not list them), and classic tc filters."""
    count = ctypes.c_uint32(0)
    for soname in LIBBPF_SONAMES:  # without libbpf there is no kernel path: none of either
        try:
            libbpf = ctypes.CDLL(soname)
        except OSError:
            continue
        with inside(host.netns):
            ifindex = socket.if_nametoindex("eth0")
            # A kernel without tcx refuses the query; it has only classic filters.
            if libbpf.bpf_prog_query(ifindex, BPF_TCX_INGRESS, 0, None, None,
                                     ctypes.byref(count)) < 0:
                count.value = 0
        break
    filters = host.run("tc", "filter", "show", "dev", "eth0", "ingress").stdout
    return count.value + sum(" bpf " in line for line in filters.splitlines())


def leftovers(host: Host, backend: str) -> list[str]:
    """What the backends other than `backend` make that is on the host: vxlan's devices,
    host-gw's routes via a gateway out of eth0, udp's TUN, receive device and the tc programs
    of its kernel path."""
    found = []
    for link in json.loads(host.ip("-d", "-j", "link", "show").stdout):
        kind = link.get("linkinfo", {}).get("info_kind")
        owner = "udp" if kind == "tun" or link["ifname"] == RX_VXLAN_DEVICE else kind
        if kind in ("vxlan", "tun") and owner != backend:
            found.append(f"{kind} device {link['ifname']}")
    if backend != "host-gw":
        found += [f"route {route['dst']} via {route['gateway']} dev eth0"
                  for route in json.loads(host.ip("-j", "route", "show", "dev", "eth0", "root",
                                                  NETWORK).stdout)
                  if "gateway" in route]
    programs = tc_programs(host) if backend != "udp" else 0
    if programs:
        found.append(f"{programs} tc program(s) on eth0")
    return found


def peer_route(backend: str, peer: Host, peer_subnet: ipaddress.IPv4Network) -> tuple[str, str]:
    """(destination, `ip route show <destination>`) of the route the backend makes to the
    peer: its subnet's, or udp's one route for the whole Network."""
    if backend == "vxlan":
        return (str(peer_subnet),
                f"{peer_subnet} via {peer_subnet.network_address} dev flannel.1 onlink")
    if backend == "host-gw":
        return str(peer_subnet), f"{peer_subnet} via {peer.underlay_ip} dev eth0"
    return NETWORK, f"{NETWORK} dev flannel0"


def test_changing_backend_between_runs_clears_the_previous_one(cluster: Cluster) -> None:
    (a, a_subnet), (b, b_subnet) = start_hosts(cluster, BACKEND_WALK[0], 2)
    for previous, backend in itertools.pairwise(BACKEND_WALK):
        step = f"{previous} -> {backend}"
        for daemon in (a, b):
            daemon.stop()
        cluster.config(CONFIGS[backend])
        for daemon in (a, b):
            daemon.start()
        assert (restarted_subnet(a), restarted_subnet(b)) == (a_subnet, b_subnet), step
        if previous == "vxlan":  # the device outlives its daemon: the next run deletes it
            a.wait_log("deleting flannel.1, left by an earlier vxlan backend")
        if previous == "udp":  # and udp's receive device
            a.wait_log(f"deleted {RX_VXLAN_DEVICE}, left by an earlier udp backend")
        if previous == "host-gw":  # so do the routes
            a.wait_log(f"deleting route {b_subnet} via {b.host.underlay_ip}, left by an "
                       "earlier host-gw backend")
        for daemon, peer, peer_subnet in ((a, b, b_subnet), (b, a, a_subnet)):
            host = daemon.host
            assert leftovers(host, backend) == [], step
            destination, route = peer_route(backend, peer.host, peer_subnet)
            wait_for(lambda h=host, d=destination, r=route: routed(h, d) == r, 2,
                     f"{step}: the route")
        # What leftovers() looks for is there to find while its backend runs.
        made = leftovers(a.host, "")
        udp_made = ["tun device flannel0"]
        if backend == "udp" and "the kernel path cannot run here" not in a.log():
            assert made.pop() == "1 tc program(s) on eth0", step  # its ingress program
            udp_made.append(f"vxlan device {RX_VXLAN_DEVICE}")  # its receive device
        assert sorted(made) == {
            "udp": udp_made, "vxlan": ["vxlan device flannel.1"],
            "host-gw": [f"route {b_subnet} via {b.host.underlay_ip} dev eth0"]}[backend], step
        assert cluster.leases() == {
            key_of(a_subnet, cluster.prefix): expected_value(a.host, backend),
            key_of(b_subnet, cluster.prefix): expected_value(b.host, backend)}, step
        wait_for(lambda: reaches(a.host, b.host) and reaches(b.host, a.host), 5,
                 f"{step}: both ways")


def test_vxlan_direct_routing_takes_a_peer_on_the_same_network_around_the_device(
        cluster: Cluster) -> None:
    (a, a_subnet), (b, b_subnet) = start_hosts(cluster, "vxlan-direct", 2)
    for daemon, peer, peer_subnet in ((a, b, b_subnet), (b, a, a_subnet)):
        wait_for(lambda d=daemon, s=peer_subnet: routed(d.host, s), 2, "the peer routed")
        assert routed(daemon.host, peer_subnet).split()[:5] == [
            str(peer_subnet), "via", peer.host.underlay_ip, "dev", "eth0"]
        assert daemon.host.ip("neigh", "show", "dev", "flannel.1").stdout.strip() == ""
    assert reaches(a.host, b.host) and reaches(b.host, a.host)


def test_a_vxlan_direct_routing_restart_keeps_the_direct_route_throughout(
        cluster: Cluster) -> None:
    (a, _), (b, b_subnet) = start_hosts(cluster, "vxlan-direct", 2)
    wait_for(lambda: routed(a.host, b_subnet) == f"{b_subnet} via {b.host.underlay_ip} dev eth0",
             2, "the direct route")
    a.stop()
    # A peer on the same network that left while a was down: its direct route stays behind.
    a.host.ip("route", "add", "10.244.250.0/24", "via", "198.18.0.250", "dev", "eth0")
    # Through the listing of the leases and the pruning after it, where the direct route went.
    with route_kept(a.host, b_subnet, b.host.underlay_ip):
        a.start()
        a.wait_log("subnet added")
        a.wait_log("removing route 10.244.250.0/24 via 198.18.0.250, which no lease explains")
    assert not routed(a.host, "10.244.250.0/24")
    assert routed(a.host, b_subnet) == f"{b_subnet} via {b.host.underlay_ip} dev eth0"
    assert reaches(a.host, b.host) and reaches(b.host, a.host)


def test_host_gw_logs_the_leases_it_cannot_route_and_a_restart_keeps_subnet_and_routes(
        cluster: Cluster) -> None:
    off_network = '{"PublicIP":"203.0.113.%d","PublicIPv6":null,"BackendType":"host-gw"}'
    # One of each before the daemons list the leases, one of each while they watch them.
    cluster.put("/subnets/10.244.201.0-24", off_network % 1)
    cluster.put("/subnets/10.244.202.0-24", '{"PublicIP":"198.18.0.251","PublicIPv6":null}')
    (a, a_subnet), (b, b_subnet) = start_hosts(cluster, "host-gw", 2)
    cluster.put("/subnets/10.244.203.0-24", off_network % 3)
    cluster.put("/subnets/10.244.204.0-24",
                '{"PublicIP":"198.18.0.252","PublicIPv6":null,"BackendType":"vxlan",'
                '"BackendData":{"VNI":1,"VtepMAC":"1a:fd:f4:c0:3d:3b"}}')
    for third, public_ip in ((1, "203.0.113.1"), (3, "203.0.113.3")):
        a.wait_log(f"cannot route 10.244.20{third}.0/24 via {public_ip} (not on the network of "
                   "eth0): [Errno 101] Network is unreachable")
    a.wait_log("ignoring non-host-gw subnet 10.244.202.0/24: type=\n")  # udp's: no type
    a.wait_log("ignoring non-host-gw subnet 10.244.204.0/24: type=vxlan\n")
    for third in range(1, 5):
        assert not routed(a.host, f"10.244.20{third}.0/24")
    assert reaches(a.host, b.host)

    with route_kept(a.host, b_subnet, b.host.underlay_ip):
        a.stop()
        a.start()
        assert restarted_subnet(a) == a_subnet
        a.wait_log("subnet added")
    assert cluster.leases()[key_of(a_subnet, cluster.prefix)] == expected_value(a.host,
                                                                                "host-gw")
    assert routed(b.host, a_subnet) == f"{a_subnet} via {a.host.underlay_ip} dev eth0"
    assert reaches(a.host, b.host) and reaches(b.host, a.host)


def test_vxlan_vni_port_gbp_and_learning_make_flanneld_s_device_and_carry_traffic(
        cluster: Cluster) -> None:
    (a, a_subnet), (b, b_subnet) = start_hosts(cluster, "vxlan-42", 2)
    for daemon, peer, peer_subnet in ((a, b, b_subnet), (b, a, a_subnet)):
        host = daemon.host
        device = host.link("flannel.42")
        info = device["linkinfo"]["info_data"]
        assert (info["id"], info["port"], info.get("gbp"), info["learning"], info["link"]) == (
            42, 4789, True, True, "eth0")
        assert host.ip("link", "show", "flannel.1", check=False).returncode != 0
        wait_for(lambda h=host, s=peer_subnet: routed(h, s) == (
            f"{s} via {s.network_address} dev flannel.42 onlink"), 2, "the peer routed")
        peer_mac = peer.host.link("flannel.42")["address"]
        assert host.ip("neigh", "show", "dev", "flannel.42").stdout.split() == [
            str(peer_subnet.network_address), "lladdr", peer_mac, "PERMANENT"]
    assert cluster.leases() == {
        key_of(subnet, cluster.prefix): expected_value(daemon.host, "vxlan", "flannel.42", 42)
        for daemon, subnet in ((a, a_subnet), (b, b_subnet))}
    for src, dst in ((a.host, b.host), (b.host, a.host)):
        assert reaches(src, dst)
        assert dst.container_netns and dst.container_ip and src.container_netns
        assert tcp_transfer(dst.container_netns, dst.container_ip, src.container_netns,
                            nbytes=4 << 20) == 4 << 20


@pytest.mark.parametrize(("port", "dst_port", "why"), [
    (70000, 4464, "its low 16 bits"), (-1, 8472, "the kernel's default")])
def test_a_vxlan_port_out_of_range_is_what_flanneld_makes_of_it(
        cluster: Cluster, port: int, dst_port: int, why: str) -> None:
    """flanneld v0.20.2 makes flannel.1 with dstport 4464 for Port 70000 and 8472 for -1."""
    cluster.config({"Network": NETWORK, "Backend": {"Type": "vxlan", "Port": port}})
    daemon = cluster.daemon()
    daemon.wait_subnet()
    daemon.wait_log(f"Backend.Port {port} is outside 1-65535: flannel.1 uses port {dst_port}, "
                    f"as flanneld's does ({why})")
    device = daemon.host.link("flannel.1")
    assert device["linkinfo"]["info_data"]["port"] == dst_port
    daemon.stop()
    daemon.start()
    restarted_subnet(daemon)
    assert daemon.host.link("flannel.1")["address"] == device["address"]  # kept


@pytest.mark.parametrize(("data", "reason"), [
    (None, "not an object"), ("[1]", "not an object"), ('{"VNI":1}', "not a MAC"),
    ('{"VtepMAC":"1a:fd:f4:c0:3d"}', "not a MAC"), ('{"VtepMAC":7}', "not a MAC"),
    ('{"VtepMAC":"1a:fd:f4:c0:3d:zz"}', "not a MAC")])
def test_a_vxlan_lease_without_a_vtep_mac_is_refused(data: str | None, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        vtep_mac(data)
    assert vtep_mac('{"vtepmac":"1A:FD:F4:C0:3D:3B"}') == "1a:fd:f4:c0:3d:3b"


def test_a_malformed_vxlan_lease_of_another_host_is_logged_and_the_rest_routed(
        cluster: Cluster) -> None:
    cluster.config(VXLAN)
    cluster.put("/subnets/10.244.200.0-24",
                '{"PublicIP":"198.18.0.250","BackendType":"vxlan","BackendData":{"VNI":1}}')
    (a, _), (b, b_subnet) = start_hosts(cluster, "vxlan", 2)
    a.wait_log("ignoring lease 10.244.200.0/24: VtepMAC None is not a MAC address")
    wait_for(lambda: reaches(a.host, b.host), 5, "the good peer reached")
    assert not routed(a.host, "10.244.200.0/24")


def test_a_vxlan_port_that_is_taken_is_logged_and_retried(cluster: Cluster) -> None:
    cluster.config({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Port": 4789}})
    daemon = cluster.daemon(start=False)
    with inside(daemon.host.netns):
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with holder:
        holder.bind(("0.0.0.0", 4789))
        daemon.start()
        daemon.wait_log("flannel.1: UDP port 4789 is taken by another socket; trying again",
                        count=2)
        assert not os.path.exists(daemon.subnet_file)
    daemon.wait_subnet()
    assert daemon.host.link("flannel.1")["linkinfo"]["info_data"]["port"] == 4789


@dataclass
class Mixed:
    """One cluster of `backend` on etcd's v3 API: flanneld on one host, pyflanneld on the
    other, each with a container."""
    bed: Testbed
    etcd: EtcdServer
    backend: str
    flanneld: RealFlanneld
    pyflanneld: Flanneld


@pytest.fixture(scope="module", params=["vxlan", "host-gw"])
def mixed(request: pytest.FixtureRequest) -> Iterator[Mixed]:
    if not os.path.exists(REFERENCE_FLANNELD):
        pytest.skip(f"no reference flanneld at {REFERENCE_FLANNELD}")
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        try:
            put_config(etcd, "v3", CONFIGS[request.param])
            with beside_flanneld(bed, etcd, device="flannel.1") as (flanneld, pyflanneld):
                yield Mixed(bed, etcd, request.param, flanneld, pyflanneld)
        finally:
            etcd.stop()


def test_with_flanneld_containers_reach_each_other_both_ways(mixed: Mixed) -> None:
    hosts = (mixed.flanneld.host, mixed.pyflanneld.host)
    for src, dst in (hosts, hosts[::-1]):
        result = src.in_container("ping", "-c", "3", "-i", "0.2", "-W", "2", str(dst.container_ip),
                                  check=False)
        assert "3 received" in result.stdout, result.stdout + result.stderr
        assert dst.container_netns and dst.container_ip and src.container_netns
        assert tcp_transfer(dst.container_netns, dst.container_ip, src.container_netns,
                            nbytes=8 << 20) == 8 << 20


def mixed_leases(mixed: Mixed) -> tuple[str, str]:
    """(flanneld's lease value, pyflanneld's)."""
    leases = mixed.etcd.get_prefix(f"{PREFIX}/subnets/", "v3")
    f_subnet, p_subnet = (daemon.wait_subnet() for daemon in (mixed.flanneld, mixed.pyflanneld))
    return leases[key_of(f_subnet, PREFIX)], leases[key_of(p_subnet, PREFIX)]


def test_beside_flanneld_the_lease_and_subnet_env_are_flanneld_s_but_for_the_host(
        mixed: Mixed) -> None:
    """pyflanneld's lease value is byte for byte what flanneld writes, its own PublicIP (and
    VtepMAC) in place of flanneld's: same keys, same order, same spelling."""
    f_value, p_value = mixed_leases(mixed)
    f_host, p_host = mixed.flanneld.host, mixed.pyflanneld.host
    ours = f_value.replace(f'"PublicIP":"{f_host.underlay_ip}"',
                           f'"PublicIP":"{p_host.underlay_ip}"')
    if mixed.backend == "vxlan":
        f_mac = json.loads(f_value)["BackendData"]["VtepMAC"]
        assert f_mac == f_host.link("flannel.1")["address"]
        ours = ours.replace(f'"VtepMAC":"{f_mac}"',
                            f'"VtepMAC":"{p_host.link("flannel.1")["address"]}"')
    assert ours != f_value and p_value == ours
    f_env, p_env = (daemon.subnet_env() for daemon in (mixed.flanneld, mixed.pyflanneld))
    assert f_env.pop("FLANNEL_SUBNET") != p_env.pop("FLANNEL_SUBNET")
    assert p_env == f_env


def masked_state(host: Host, backend: str) -> dict[str, object]:
    """What the backend made on the host, as iproute2 shows it (`-d -j`), with what differs
    from host to host (indexes, MACs, addresses, subnets) masked."""
    def masked(entries: list[dict], *keys: str) -> list[dict]:
        return [{**entry, **{key: "*" for key in keys if key in entry}} for entry in entries]

    def listed(*command: str) -> list[dict]:
        return json.loads(host.run(*command).stdout or "[]")

    if backend == "host-gw":
        return {"vxlan devices": listed("ip", "-j", "link", "show", "type", "vxlan"),
                "routes": masked(listed("ip", "-d", "-j", "route", "show", "dev", "eth0",
                                        "root", NETWORK), "dst", "gateway")}
    device = host.link("flannel.1")
    device = {**device, "ifindex": "*", "address": "*",
              "linkinfo": {**device["linkinfo"], "info_data": {
                  **device["linkinfo"]["info_data"], "local": "*"}}}
    (addresses,) = listed("ip", "-j", "-4", "addr", "show", "dev", "flannel.1")
    return {"device": device,
            "addresses": masked(addresses["addr_info"], "local"),
            "routes": masked(listed("ip", "-d", "-j", "route", "show", "dev", "flannel.1"),
                             "dst", "gateway"),
            "neighbours": masked(listed("ip", "-j", "neigh", "show", "dev", "flannel.1"),
                                 "dst", "lladdr"),
            "fdb": masked([entry for entry in listed("bridge", "-j", "fdb", "show", "dev",
                                                     "flannel.1") if "dst" in entry],
                          "mac", "dst")}


def test_beside_flanneld_the_device_and_routes_are_flanneld_s_but_for_the_host(
        mixed: Mixed) -> None:
    f_state, p_state = (masked_state(daemon.host, mixed.backend)
                        for daemon in (mixed.flanneld, mixed.pyflanneld))
    assert f_state["routes"], "flanneld routed nothing to compare with"
    assert p_state == f_state


def test_beside_flanneld_a_host_joining_and_a_lease_removed_show_on_both_within_2s(
        mixed: Mixed) -> None:
    hosts = (mixed.flanneld.host, mixed.pyflanneld.host)
    joining = Flanneld(mixed.bed, mixed.bed.add_host(), mixed.etcd, "v3")
    try:
        joining.start()
        subnet = joining.wait_subnet()
        via = (f"via {subnet.network_address} dev flannel.1" if mixed.backend == "vxlan"
               else f"via {joining.host.underlay_ip} dev eth0")
        wait_for(lambda: all(via in routed(host, subnet) for host in hosts), 2,
                 "the host that joined routed on both")
    finally:
        joining.stop()
    mixed.etcd.delete(key_of(subnet, PREFIX), "v3")
    wait_for(lambda: not any(routed(host, subnet) for host in hosts), 2,
             "the removed lease unrouted on both")
    if mixed.backend == "vxlan":
        for host in hosts:
            assert str(subnet.network_address) not in host.ip("neigh", "show", "dev",
                                                               "flannel.1").stdout


def test_beside_flanneld_a_pyflanneld_restart_keeps_subnet_and_vtep_mac(mixed: Mixed) -> None:
    daemon = mixed.pyflanneld
    subnet, (_, value) = daemon.wait_subnet(), mixed_leases(mixed)
    mac = daemon.host.link("flannel.1")["address"] if mixed.backend == "vxlan" else None
    daemon.stop()
    daemon.start()
    assert restarted_subnet(daemon) == subnet
    daemon.wait_log("subnet added")
    assert mixed_leases(mixed)[1] == value
    if mac is not None:
        assert daemon.host.link("flannel.1")["address"] == mac
    assert wait_reachable(mixed.flanneld.host, daemon.host)
