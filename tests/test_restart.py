"""How long a running TCP flow between two containers stalls while the sending host's pyflanneld
restarts, after SIGTERM and after SIGKILL, on both etcd APIs: as a plain restart, as systemd
restarts the unit, with the fd store keeping the TUN, the socket, the route table and the
kernel path for the next run (tests/fdstore.py), and in place after SIGHUP (the process execs
itself with the same). Only a generous bound is asserted; the figures are
printed (`pytest -s`) and kept in perf/SCALE.md."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from tests.cluster import Cluster, Flanneld, wait_for
from tests.fdstore import KEPT_NAMES, FdStore
from tests.test_kernel_path import link_exists, link_ids
from tests.testbed import Host, inside

BOUND_SECONDS = 2.0
CHUNK = 16 << 10


class Flow:
    """One TCP connection from src's container to dst's, kept busy; the receiver notes when
    each read returned, so the longest gap is the flow's longest stall."""

    def __init__(self, src: Host, dst: Host) -> None:
        assert src.container_netns and dst.container_netns and dst.container_ip
        with inside(dst.container_netns):
            listener = socket.create_server((dst.container_ip, 0))
        with inside(src.container_netns):
            self.out = socket.create_connection(listener.getsockname(), timeout=10)
        self.into, _ = listener.accept()
        listener.close()
        self.reads: list[float] = []
        self.running = True
        self.threads = [threading.Thread(target=self._send), threading.Thread(target=self._recv)]
        for thread in self.threads:
            thread.start()

    def _send(self) -> None:
        data = bytes(CHUNK)
        while self.running:
            try:
                self.out.sendall(data)
            except OSError:
                return

    def _recv(self) -> None:
        self.into.settimeout(30)
        while self.running:
            try:
                if not self.into.recv(1 << 20):
                    return
            except OSError:
                return
            self.reads.append(time.monotonic())

    def longest_gap(self, since: float) -> float:
        times = [since, *(t for t in self.reads if t > since)]
        return max(b - a for a, b in zip(times, times[1:], strict=False)) if len(times) > 1 \
            else float("inf")

    def close(self) -> None:
        self.running = False
        self.out.close()
        self.into.close()
        for thread in self.threads:
            thread.join()


@pytest.mark.parametrize(("how", "store"), [
    ("SIGTERM", False), ("SIGKILL", False), ("SIGTERM", True), ("SIGKILL", True),
    ("SIGHUP", False)], ids=["SIGTERM-plain", "SIGKILL-plain", "SIGTERM-fd-store",
                             "SIGKILL-fd-store", "SIGHUP-in-place"])
def test_a_restart_stalls_a_running_flow_briefly(cluster: Cluster, how: str, store: bool
                                                 ) -> None:
    cluster.config({"Network": "10.244.0.0/16"})
    with contextlib.ExitStack() as stack:
        fdstore = None
        if store:
            fdstore = stack.enter_context(FdStore(os.path.join(
                cluster.bed.workdir, f"{cluster.prefix.strip('/').replace('/', '-')}.notify")))
        stall = restart_under_a_flow(cluster, how, fdstore)
    kind = "in place" if how == "SIGHUP" else "fd store" if store else "plain"
    print(f"\n{cluster.api}, {how}, {kind}: the flow's longest stall across the restart: "
          f"{stall:.2f} s")
    assert stall <= BOUND_SECONDS


def daemon_with_store(cluster: Cluster, fdstore: FdStore) -> Flanneld:
    """A daemon that tells `fdstore` (as systemd) what to keep, once it has kept it."""
    daemon = cluster.daemon(start=False)
    daemon.environ["NOTIFY_SOCKET"] = fdstore.path
    daemon.start()
    wait_for(lambda: fdstore.names() == KEPT_NAMES, 10,
             "the daemon's TUN, socket, route table and kernel path in the fd store")
    return daemon


