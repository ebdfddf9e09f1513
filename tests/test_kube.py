"""pyflanneld with --kube-subnet-mgr on a real API server and controller manager (tests/kubeapi.py),
beside the real flanneld v0.20.2 in kube mode: the Node annotations as flanneld writes them, a
mixed cluster whose containers reach each other, Nodes that join and leave, and the Nodes where
flanneld falls over (no podCIDR yet, no or garbage annotations, a podCIDR it cannot route)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from tests.cluster import Flanneld
from tests.conftest import CLUSTER_CIDR
from tests.etcd import EtcdServer
from tests.flanneld import REFERENCE_FLANNELD, wait_reachable
from tests.kubeapi import KubeApi
from tests.test_kubeapi import (
    NETWORK,
    KubeFlanneld,
    assert_flanneld_wrote,
    flannel_annotations,
    wait_for,
)
from tests.testbed import Host, Testbed, tcp_transfer

ANNOTATION = "flannel.alpha.coreos.com/"
needs_flanneld = pytest.mark.skipif(not os.path.exists(REFERENCE_FLANNELD),
                                    reason=f"no reference flanneld at {REFERENCE_FLANNELD}")


class KubePyflanneld(Flanneld):
    """pyflanneld in kube mode for Node `node_name`, with that node's kubelet certificate.
    network: the net-conf's keys besides Backend."""

    def __init__(self, bed: Testbed, host: Host, api: KubeApi, node_name: str,
                 backend: dict[str, Any], *flags: str,
                 python_args: tuple[str, ...] = ("-m", "control"),
                 network: Mapping[str, object] = NETWORK) -> None:
        net_conf = os.path.join(bed.workdir, f"{host.netns}-net-conf.json")
        with open(net_conf, "w") as f:
            json.dump({**network, "Backend": backend}, f)
        super().__init__(bed, host, None, "", "--kube-subnet-mgr",
                         f"--kubeconfig-file={api.node_kubeconfig(node_name)}",
                         f"--net-config-path={net_conf}", *flags,
                         environ={"NODE_NAME": node_name}, python_args=python_args)
        self.node_name = node_name


@pytest.fixture
def daemons() -> Iterator[list[Flanneld | KubeFlanneld]]:
    """What a test started, stopped at its end (flanneld's leftovers removed)."""
    started: list[Flanneld | KubeFlanneld] = []
    yield started
    for daemon in started:
        daemon.stop()
        if isinstance(daemon, KubeFlanneld):
            daemon.clean("flannel.1")


def node_with_container(bed: Testbed, api: KubeApi, name: str,
                        daemon: Flanneld | KubeFlanneld) -> None:
    """Start the daemon, then add a container on the subnet it wrote."""
    daemon.start()
    subnet = daemon.wait_subnet(timeout=40)
    bed.add_container(daemon.host, str(subnet), int(daemon.subnet_env()["FLANNEL_MTU"]),
                      network=CLUSTER_CIDR)


def two_nodes(bed: Testbed, api: KubeApi, daemons: list[Flanneld | KubeFlanneld], prefix: str,
              backend: str) -> list[KubePyflanneld]:
    """Two hosts registered as Nodes <prefix>-0 and -1, with their podCIDRs, each with a
    pyflanneld (not started) for it."""
    members = []
    for index in range(2):
        host = bed.add_host()
        name = f"{prefix}-{index}"
        api.register_node(name, host.underlay_ip)
        api.wait_pod_cidr(name)
        daemon = KubePyflanneld(bed, host, api, name, {"Type": backend})
        daemons.append(daemon)
        members.append(daemon)
    return members


@pytest.mark.parametrize(("backend", "backend_type", "mtu"), [
    ({"Type": "udp"}, "", 1472), ({"Type": "vxlan"}, "vxlan", 1450),
    ({"Type": "host-gw"}, "host-gw", 1500), ({"Type": "alloc"}, "", 1500)],
    ids=["udp", "vxlan", "host-gw", "alloc"])
