"""More annotated Nodes than flanneld's event queue holds (flannel 1352, 2252): flanneld v0.20.2
puts one event per annotated Node in a channel of EVENT_QUEUE_DEPTH (5000 by default) before
anything drains it, and with more Nodes than that it never finishes its start. pyflanneld has
no such queue: it lists the Nodes in pages and keeps only each one's lease. A small version of
`make kube-scale` (perf/kubescale.py): 300 kubelet-sized annotated Nodes against a queue of
100, on a real API server and controller manager (tests/kubeapi.py)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import pytest

from perf.kubescale import (
    CLUSTER_CIDR,
    ApiPool,
    KubeFlanneld,
    KubePyflanneld,
    blocked_where,
    fake_cidr,
    fake_node,
    kubelet_node,
    mib,
)
from tests.cluster import scrape, value
from tests.conftest import require_host_network_tools
from tests.flanneld import REFERENCE_FLANNELD
from tests.kubeapi import KubeApi
from tests.testbed import Host, Testbed

NODES = 300  # annotated Nodes, each a flannel lease
QUEUE_DEPTH = 100  # EVENT_QUEUE_DEPTH: flanneld's queue would hold a third of them
NET_CONF = {"Network": CLUSTER_CIDR, "Backend": {"Type": "udp"}}
START_BOUND = 120.0  # s: generous, for a loaded machine; this is about no deadlock, not speed
DEADLOCK_WAIT = 60.0  # s without subnet.env: flanneld is stuck (it starts in 1-2 s otherwise)
RSS_LIMIT_MIB = 50.0  # flannel's DaemonSet: memory 50Mi
METRICS_PORT = 9125

needs_flanneld = pytest.mark.skipif(not os.path.exists(REFERENCE_FLANNELD),
                                    reason=f"no reference flanneld at {REFERENCE_FLANNELD}")


@pytest.fixture(scope="module")
def many() -> Iterator[tuple[Testbed, KubeApi, ApiPool]]:
    """A control plane whose cluster CIDR holds NODES /24s (the `kube` fixture's 10.244.0.0/16
    holds 256), with NODES annotated Nodes created through it."""
    require_host_network_tools()
    with Testbed() as bed:
        api = KubeApi(bed, None, cluster_cidr=CLUSTER_CIDR)
        pool = ApiPool(api)
        try:
            pool.all([lambda i=i: pool.create(fake_node(i)) for i in range(NODES)])
            yield bed, api, pool
        finally:
            pool.close()
            api.stop()


def own_node(bed: Testbed, pool: ApiPool, name: str, index: int) -> Host:
    """A host and its Node (kubelet-sized, not yet annotated), its podCIDR given: past the
    made-up Nodes' so that nodeipam's first allocation (10 s in) is not waited for."""
    host = bed.add_host(name)
    pool.create(kubelet_node(name, fake_cidr(NODES + index), host.underlay_ip))
    return host


def test_pyflanneld_starts_and_routes_more_nodes_than_flanneld_queue_holds(
        many: tuple[Testbed, KubeApi, ApiPool]) -> None:
    bed, api, pool = many
    host = own_node(bed, pool, "py", 1)
    daemon = KubePyflanneld(bed, host, api, "py", NET_CONF,
                            "--metrics-port", str(METRICS_PORT),
                            environ={"EVENT_QUEUE_DEPTH": str(QUEUE_DEPTH)})
    try:
        daemon.start()
        daemon.wait_subnet(timeout=START_BOUND)
        daemon.wait_log("running: watching Nodes", timeout=START_BOUND)
        deadline = daemon.started + START_BOUND
        routes = 0.0
        while time.monotonic() < deadline:
            routes = value(scrape(daemon, METRICS_PORT), "pyflannel_routes")
            if routes >= NODES:
                break
            time.sleep(0.2)
        assert routes == NODES, f"{routes} of {NODES} Nodes routed after {START_BOUND} s"
        log = daemon.log()
        missing = [i for i in range(NODES) if f"subnet added: {fake_cidr(i)} " not in log]
        assert not missing, f"not routed: {[fake_cidr(i) for i in missing[:5]]}..."
        assert daemon.process is not None and daemon.process.poll() is None
        peak = mib(daemon.process.pid)
        print(f"pyflanneld: {NODES} Nodes routed {time.monotonic() - daemon.started:.1f} s "
              f"after its start, VmHWM {peak:.1f} MiB")
        assert peak <= RSS_LIMIT_MIB, f"VmHWM {peak:.1f} MiB with {NODES} Nodes listed"
    finally:
        daemon.stop()


@needs_flanneld
def test_flanneld_with_the_same_nodes_and_a_small_queue_never_starts(
        many: tuple[Testbed, KubeApi, ApiPool]) -> None:
    """flanneld v0.20.2 with EVENT_QUEUE_DEPTH=100 and 300 annotated Nodes: no subnet.env, ever
    (its informer's handler blocks on the full channel while holding the queue's lock, which
    the sync check waits for: flannel 2252). The same flanneld with the default depth, started
    beside it on the same Nodes, starts: the queue is the difference."""
    bed, api, pool = many
    small = KubeFlanneld(bed, own_node(bed, pool, "fl-small", 2), api, "fl-small", NET_CONF,
                         QUEUE_DEPTH)
    default = KubeFlanneld(bed, own_node(bed, pool, "fl-default", 3), api, "fl-default",
                           NET_CONF)
    try:
        small.start()
        default.start()
        default.wait_subnet(timeout=START_BOUND)
        while time.monotonic() < small.started + DEADLOCK_WAIT:
            assert not os.path.exists(small.subnet_file), small.log()[-3000:]
            assert small.process is not None and small.process.poll() is None, \
                small.log()[-3000:]
            time.sleep(0.5)
        log = small.log()
        assert "Waiting 10m0s for node controller to sync" in log
        assert "Node controller sync successful" not in log
        stacks = small.goroutines()
        # Go adds how long a goroutine has waited once it is a minute: "[chan send, 1 minutes]".
        assert re.search(r"\[chan send(, \d+ minutes)?\]: in kube\.", blocked_where(stacks)), \
            stacks[:3000]
    finally:
        for daemon in (small, default):
            daemon.stop()
            daemon.clean("flannel0")
