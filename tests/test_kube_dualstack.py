"""Dual-stack and IPv6-only networks in kube mode (`--kube-subnet-mgr`), on a real API server and
controller manager v1.19.0 with its IPv6DualStack gate on (tests/kubeapi.py), beside the real
flanneld v0.20.2 in kube mode: the vxlan and host-gw backends route both families as flanneld
does from the Nodes' podCIDRs of each family, and write flanneld's annotations (public-ipv6 and
backend-v6-data among them); Nodes flanneld panics on (no IPv6 podCIDR, no public-ipv6) are
routed for IPv4 and logged; this host's Node without its IPv6 podCIDR is waited for.

The hosts have an IPv4 and an IPv6 address on eth0 (2001:db8:0:1::/64), registered as the
Node's InternalIPs; flanneld is given --public-ipv6, as in tests/test_dualstack.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pytest

from tests import test_kube
from tests.conftest import CLUSTER_CIDR, control_plane
from tests.etcd import EtcdServer
from tests.flanneld import REFERENCE_FLANNELD
from tests.kubeapi import KUBELET_ANNOTATIONS, KubeApi
from tests.test_dualstack import (
    NETWORK6,
    add_container,
    check_ipv6_peer_entries,
    ipv6_state,
    reach_each_other,
)
from tests.test_kube import ANNOTATION, KubePyflanneld
from tests.test_kubeapi import KubeFlanneld, flannel_annotations, wait_for
from tests.testbed import Host, Testbed, tcp_transfer

daemons = test_kube.daemons  # its fixture (what a test started, stopped at its end), here too

DUAL: Mapping[str, object] = {"Network": CLUSTER_CIDR, "EnableIPv6": True,
                              "IPv6Network": NETWORK6}
IPV6_ONLY: Mapping[str, object] = {"EnableIPv4": False, "EnableIPv6": True,
                                   "IPv6Network": NETWORK6}
# What flanneld writes on its Node in a dual-stack network.
DUAL_ANNOTATIONS = {"kube-subnet-manager", "backend-type", "backend-data", "public-ip",
                    "backend-v6-data", "public-ipv6"}


@pytest.fixture(scope="module")
def kube_dual() -> Iterator[tuple[Testbed, EtcdServer, KubeApi]]:
    """A dual-stack control plane: each Node gets a podCIDR of each family, a /24 of
    CLUSTER_CIDR and a /64 of NETWORK6."""
    with control_plane(f"{CLUSTER_CIDR},{NETWORK6}") as plane:
        yield plane


@pytest.fixture
def nodes() -> Iterator[list[tuple[KubeApi, str]]]:
    """Nodes a test made, deleted at its end: the control planes serve the whole module."""
    made: list[tuple[KubeApi, str]] = []
    yield made
    for api, name in made:
        api.request("DELETE", f"/api/v1/nodes/{name}", check=False)


def register(api: KubeApi, name: str, host: Host) -> list[str]:
    """Register the host as Node `name`, as its kubelet does (an InternalIP of each family);
    its podCIDRs once the controller manager has set them."""
    assert host.underlay_ipv6
    api.register_node(name, [host.underlay_ip, host.underlay_ipv6])
    api.wait_pod_cidr(name)
    return list(api.node(name)["spec"]["podCIDRs"])


def leased(daemon: KubeFlanneld | KubePyflanneld) -> list[str]:
    """The two subnets of the daemon's subnet.env once written, as a Node's podCIDRs list
    them."""
    return [str(daemon.wait_subnet(40)), str(daemon.wait_ipv6_subnet(40))]


@dataclass
class KubeDual:
    """One dual-stack cluster of `backend` on the dual-stack control plane: flanneld's Node and
    pyflanneld's, each host with a container of both families."""
    bed: Testbed
    api: KubeApi
    backend: str
    flanneld: KubeFlanneld
    pyflanneld: KubePyflanneld