def test_the_node_carries_what_flanneld_writes(
        kube: tuple[Testbed, EtcdServer, KubeApi], daemons: list[Flanneld | KubeFlanneld],
        backend: dict[str, Any], backend_type: str, mtu: int) -> None:
    bed, _, api = kube
    host = bed.add_host()
    name = f"own-{backend['Type']}"
    api.register_node(name, host.underlay_ip)
    cidr = api.wait_pod_cidr(name)
    daemon = KubePyflanneld(bed, host, api, name, backend)
    daemons.append(daemon)
    daemon.start()
    data = "null"
    if backend_type == "vxlan":
        daemon.wait_subnet(timeout=40)
        data = f'{{"VNI":1,"VtepMAC":"{host.link("flannel.1")["address"]}"}}'
    assert_flanneld_wrote(api, daemon, cidr, backend_type, data, mtu)  # type: ignore[arg-type]
    daemon.wait_log("running: watching Nodes")
    # Nothing to renew: a restart writes nothing more (the annotations are there).
    assert daemon.stop() == 0
    daemon.start()
    daemon.wait_log("annotations as they were", timeout=30)
    assert flannel_annotations(api, name)["public-ip"] == host.underlay_ip


@needs_flanneld
@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw"])
def test_a_mixed_cluster_with_flanneld_routes_joins_and_leaves(
        kube: tuple[Testbed, EtcdServer, KubeApi], daemons: list[Flanneld | KubeFlanneld],
        backend: str) -> None:
    """flanneld v0.20.2 and two pyflanneld in kube mode: every container pair pings both ways
    and TCP runs; a Node that joins is routed on the others within 2 s, and a Node deleted is
    unrouted."""
    bed, _, api = kube
    members = []
    for index, kind in enumerate(("flanneld", "pyflanneld", "pyflanneld")):
        host = bed.add_host()
        name = f"mix-{backend}-{index}"
        api.register_node(name, host.underlay_ip)
        api.wait_pod_cidr(name)
        daemon: Flanneld | KubeFlanneld = (
            KubeFlanneld(bed, host, name, api.node_kubeconfig(name), backend)
            if kind == "flanneld" else KubePyflanneld(bed, host, api, name, {"Type": backend}))
        daemons.append(daemon)
        node_with_container(bed, api, name, daemon)
        members.append(daemon)
    hosts = [daemon.host for daemon in members]
    for src in hosts:
        for dst in hosts:
            if src is not dst:
                assert wait_reachable(src, dst), f"{src.netns} -> {dst.netns}"
    flanneld_host, pyflanneld_host = hosts[0], hosts[1]
    for src, dst in ((flanneld_host, pyflanneld_host), (pyflanneld_host, flanneld_host)):
        assert dst.container_netns and dst.container_ip and src.container_netns
        assert tcp_transfer(dst.container_netns, dst.container_ip, src.container_netns,
                            nbytes=8 << 20) == 8 << 20

    # A Node that joins: routed on a pyflanneld host within 2 s of its annotations.
    joining = bed.add_host()
    name = f"mix-{backend}-join"
    api.register_node(name, joining.underlay_ip)
    cidr = api.wait_pod_cidr(name)
    newcomer = KubePyflanneld(bed, joining, api, name, {"Type": backend})
    daemons.append(newcomer)
    newcomer.start()
    wait_for(lambda: flannel_annotations(api, name).get("kube-subnet-manager"), 30,
             "the newcomer's annotations")
    annotated = time.monotonic()
    for watcher in members[1:]:
        assert isinstance(watcher, Flanneld)
        watcher.wait_log(f"subnet added: {cidr}", timeout=10)
    assert time.monotonic() - annotated < 2.0
    # ... and reached from every host, flanneld's included.
    bed.add_container(joining, str(newcomer.wait_subnet()),
                      int(newcomer.subnet_env()["FLANNEL_MTU"]), network=CLUSTER_CIDR)
    for host in hosts:
        assert wait_reachable(host, joining), f"{host.netns} -> the newcomer"
    watcher = members[1]
    assert isinstance(watcher, Flanneld)
    # Deleted: unrouted (its route gone from the pyflanneld host).
    newcomer.stop()
    api.delete_node(name)
    watcher.wait_log(f"subnet removed: {cidr}", timeout=10)
    assert cidr not in watcher.host.ip("route", "show").stdout