def restart_under_a_flow(cluster: Cluster, how: str, fdstore: FdStore | None, *,
                         a_flags: Sequence[str] = (), kept: bool = False, mtu: int = 1472,
                         settled: Callable[[Flanneld], object] = lambda a: True,
                         while_down: Callable[[Flanneld], None] = lambda a: None) -> float:
    """The flow's longest stall while a restarts (with its kept descriptors, given a store; with
    `kept`, it must go on with what the last run kept, as `a_flags` may have it keep), once the
    flow runs and `settled` says a is as a running cluster's host would be."""
    if fdstore is None:
        a = cluster.daemon(start=False)
        a.command += a_flags
        a.start()
    else:
        a = daemon_with_store(cluster, fdstore)
    b = cluster.daemon()
    for daemon in (a, b):
        cluster.bed.add_container(daemon.host, str(daemon.wait_subnet()), mtu)
    for daemon in (a, b):
        daemon.wait_log("subnet added")
    flow = Flow(a.host, b.host)
    try:
        wait_for(lambda: len(flow.reads) > 100, 10, "the flow running")
        wait_for(lambda: settled(a), 10, "the sending host settled")
        restarted = time.monotonic()
        assert a.process is not None
        if how == "SIGHUP":
            added = a.log().count("subnet added")
            a.process.send_signal(signal.SIGHUP)
            a.wait_log("subnet added", count=added + 1)
            # The same process (its supervisor sees nothing), a new image with the kept ones.
            assert a.process.poll() is None
            assert "executing" in a.log() and "udp-tun" in a.log()
            a.wait_log("went on with the fast path the previous run kept")
        else:
            if how == "SIGTERM":
                a.stop()
            else:
                a.process.kill()
                a.process.wait()
                a.process = None
            while_down(a)
            a.start(handed=fdstore.handed() if fdstore else None)
            a.wait_log("subnet added")
            if fdstore is not None or kept:
                a.wait_log("went on with the fast path the previous run kept")
        wait_for(lambda: flow.reads and flow.reads[-1] > time.monotonic() - 0.1, 10,
                 "the flow running again")
        time.sleep(1)
        return flow.longest_gap(restarted)
    finally:
        flow.close()


def test_a_restart_with_other_levers_starts_a_new_fast_path_on_the_same_tun_name(
        cluster: Cluster) -> None:
    """The kept TUN was opened with offloads; a run without them cannot use it: it lets the
    store drop it and makes flannel0 again, and forwards."""
    cluster.config({"Network": "10.244.0.0/16"})
    with FdStore(os.path.join(cluster.bed.workdir, f"levers-{cluster.api}.notify")) as fdstore:
        a = daemon_with_store(cluster, fdstore)
        b = cluster.daemon()
        for daemon in (a, b):
            cluster.bed.add_container(daemon.host, str(daemon.wait_subnet()), 1472)
        assert a.stop() == 0
        a.command.append("--fastpath-offload=false")
        a.start(handed=fdstore.handed())
        a.wait_log("cannot go on with the fast path the previous run kept")
        a.wait_log("udp backend: flannel0 (MTU 1472)")
        assert "offloads off" in a.log()
        assert b.host.container_ip
        wait_for(lambda: a.host.in_container("ping", "-c", "1", "-W", "1",
                                             b.host.container_ip, check=False).returncode == 0,
                 10, "a's container reaching b's")
        # What the store keeps now is the new run's: a third run resumes it.
        assert a.stop() == 0
        a.start(handed=fdstore.handed())
        a.wait_log("resumed the fast path the previous run kept: flannel0")


def test_a_restart_with_the_kernel_path_off_drops_its_kept_links_and_maps(
        cluster: Cluster) -> None:
    """The store holds exactly what the current run keeps: a kept link left in it would go on
    forwarding with a route map nobody writes any more."""
    cluster.config({"Network": "10.244.0.0/16"})
    with FdStore(os.path.join(cluster.bed.workdir, f"egress-{cluster.api}.notify")) as fdstore:
        a = daemon_with_store(cluster, fdstore)
        links = link_ids(fdstore.handed())
        assert a.stop() == 0
        a.command += ["--fastpath-kernel", "off"]
        a.start(handed=fdstore.handed())
        a.wait_log("went on with the fast path the previous run kept")
        # The stale entries go last: once the kernel path's are out, the rest is this run's.
        wait_for(lambda: fdstore.names() == [name for name in KEPT_NAMES
                                             if not name.startswith("udp-kernel-")], 10,
                 "the TUN, the socket and the route table alone in the store")
        assert links and not any(link_exists(old) for old in links)
        assert "kernel path off" in a.log()