# Of the class's scope: stopped before the tests below, whose Nodes flanneld would panic on.
@pytest.fixture(scope="class", params=["vxlan", "host-gw"])
def cluster(kube_dual: tuple[Testbed, EtcdServer, KubeApi], request: pytest.FixtureRequest
            ) -> Iterator[KubeDual]:
    if not os.path.exists(REFERENCE_FLANNELD):
        pytest.skip(f"no reference flanneld at {REFERENCE_FLANNELD}")
    bed, _, api = kube_dual
    backend = request.param
    started: list[KubeFlanneld | KubePyflanneld] = []
    try:
        f_host = bed.add_host(ipv6=True)
        name = f"ds-{backend}-flanneld"
        assert len(register(api, name, f_host)) == 2
        flanneld = KubeFlanneld(bed, f_host, name, api.node_kubeconfig(name), backend,
                                network=DUAL, flags=(f"--public-ipv6={f_host.underlay_ipv6}",))
        started.append(flanneld)
        flanneld.start()
        flanneld.wait_ipv6_subnet(timeout=40)
        add_container(bed, flanneld)
        p_host = bed.add_host(ipv6=True)
        name = f"ds-{backend}-pyflanneld"
        register(api, name, p_host)
        pyflanneld = KubePyflanneld(bed, p_host, api, name, {"Type": backend}, network=DUAL)
        started.append(pyflanneld)
        pyflanneld.start()
        pyflanneld.wait_ipv6_subnet(timeout=40)
        add_container(bed, pyflanneld)
        reach_each_other([f_host, p_host])
        yield KubeDual(bed, api, backend, flanneld, pyflanneld)
    finally:
        for daemon in started:
            daemon.stop()
        # So that the next backend's cluster has none of this one's Nodes as peers.
        for daemon in started:
            api.delete_node(daemon.node_name)


def routed(host: Host, subnets: list[str], device6: str) -> bool:
    """Whether the host routes the IPv4 and the IPv6 subnet (the latter through device6)."""
    ipv4, ipv6 = subnets
    return (ipv4 in host.ip("route", "show", ipv4).stdout
            and f"dev {device6} " in host.ip("-6", "route", "show", ipv6).stdout)