def test_it_waits_for_its_node_and_its_pod_cidr_saying_so_once(
        kube: tuple[Testbed, EtcdServer, KubeApi], daemons: list[Flanneld | KubeFlanneld]) -> None:
    """flanneld exits while its Node has no podCIDR, and its Pod crash-loops (flannel 728,
    1344, 1558): pyflanneld waits for the Node, then for its podCIDR, saying each once."""
    bed, _, api = kube
    host = bed.add_host()
    name = "late"
    daemon = KubePyflanneld(bed, host, api, name, {"Type": "udp"})
    daemons.append(daemon)
    daemon.start()
    daemon.wait_log(f"node '{name}' is not registered yet", timeout=30)
    with api.controller_manager_paused():  # so that the Node has no podCIDR for a while
        api.register_node(name, host.underlay_ip)
        daemon.wait_log(f"node '{name}' has no podCIDR yet", timeout=30)
        time.sleep(3)
    cidr = api.wait_pod_cidr(name)
    assert str(daemon.wait_subnet(timeout=40)) == cidr
    log = daemon.log()
    assert log.count("is not registered yet") == 1 and log.count("has no podCIDR yet") == 1
    assert daemon.process is not None and daemon.process.poll() is None


def test_nodes_it_cannot_read_are_logged_once_and_skipped(
        kube: tuple[Testbed, EtcdServer, KubeApi], daemons: list[Flanneld | KubeFlanneld]) -> None:
    """A peer Node with no annotations at all (flanneld panics: 818), a public-ip that is
    garbage or IPv6, only an IPv6 podCIDR (1789, 2115) or a podCIDR outside the Network: each
    logged once and skipped, never a crash; a good Node beside them is routed."""
    bed, _, api = kube
    host = bed.add_host()
    api.register_node("reader", host.underlay_ip)
    api.wait_pod_cidr("reader")
    daemon = KubePyflanneld(bed, host, api, "reader", {"Type": "udp"})
    daemons.append(daemon)
    daemon.start()
    daemon.wait_log("running: watching Nodes", timeout=40)

    def flannel(public_ip: str) -> dict[str, str]:
        return {ANNOTATION + "kube-subnet-manager": "true", ANNOTATION + "public-ip": public_ip,
                ANNOTATION + "backend-type": "", ANNOTATION + "backend-data": "null"}

    bad = {"bare": ({}, "10.244.200.0/24"),
           "garbage-ip": (flannel("not an address"), "10.244.201.0/24"),
           "v6-ip": (flannel("fd00::9"), "10.244.202.0/24"),
           "v6-only": (flannel("198.18.9.3"), "fd00:0:0:9::/64"),
           "outside": (flannel("198.18.9.4"), "10.99.0.0/24"),
           "foreign": ({"example.com/kube-subnet-manager": "true"}, "10.244.203.0/24")}
    for name, (marks, cidr) in bad.items():
        api.request("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, **({"annotations": marks} if marks else {})},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})
    api.request("POST", "/api/v1/nodes", {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "good", "annotations": flannel("198.18.9.9")},
        "spec": {"podCIDR": "10.244.204.0/24", "podCIDRs": ["10.244.204.0/24"]}})
    daemon.wait_log("subnet added: 10.244.204.0/24 via 198.18.9.9", timeout=10)
    # Each bad one again, as a kubelet's status update would bring it: no new log line.
    for name in bad:
        api.request("PATCH", f"/api/v1/nodes/{name}", {"metadata": {"labels": {"again": "1"}}},
                    content_type="application/strategic-merge-patch+json")
    daemon.wait_log("subnet added", timeout=5)
    time.sleep(1)
    log = daemon.log()
    for name in ("garbage-ip", "v6-ip", "v6-only"):
        assert log.count(f"skipping node {name}:") == 1, log[-3000:]
    assert log.count("ignoring lease 10.99.0.0/24: not a /24 of the Network") == 1
    for silent in ("bare", "foreign"):
        assert f"node {silent}" not in log
    # Routed: the good one, none of the bad (the udp backend's routes are its fast path's table).
    assert not any(f"subnet added: {cidr}" in log for _, cidr in bad.values())
    assert daemon.process is not None and daemon.process.poll() is None
    for name in (*bad, "good"):
        api.delete_node(name)
    daemon.wait_log("subnet removed: 10.244.204.0/24", timeout=10)


