"""A restart where nothing holds descriptors across it (a DaemonSet's container): with
--fastpath-pin-dir the udp backend's TUN stays (persistent), its kernel path stays pinned in a
bpffs and goes on forwarding, and the next run takes them up (control/service/pinstore.py); the
vxlan and host-gw backends leave forwarding to the kernel. A TCP flow's longest stall across a
kill and a new start is printed (`pytest -s`; the figures go to perf/SCALE.md) and held to a
generous bound. What was kept goes when the host leaves: its Pod deleted, or another backend."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.cluster import Cluster, Flanneld, wait_for
from tests.etcd import EtcdServer
from tests.kubeapi import KubeApi
from tests.test_kube import KubePyflanneld
from tests.test_restart import BOUND_SECONDS, restart_under_a_flow
from tests.testbed import Testbed, sh

HOLD_SECONDS = 0.2  # twice udp_tc.bpf.c's BULK_HOLD_NS


@pytest.fixture(scope="module")
def bpffs(testbed: Testbed) -> Iterator[str]:
    """A bpffs of the module's own (pins are global: each host pins in a folder of it)."""
    path = os.path.join(testbed.workdir, "bpffs")
    os.makedirs(path)
    sh("mount", "-t", "bpf", "bpf", path)
    try:
        yield path
    finally:
        sh("umount", "-l", path)


def pin_flags(bpffs: str, daemon_name: str) -> list[str]:
    return ["--fastpath-pin-dir", os.path.join(bpffs, daemon_name)]


def kernel_path_carries_the_flow(pins: str) -> Callable[[Flanneld], bool]:
    """Whether the peer's hello has reached the sending host's kernel path, and long enough ago
    that none of the flow is left in the loops: its TCP super-packets then go whole by the
    kernel path, which forwards while no daemon runs. Until then (a peer that joined in the
    last moments, fastpath/udp_tc.bpf.c's BULK_HOLD_NS) they went through the loops, which
    stall as a plain restart does; in a running cluster every peer said hello long before."""
    heard: list[float] = []

    def settled(a: Flanneld) -> bool:
        if not heard:
            dump = subprocess.run(["bpftool", "-j", "map", "dump", "pinned",
                                   os.path.join(pins, "whole_peers")],
                                  capture_output=True, text=True, check=False).stdout
            if '"hello"' in dump:
                heard.append(time.monotonic())
        return bool(heard) and time.monotonic() - heard[0] > HOLD_SECONDS
    return settled


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_restart_with_the_data_plane_pinned_barely_stalls_a_flow(
        cluster: Cluster, bpffs: str, how: str) -> None:
    cluster.config({"Network": "10.244.0.0/16"})
    flags = pin_flags(bpffs, f"{cluster.prefix.strip('/').replace('/', '-')}-{how}")

    def still_forwarding(a: Flanneld) -> None:
        """Nobody runs: the TUN and the pinned kernel path are still there."""
        assert len(os.listdir(flags[1])) >= 6
        assert "flannel0" in a.host.ip("link", "show").stdout

    stall = restart_under_a_flow(cluster, how, None, a_flags=flags, kept=True,
                                 settled=kernel_path_carries_the_flow(flags[1]),
                                 while_down=still_forwarding)
    print(f"\n{cluster.api}, {how}, pinned: the flow's longest stall across the restart: "
          f"{stall:.3f} s")
    assert stall <= BOUND_SECONDS


@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_a_restart_of_a_kernel_backend_does_not_stall_a_flow(cluster: Cluster,
                                                              backend: str) -> None:
    cluster.config({"Network": "10.244.0.0/16", "Backend": {"Type": backend}})
    stall = restart_under_a_flow(cluster, "SIGKILL", None,
                                 mtu=1450 if backend == "vxlan" else 1500)
    print(f"\n{cluster.api}, {backend}, SIGKILL: the flow's longest stall across the restart: "
          f"{stall:.3f} s")
    assert stall <= BOUND_SECONDS