class TestBesideFlanneld:
    """A dual-stack cluster of each backend: flanneld's Node and pyflanneld's."""

    def test_containers_reach_each_other_over_both_families_and_tcp_runs_over_ipv6(
            self, cluster: KubeDual) -> None:
        hosts = [cluster.flanneld.host, cluster.pyflanneld.host]
        reach_each_other(hosts)
        for src, dst in (hosts, hosts[::-1]):
            assert dst.container_netns and dst.container_ipv6 and src.container_netns
            assert tcp_transfer(dst.container_netns, dst.container_ipv6, src.container_netns,
                                nbytes=4 << 20) == 4 << 20

    def test_the_node_annotations_and_subnet_env_are_flanneld_s_but_for_the_host(
            self, cluster: KubeDual) -> None:
        """The same annotation keys and values, this host's addresses (and VtepMACs) in place of
        flanneld's; each subnet.env holds its Node's two podCIDRs."""
        api = cluster.api
        f_host, p_host = cluster.flanneld.host, cluster.pyflanneld.host
        f_marks = flannel_annotations(api, cluster.flanneld.node_name)
        p_marks = flannel_annotations(api, cluster.pyflanneld.node_name)
        assert f_marks.keys() == DUAL_ANNOTATIONS, f_marks
        assert (f_marks["public-ip"], f_marks["public-ipv6"]) == (f_host.underlay_ip,
                                                                  f_host.underlay_ipv6)
        ours = {**f_marks, "public-ip": p_host.underlay_ip, "public-ipv6": p_host.underlay_ipv6}
        if cluster.backend == "vxlan":
            for key, device in (("backend-data", "flannel.1"), ("backend-v6-data", "flannel-v6.1")):
                f_mac = f_host.link(device)["address"]
                assert f_marks[key] == f'{{"VNI":1,"VtepMAC":"{f_mac}"}}'
                ours[key] = f_marks[key].replace(f_mac, p_host.link(device)["address"])
        else:
            assert f_marks["backend-v6-data"] == "null"
        assert p_marks == ours
        for daemon in (cluster.flanneld, cluster.pyflanneld):
            assert leased(daemon) == api.node(daemon.node_name)["spec"]["podCIDRs"]
        f_env, p_env = cluster.flanneld.subnet_env(), cluster.pyflanneld.subnet_env()
        for key in ("FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"):
            assert f_env.pop(key) != p_env.pop(key)
        assert p_env == f_env

    def test_the_ipv6_device_addresses_neighbours_fdb_and_routes_are_flanneld_s(
            self, cluster: KubeDual) -> None:
        f_state, p_state = (ipv6_state(daemon.host, cluster.backend)
                            for daemon in (cluster.flanneld, cluster.pyflanneld))
        assert f_state["routes"], "flanneld routed no IPv6 podCIDR to compare with"
        assert p_state == f_state
        check_ipv6_peer_entries(cluster.backend, cluster.pyflanneld.host,
                                cluster.flanneld.host, cluster.flanneld.wait_ipv6_subnet())

    def test_a_node_joining_and_leaving_is_routed_on_both_families_within_2s(
            self, cluster: KubeDual) -> None:
        """From the moment its annotations are on its Node, on flanneld's host and pyflanneld's;
        its container then reached from both over both families; deleted, unrouted in 2 s."""
        bed, api = cluster.bed, cluster.api
        hosts = [cluster.flanneld.host, cluster.pyflanneld.host]
        device6 = "flannel-v6.1" if cluster.backend == "vxlan" else "eth0"
        host = bed.add_host(ipv6=True)
        name = f"ds-{cluster.backend}-join"
        cidrs = register(api, name, host)
        newcomer = KubePyflanneld(bed, host, api, name, {"Type": cluster.backend}, network=DUAL)
        try:
            newcomer.start()
            wait_for(lambda: flannel_annotations(api, name).get("kube-subnet-manager"), 30,
                     "the newcomer's annotations")
            wait_for(lambda: all(routed(h, cidrs, device6) for h in hosts), 2.0,
                     "the Node that joined routed for both families on both hosts")
            assert leased(newcomer) == cidrs
            add_container(bed, newcomer)
            reach_each_other([*hosts, host])
        finally:
            newcomer.stop()
        api.delete_node(name)
        wait_for(lambda: not any(cidrs[0] in h.ip("route").stdout
                                 or h.ip("-6", "route", "show", cidrs[1]).stdout.strip()
                                 for h in hosts), 2.0,
                 "the deleted Node unrouted for both families on both hosts")

    def test_a_restart_keeps_both_subnets_and_both_vtep_macs(self, cluster: KubeDual) -> None:
        daemon = cluster.pyflanneld
        api, host = cluster.api, daemon.host
        marks, env = flannel_annotations(api, daemon.node_name), daemon.subnet_env()
        devices = ("flannel.1", "flannel-v6.1") if cluster.backend == "vxlan" else ()
        macs = [host.link(device)["address"] for device in devices]
        assert daemon.stop() == 0
        daemon.start()
        daemon.wait_log("annotations as they were", timeout=30)
        daemon.wait_log("running: watching Nodes", timeout=30)
        assert flannel_annotations(api, daemon.node_name) == marks
        assert daemon.subnet_env() == env
        assert [host.link(device)["address"] for device in devices] == macs
        reach_each_other([cluster.flanneld.host, host])


def flannel_marks(public_ip: str, backend: str, public_ipv6: str | None) -> dict[str, str]:
    """Annotations a dual-stack flannel daemon of `backend` would write (made up: the Node
    has no daemon); without public_ipv6 those of an IPv4 one."""
    vxlan = backend == "vxlan"
    marks = {"kube-subnet-manager": "true", "public-ip": public_ip, "backend-type": backend,
             "backend-data": '{"VNI":1,"VtepMAC":"0e:00:00:00:00:fa"}' if vxlan else "null"}
    if public_ipv6 is not None:
        marks |= {"public-ipv6": public_ipv6, "backend-v6-data":
                  '{"VNI":1,"VtepMAC":"0e:00:00:00:00:fb"}' if vxlan else "null"}
    return {ANNOTATION + key: value for key, value in marks.items()}