def test_the_watch_resumes_after_the_api_server_restarts_and_loses_no_node(
        kube: tuple[Testbed, EtcdServer, KubeApi], daemons: list[Flanneld | KubeFlanneld]) -> None:
    """The API server goes away and comes back: forwarding never stops, the watch resumes (410
    Gone: a new listing), and a Node that joined meanwhile is routed."""
    bed, _, api = kube
    members = two_nodes(bed, api, daemons, "restart", "udp")
    for daemon in members:
        node_with_container(bed, api, daemon.node_name, daemon)
    a, b = (daemon.host for daemon in members)
    assert wait_reachable(a, b)
    assert a.container_netns and b.container_ip
    pinger = subprocess.Popen(["ip", "netns", "exec", a.container_netns, "ping", "-i", "0.05",
                               "-w", "25", b.container_ip], stdout=subprocess.PIPE, text=True)
    api.restart(down=3.0)
    # A Node that joins as soon as the API server is back, before the watches have resumed.
    api.request("POST", "/api/v1/nodes", {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "meanwhile", "annotations": {
            ANNOTATION + "kube-subnet-manager": "true", ANNOTATION + "public-ip": "198.18.9.77",
            ANNOTATION + "backend-type": "", ANNOTATION + "backend-data": "null"}},
        "spec": {"podCIDR": "10.244.210.0/24", "podCIDRs": ["10.244.210.0/24"]}})
    for daemon in members:
        daemon.wait_log("subnet added: 10.244.210.0/24", timeout=30)
    pinger.send_signal(signal.SIGINT)
    out, _ = pinger.communicate(timeout=30)
    sent = int(out.split(" packets transmitted")[0].rsplit("\n", 1)[-1])
    received = int(out.split(" received")[0].rsplit(", ", 1)[-1])
    assert sent > 50 and sent - received <= 2, out
    api.delete_node("meanwhile")


def test_what_nodes_deleted_while_it_was_down_left_is_removed_at_start(
        kube: tuple[Testbed, EtcdServer, KubeApi], daemons: list[Flanneld | KubeFlanneld]) -> None:
    """flanneld keeps the routes, neighbours and fdb entries of Nodes deleted while it was down
    (flannel 2554): pyflanneld's first listing removes them."""
    bed, _, api = kube
    members = two_nodes(bed, api, daemons, "gone", "vxlan")
    for daemon in members:
        daemon.start()
    staying, leaving = members
    cidr = api.wait_pod_cidr("gone-1")
    staying.wait_log(f"subnet added: {cidr}", timeout=30)
    vtep = str(ipaddress.IPv4Network(cidr).network_address)
    assert cidr in staying.host.ip("route", "show", "dev", "flannel.1").stdout
    assert vtep in staying.host.ip("neigh", "show", "dev", "flannel.1").stdout
    assert leaving.host.underlay_ip in staying.host.run("bridge", "fdb", "show", "dev",
                                                        "flannel.1").stdout
    assert staying.stop() == 0
    assert leaving.stop() == 0
    api.delete_node("gone-1")
    staying.start()
    staying.wait_log("running: watching Nodes", timeout=30)
    wait_for(lambda: cidr not in staying.host.ip("route", "show", "dev", "flannel.1").stdout,
             10, "the deleted Node's route removed")
    assert vtep not in staying.host.ip("neigh", "show", "dev", "flannel.1").stdout
    assert leaving.host.underlay_ip not in staying.host.run("bridge", "fdb", "show", "dev",
                                                            "flannel.1").stdout