def test_what_was_kept_goes_when_the_pod_is_deleted(
        kube: tuple[Testbed, EtcdServer, KubeApi]) -> None:
    """A Pod deleted (kube-flannel.yml applied over this DaemonSet, the DaemonSet removed, the
    node drained) is no restart: its pyflanneld removes the persistent TUN, the pins and the
    routes file as it stops, so that flanneld finds the host as it would without pyflannel. A
    stop of a Pod that stays keeps them."""
    bed, _, api = kube
    path = os.path.join(bed.workdir, "bpffs")
    os.makedirs(path, exist_ok=True)
    sh("mount", "-t", "bpf", "bpf", path)
    try:
        host = bed.add_host()
        api.register_node("leaving", host.underlay_ip)
        api.wait_pod_cidr("leaving")
        api.ensure_namespace("kube-flannel")
        api.request("POST", "/api/v1/namespaces/kube-flannel/serviceaccounts",
                    {"metadata": {"name": "leaving"}}, check=False)
        api.request("POST", "/api/v1/namespaces/kube-flannel/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "kube-flannel-ds-leaving", "namespace": "kube-flannel"},
            "spec": {"nodeName": "leaving", "terminationGracePeriodSeconds": 600,
                     "serviceAccountName": "leaving", "automountServiceAccountToken": False,
                     "containers": [{"name": "kube-flannel", "image": "pyflannel:0.1.0"}]}})
        pins = os.path.join(path, "leaving")
        daemon = KubePyflanneld(bed, host, api, "leaving", {"Type": "udp"},
                                "--fastpath-pin-dir", pins)
        daemon.environ.update(POD_NAME="kube-flannel-ds-leaving", POD_NAMESPACE="kube-flannel")
        daemon.start()
        daemon.wait_log("running: watching Nodes", timeout=40)
        kept = daemon.subnet_file + ".kept"
        wait_for(lambda: os.path.isdir(pins) and os.listdir(pins), 10, "the pins")
        # A stop with the Pod staying: a restart, everything kept.
        assert daemon.stop() == 0
        assert os.listdir(pins) and os.path.isdir(kept)
        assert "flannel0" in host.ip("link", "show").stdout
        daemon.start()
        daemon.wait_log("went on with the fast path the previous run kept", timeout=40)
        # The Pod deleted (no kubelet here: it stays, marked, for its grace period).
        api.request("DELETE", "/api/v1/namespaces/kube-flannel/pods/kube-flannel-ds-leaving")
        assert daemon.stop() == 0, daemon.log()[-3000:]
        assert "this host leaves the cluster" in daemon.log()
        assert not os.path.exists(pins) and not os.path.exists(kept)
        wait_for(lambda: "flannel0" not in host.ip("link", "show").stdout, 5,
                 "the TUN gone with its last descriptor")
        filters = subprocess.run(["bpftool", "net", "show"], capture_output=True, text=True,
                                 check=False).stdout
        assert "tun_egress" not in filters or host.netns not in filters
    finally:
        sh("umount", "-l", path)
        api.request("DELETE", "/api/v1/nodes/leaving", check=False)


def test_another_backend_removes_what_the_udp_backend_kept(cluster: Cluster,
                                                           bpffs: str) -> None:
    cluster.config({"Network": "10.244.0.0/16"})
    a = cluster.daemon(start=False)
    pins = pin_flags(bpffs, f"{a.host.netns}-switch")
    a.command += pins
    a.start()
    a.wait_subnet()
    wait_for(lambda: os.path.isdir(pins[1]) and os.listdir(pins[1]), 10, "the pins")
    assert a.stop() == 0
    assert "flannel0" in a.host.ip("link", "show").stdout
    cluster.config({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})
    a.start()
    a.wait_log("removed the data plane an earlier udp backend kept")
    a.wait_subnet()
    assert not os.path.exists(pins[1])
    wait_for(lambda: "flannel0" not in a.host.ip("link", "show").stdout, 5, "flannel0 gone")
    assert a.stop() == 0