@pytest.mark.parametrize("backend", ["host-gw", "vxlan"])
def test_peer_nodes_without_an_ipv6_pod_cidr_or_public_ipv6_are_routed_for_ipv4_and_logged(
        kube_dual: tuple[Testbed, EtcdServer, KubeApi],
        daemons: list[KubeFlanneld | KubePyflanneld], nodes: list[tuple[KubeApi, str]],
        backend: str) -> None:
    """flanneld panics on a peer Node without an IPv6 podCIDR (flannel 1789, 2115) and drops
    one without public-ipv6: pyflanneld routes each for IPv4, says why not for IPv6, once."""
    bed, _, api = kube_dual
    host = bed.add_host(ipv6=True)
    name = f"reader-{backend}"
    nodes.append((api, name))
    register(api, name, host)
    daemon = KubePyflanneld(bed, host, api, name, {"Type": backend}, network=DUAL)
    daemons.append(daemon)
    daemon.start()
    daemon.wait_log("running: watching Nodes", timeout=40)
    # Off the controller manager's way: it hands out podCIDRs from the start of each range.
    peers = {f"no-ipv6-cidr-{backend}": (flannel_marks("198.18.0.250", backend,
                                                       "2001:db8:0:1::fa"),
                                         ["10.244.220.0/24"]),
             f"no-public-ipv6-{backend}": (flannel_marks("198.18.0.251", backend, None),
                                           ["10.244.221.0/24", "fd00:10:244:e1::/64"])}
    for peer, (marks, cidrs) in peers.items():
        nodes.append((api, peer))
        api.request("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": peer, "annotations": {**KUBELET_ANNOTATIONS, **marks}},
            "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs}})
    daemon.wait_log("subnet added: 10.244.220.0/24 via 198.18.0.250, 2001:db8:0:1::fa")
    daemon.wait_log("lease 10.244.220.0/24 has no IPv6 subnet: routed for IPv4 only")
    both = "10.244.221.0/24, fd00:10:244:e1::/64"
    daemon.wait_log(f"subnet added: {both} via 198.18.0.251")
    daemon.wait_log(f"lease {both} has no PublicIPv6: its IPv6 subnet is not routed")
    # Each again, as a kubelet's status update brings it: nothing more said.
    for peer in peers:
        api.request("PATCH", f"/api/v1/nodes/{peer}", {"metadata": {"labels": {"again": "1"}}},
                    content_type="application/strategic-merge-patch+json")
    time.sleep(1)
    log = daemon.log()
    assert log.count("has no IPv6 subnet") == 1 and log.count("has no PublicIPv6") == 1, log
    for cidr in ("10.244.220.0/24", "10.244.221.0/24"):
        assert cidr in host.ip("route", "show", cidr).stdout
    assert not host.ip("-6", "route", "show", "fd00:10:244:e1::/64").stdout.strip()
    assert daemon.process is not None and daemon.process.poll() is None
    api.delete_node(f"no-public-ipv6-{backend}")
    daemon.wait_log(f"subnet removed: {both}")


def test_its_own_node_without_an_ipv6_pod_cidr_is_waited_for_saying_why(
        kube_dual: tuple[Testbed, EtcdServer, KubeApi],
        daemons: list[KubeFlanneld | KubePyflanneld], nodes: list[tuple[KubeApi, str]]
) -> None:
    """Its Node with an IPv4 podCIDR only (a podCIDR set by hand, which the API server then
    keeps): no subnet.env and no annotations, the reason said once, until the Node is
    registered again and gets one of each family."""
    bed, _, api = kube_dual
    host = bed.add_host(ipv6=True)
    name = "ipv4-podcidr"
    nodes.append((api, name))
    api.request("POST", "/api/v1/nodes", {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": dict(KUBELET_ANNOTATIONS)},
        "spec": {"podCIDR": "10.244.222.0/24", "podCIDRs": ["10.244.222.0/24"]}})
    daemon = KubePyflanneld(bed, host, api, name, {"Type": "vxlan"}, network=DUAL)
    daemons.append(daemon)
    daemon.start()
    daemon.wait_log(f"waiting for this host's lease: node '{name}' has no IPv6 podCIDR yet "
                    "(the controller manager assigns one of each family with "
                    "--allocate-node-cidrs and --cluster-cidr=<IPv4 CIDR>,<IPv6 CIDR>)",
                    timeout=30)
    time.sleep(3)
    assert daemon.log().count("has no IPv6 podCIDR yet") == 1
    assert not os.path.exists(daemon.subnet_file)
    assert flannel_annotations(api, name) == {}
    assert daemon.process is not None and daemon.process.poll() is None
    api.delete_node(name)
    cidrs = register(api, name, host)
    assert len(cidrs) == 2
    daemon.wait_ipv6_subnet(timeout=30)
    assert leased(daemon) == cidrs
    assert flannel_annotations(api, name).keys() == DUAL_ANNOTATIONS


