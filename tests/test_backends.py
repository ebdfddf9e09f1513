"""The vxlan and host-gw backends on both etcd APIs: what flanneld v0.20.2 writes and sets up
(lease values, devices, neighbours, forwarding entries, routes, subnet.env), read back with
independent tools (etcd, `ip`, `bridge`), and traffic between containers across the hosts;
then the same beside the reference flanneld in one cluster."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Iterator

import pytest

from control.lease import PeerLease
from control.vxlan import vtep_mac
from tests.cluster import Cluster, Flanneld, key_of, put_config, wait_for
from tests.etcd import EtcdServer
from tests.flanneld import REFERENCE_FLANNELD, beside_flanneld, reaches
from tests.testbed import Host, Testbed, inside, tcp_transfer

VXLAN = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}
HOST_GW = {"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}
VXLAN_DIRECT = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": True}}
CONFIGS = {"vxlan": VXLAN, "host-gw": HOST_GW, "vxlan-direct": VXLAN_DIRECT}
# The underlay's 1500 less VXLAN's 50, or all of it.
MTU = {"vxlan": 1450, "host-gw": 1500, "vxlan-direct": 1450}


def link_json(host: Host, device: str) -> dict:
    return json.loads(host.ip("-d", "-j", "link", "show", device).stdout)[0]


def expected_value(host: Host, backend: str) -> str:
    if backend == "host-gw":
        return f'{{"PublicIP":"{host.underlay_ip}","PublicIPv6":null,"BackendType":"host-gw"}}'
    mac = link_json(host, "flannel.1")["address"]
    return (f'{{"PublicIP":"{host.underlay_ip}","PublicIPv6":null,"BackendType":"vxlan",'
            f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}')


def routed(host: Host, subnet: ipaddress.IPv4Network | str) -> str:
    return host.ip("route", "show", str(subnet)).stdout.strip()


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
        if backend == "host-gw":
            assert routed(host, peer_subnet).split() == [
                str(peer_subnet), "via", peer.host.underlay_ip, "dev", "eth0", "proto",
                "static"]
            assert host.ip("link", "show", "flannel.1", check=False).returncode != 0
            continue
        device = link_json(host, "flannel.1")
        info = device["linkinfo"]["info_data"]
        assert (device["mtu"], info["id"], info["local"], info["port"], info["learning"]) == (
            1450, 1, host.underlay_ip, 8472, False)
        assert device["ifname"] == "flannel.1" and "UP" in device["flags"]
        own = daemon.wait_subnet()
        assert host.ip("-4", "-o", "addr", "show", "flannel.1").stdout.split()[3] == (
            f"{own.network_address}/32")
        peer_mac = link_json(peer.host, "flannel.1")["address"]
        gateway = str(peer_subnet.network_address)
        assert routed(host, peer_subnet).split()[:7] == [
            str(peer_subnet), "via", gateway, "dev", "flannel.1", "proto", "static"]
        assert "onlink" in routed(host, peer_subnet)
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
    mac, index = (link_json(a.host, "flannel.1")[key] for key in ("address", "ifindex"))
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
    assert (link_json(a.host, "flannel.1")["address"], link_json(a.host, "flannel.1")["ifindex"]
            ) == (mac, index)
    assert cluster.leases()[key_of(a_subnet, cluster.prefix)] == expected_value(a.host, "vxlan")
    wait_for(lambda: reaches(a.host, b.host) and reaches(b.host, a.host), 5, "both ways again")
    assert not routed(a.host, gone_subnet)


def test_changing_backend_between_runs_clears_the_previous_one(cluster: Cluster) -> None:
    (a, a_subnet), (b, b_subnet) = start_hosts(cluster, "vxlan", 2)
    wait_for(lambda: routed(a.host, b_subnet), 2, "vxlan route")
    for daemon in (a, b):
        daemon.stop()
    cluster.config(HOST_GW)
    for daemon in (a, b):
        daemon.start()
        daemon.wait_log("deleting flannel.1, left by an earlier vxlan backend")
    assert a.host.ip("link", "show", "flannel.1", check=False).returncode != 0
    wait_for(lambda: "via " + b.host.underlay_ip in routed(a.host, b_subnet), 2,
             "host-gw route")
    assert cluster.leases()[key_of(a_subnet, cluster.prefix)] == expected_value(a.host,
                                                                                "host-gw")
    wait_for(lambda: reaches(a.host, b.host), 5, "b reached over host-gw")
    for daemon in (a, b):
        daemon.stop()
    cluster.config({"Network": "10.244.0.0/16"})
    a.start()
    a.wait_log(f"deleting route {b_subnet} via {b.host.underlay_ip}, left by an earlier "
               "host-gw backend")
    wait_for(lambda: "dev flannel0" in routed(a.host, "10.244.0.0/16"), 5, "udp's route")
    assert not routed(a.host, b_subnet)


def test_vxlan_direct_routing_takes_a_peer_on_the_same_network_around_the_device(
        cluster: Cluster) -> None:
    (a, a_subnet), (b, b_subnet) = start_hosts(cluster, "vxlan-direct", 2)
    for daemon, peer, peer_subnet in ((a, b, b_subnet), (b, a, a_subnet)):
        wait_for(lambda d=daemon, s=peer_subnet: routed(d.host, s), 2, "the peer routed")
        assert routed(daemon.host, peer_subnet).split()[:5] == [
            str(peer_subnet), "via", peer.host.underlay_ip, "dev", "eth0"]
        assert daemon.host.ip("neigh", "show", "dev", "flannel.1").stdout.strip() == ""
    assert reaches(a.host, b.host) and reaches(b.host, a.host)


@pytest.mark.parametrize(("data", "reason"), [
    (None, "not an object"), ("[1]", "not an object"), ('{"VNI":1}', "not a MAC"),
    ('{"VtepMAC":"1a:fd:f4:c0:3d"}', "not a MAC"), ('{"VtepMAC":7}', "not a MAC"),
    ('{"VtepMAC":"1a:fd:f4:c0:3d:zz"}', "not a MAC")])
def test_a_vxlan_lease_without_a_vtep_mac_is_refused(data: str | None, reason: str) -> None:
    lease = PeerLease(ipaddress.IPv4Address("198.18.0.9"), "vxlan", data)
    with pytest.raises(ValueError, match=reason):
        vtep_mac(lease)
    assert vtep_mac(PeerLease(lease.public_ip, "vxlan", '{"vtepmac":"1A:FD:F4:C0:3D:3B"}')
                    ) == "1a:fd:f4:c0:3d:3b"


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
    assert link_json(daemon.host, "flannel.1")["linkinfo"]["info_data"]["port"] == 4789


@pytest.fixture(scope="module", params=["vxlan", "host-gw"])
def mixed(request: pytest.FixtureRequest) -> Iterator[tuple[Host, Host]]:
    """(flanneld's host, pyflanneld's host) of one cluster of `param`'s backend, each with a
    container."""
    if not os.path.exists(REFERENCE_FLANNELD):
        pytest.skip(f"no reference flanneld at {REFERENCE_FLANNELD}")
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        try:
            put_config(etcd, "v3", CONFIGS[request.param])
            with beside_flanneld(bed, etcd, device="flannel.1") as hosts:
                yield hosts
        finally:
            etcd.stop()


def test_with_flanneld_containers_reach_each_other_both_ways(mixed: tuple[Host, Host]) -> None:
    for src, dst in (mixed, mixed[::-1]):
        result = src.in_container("ping", "-c", "3", "-i", "0.2", "-W", "2", str(dst.container_ip),
                                  check=False)
        assert "3 received" in result.stdout, result.stdout + result.stderr
        assert dst.container_netns and dst.container_ip and src.container_netns
        assert tcp_transfer(dst.container_netns, dst.container_ip, src.container_netns,
                            nbytes=8 << 20) == 8 << 20