@pytest.fixture(scope="module")
def kube6(kube_dual: tuple[Testbed, EtcdServer, KubeApi]) -> Iterator[tuple[Testbed, KubeApi]]:
    """An IPv6-only control plane beside the dual-stack one (on its testbed and etcd): each Node
    gets a /64 of NETWORK6 and nothing else."""
    bed, etcd, _ = kube_dual
    api = KubeApi(bed, etcd, cluster_cidr=NETWORK6, name="kube6")
    try:
        yield bed, api
    finally:
        api.stop()


@pytest.mark.parametrize("backend", ["host-gw", "vxlan"])
def test_an_ipv6_only_network_routes_beside_flanneld(
        kube6: tuple[Testbed, KubeApi], daemons: list[KubeFlanneld | KubePyflanneld],
        nodes: list[tuple[KubeApi, str]], backend: str) -> None:
    """flanneld and two pyflanneld on IPv6-only podCIDRs: their containers, which have only
    IPv6, ping each other; TCP runs; each Node's annotations are flanneld's but for the host
    (an IPv6-only vxlan host writes no backend-data and no public-ip), and so are the IPv6
    devices, neighbours, fdb entries and routes."""
    if not os.path.exists(REFERENCE_FLANNELD):
        pytest.skip(f"no reference flanneld at {REFERENCE_FLANNELD}")
    bed, api = kube6
    members: list[KubeFlanneld | KubePyflanneld] = []
    for index in range(3):
        host = bed.add_host(ipv6=True)
        name = f"v6-{backend}-{index}"
        nodes.append((api, name))
        (cidr,) = register(api, name, host)
        assert cidr.startswith("fd00:10:244:") and cidr.endswith("/64")
        daemon: KubeFlanneld | KubePyflanneld = (
            KubeFlanneld(bed, host, name, api.node_kubeconfig(name), backend, network=IPV6_ONLY,
                         flags=(f"--public-ipv6={host.underlay_ipv6}",)) if index == 0
            else KubePyflanneld(bed, host, api, name, {"Type": backend}, network=IPV6_ONLY))
        daemons.append(daemon)
        members.append(daemon)
        daemon.start()
        assert str(daemon.wait_ipv6_subnet(timeout=40)) == cidr
        assert "FLANNEL_SUBNET" not in daemon.subnet_env()
        add_container(bed, daemon)
        assert host.container_ip is None
    hosts = [daemon.host for daemon in members]
    reach_each_other(hosts, ("ipv6",))
    for src, dst in (hosts[:2], hosts[1::-1]):
        assert dst.container_netns and dst.container_ipv6 and src.container_netns
        assert tcp_transfer(dst.container_netns, dst.container_ipv6, src.container_netns,
                            nbytes=4 << 20) == 4 << 20
    f_marks, p_marks = (flannel_annotations(api, daemon.node_name) for daemon in members[:2])
    f_host, p_host = hosts[:2]
    ours = {**f_marks, "public-ipv6": p_host.underlay_ipv6}
    if backend == "vxlan":
        f_mac = f_host.link("flannel-v6.1")["address"]
        ours["backend-v6-data"] = f_marks["backend-v6-data"].replace(
            f_mac, p_host.link("flannel-v6.1")["address"])
    assert f_marks["public-ipv6"] == f_host.underlay_ipv6
    assert ("public-ip" in f_marks) == (backend == "host-gw")
    assert p_marks == ours
    f_state = ipv6_state(f_host, backend)
    routes: list[dict[str, str]] = f_state["routes"]  # type: ignore[assignment]
    assert sum("gateway" in route for route in routes) == 2  # one to each peer
    assert ipv6_state(p_host, backend) == f_state
