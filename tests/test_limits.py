"""pyflanneld inside flannel's DaemonSet limits (requests = limits = `cpu: 100m, memory: 50Mi`):
each daemon in a cgroup of its own with those limits (tests/limits.py), containers through the
CNI plugin, TCP both ways at once for 10 s. No OOM kill, the daemons still running, the leases
still held, the bytes intact; the memory the cgroups were charged and their throttling are
printed (`pytest -s`), never asserted on. On the udp and vxlan backends, run from the checkout
(its files in the page cache already, charged elsewhere), and on udp also from a copy none of
whose pages are cached (a node's first start: the file pages are charged to the daemon too).
perf/limits.py measures throughput under the limits.

Also tests/limits.py itself: an allocation past the limit is seen as an OOM kill, a busy loop
as throttling, and the cgroups go away afterwards."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.cluster import FIGURE_2_CONFIG, Flanneld, fetch, key_of, put_config, stop_all
from tests.etcd import EtcdServer
from tests.flanneld import wait_reachable
from tests.limits import (
    CFS_PERIOD_US,
    DAEMONSET_CPU_MILLIS,
    DAEMONSET_MEMORY_BYTES,
    RUN_PREFIX,
    CgroupError,
    ColdCopy,
    Limited,
    MiB,
    Usage,
    bpf_maps,
    cgroup_mounts,
)
from tests.testbed import Testbed, tcp_transfer

TRANSFER_SECONDS = 10.0
HEALTHZ_PORT = 8471
# Under 100m of CPU pyflanneld's start (the interpreter and its imports, about 0.4 CPU-seconds)
# takes ten times as long: about 4 s here.
START_TIMEOUT = 60.0
BACKENDS = {"udp": FIGURE_2_CONFIG["Backend"], "vxlan": {"Type": "vxlan"}}


@pytest.fixture
def limited() -> Iterator[list[Limited]]:
    """Cgroups a test makes (append to it); each removed at its end, after the daemons stop
    (the test stops them in its own finally, before this runs)."""
    made: list[Limited] = []
    yield made
    errors = []
    for cgroup in made:
        try:
            cgroup.close()
        except Exception as error:  # noqa: BLE001 - close every one, then report
            errors.append(error)
    for cgroup in made:
        for directory in cgroup.directories.values():
            assert not os.path.exists(directory), f"{directory} left behind"
    assert not errors, errors


def both_ways(a: Flanneld, b: Flanneld, seconds: float) -> list[int]:
    """TCP from a's container to b's and from b's to a's at the same time, each checked byte
    for byte (tests/testbed.py's tcp_transfer); the byte counts."""
    pairs = [(b, a), (a, b)]  # (server, client)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(tcp_transfer, str(server.host.container_netns),
                               str(server.host.container_ip), str(client.host.container_netns),
                               seconds=seconds) for server, client in pairs]
        return [future.result() for future in futures]


def report(backend: str, daemon: Flanneld, usage: Usage, extra: str = "") -> None:
    stat = usage.stat
    print(f"\n{backend} {daemon.host.netns}: {usage.summary()}; memory.stat rss "
          f"{stat.get('rss', stat.get('anon', 0)) / MiB:.1f} MiB, cache "
          f"{stat.get('cache', stat.get('file', 0)) / MiB:.1f} MiB{extra}")


@pytest.fixture
def cold_copies() -> Iterator[list[ColdCopy]]:
    made: list[ColdCopy] = []
    yield made
    for copy in made:
        copy.close()
        assert not os.path.exists(copy.root)


# (backend, page cache): "warm" runs pyflanneld from the checkout, whose files earlier runs left
# in the page cache (charged elsewhere); "cold" from a copy of them that nothing has read yet,
# as on a node's first start of the Pod, so that its file pages are charged to its cgroup too.
CASES = [("udp", "warm"), ("vxlan", "warm"), ("udp", "cold")]


@pytest.mark.parametrize(("backend", "cache"), CASES)
def test_inside_the_daemonsets_limits(bed_and_etcd: tuple[Testbed, EtcdServer],
                                      limited: list[Limited], cold_copies: list[ColdCopy],
                                      backend: str, cache: str) -> None:
    bed, etcd = bed_and_etcd
    prefix = f"/limits-{backend}-{cache}/network"
    put_config(etcd, "v3", {**FIGURE_2_CONFIG, "Backend": BACKENDS[backend]}, prefix)
    daemons: list[Flanneld] = []
    copies: dict[str, ColdCopy] = {}  # by host
    try:
        for side in ("a", "b"):
            cgroup = Limited(f"{backend}-{cache}-{side}")
            limited.append(cgroup)
            program, environ = None, None
            if cache == "cold":
                copy = ColdCopy("pyflannel")
                cold_copies.append(copy)
                program, environ = copy.program, copy.environ
            daemon = Flanneld(bed, bed.add_host(), etcd, "v3", "--etcd-prefix", prefix,
                              "--healthz-port", str(HEALTHZ_PORT), "--healthz-ip", "127.0.0.1",
                              program=program, environ=environ)
            daemon.command = cgroup.command(daemon.command)
            daemons.append(daemon.start())
            if cache == "cold":
                copies[daemon.host.netns] = cold_copies[-1]
        subnets = [daemon.wait_subnet(START_TIMEOUT) for daemon in daemons]
        for daemon, subnet in zip(daemons, subnets, strict=True):
            bed.add_container(daemon.host, str(subnet), int(daemon.subnet_env()["FLANNEL_MTU"]))
        for daemon in daemons:
            daemon.wait_log("subnet added", START_TIMEOUT)
        a, b = daemons
        assert wait_reachable(a.host, b.host), a.log()[-2000:] + b.log()[-2000:]

        sent = both_ways(a, b, TRANSFER_SECONDS)
        assert all(count > 0 for count in sent)

        for daemon, cgroup, subnet in zip(daemons, limited, subnets, strict=True):
            assert daemon.process is not None
            assert daemon.process.poll() is None, f"{daemon.host.netns} exited:\n{daemon.log()}"
            # In the cgroup, which the limits were set on, and charged for what it holds.
            assert daemon.process.pid in cgroup.pids()
            usage = cgroup.usage()
            assert (usage.memory_limit_bytes, usage.cpu_millis) == (DAEMONSET_MEMORY_BYTES,
                                                                    DAEMONSET_CPU_MILLIS)
            assert usage.memory_bytes > 10 * MiB, usage.summary()
            assert usage.nr_periods > 0, usage.summary()  # the CFS quota is in force
            assert usage.oom_kills == 0 and not usage.under_oom, usage.summary()
            # The lease: still in etcd for this host, and /healthz says it is held.
            leases = etcd.get_prefix(f"{prefix}/subnets/", "v3")
            lease = leases.get(key_of(subnet, prefix), "")
            assert f'"PublicIP":"{daemon.host.underlay_ip}"' in lease, leases
            assert fetch(daemon, f"http://127.0.0.1:{HEALTHZ_PORT}/healthz") == [
                (200, "flanneld is running")]
            assert "was lost" not in daemon.log()
            extra = f"; major faults {usage.stat.get('pgmajfault', 0)}"
            if cache == "cold":  # run from its own copy, whose pages it was charged for
                with open(f"/proc/{daemon.process.pid}/maps") as f:
                    assert copies[daemon.host.netns].root in f.read()
            if backend == "udp":
                maps = bpf_maps(daemon.process.pid)
                assert "whole_peers" in {m.name for m in maps}, maps
                extra += "; BPF maps " + ", ".join(
                    f"{m.name} {m.bytes_memlock / 1024:.0f} KiB" for m in maps) + (
                    f" (total {sum(m.bytes_memlock for m in maps) / MiB:.1f} MiB)")
            report(f"{backend} ({cache})", daemon, usage, extra)
        print(f"{backend} ({cache}): {sent[0] / 1e6:.0f} MB a to b and {sent[1] / 1e6:.0f} MB "
              f"b to a in {TRANSFER_SECONDS:.0f} s")
    finally:
        stop_all(daemons)


def run_in(cgroup: Limited, code: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], preexec_fn=cgroup.preexec,
                          capture_output=True, text=True, timeout=timeout)


def test_an_allocation_past_the_limit_is_an_oom_kill(limited: list[Limited]) -> None:
    cgroup = Limited("oom", 64 * MiB, None)
    limited.append(cgroup)
    # Touched pages (a bytes object of 256 MiB), not a calloc's untouched ones.
    result = run_in(cgroup, "x = b'x' * (256 * 1024 * 1024)")
    usage = cgroup.usage()
    assert result.returncode == -9, result
    assert usage.oom_kills == 1, usage.summary()
    assert usage.failcnt > 0
    assert usage.memory_peak_bytes <= 64 * MiB
    assert cgroup.pids() == []


def test_a_busy_loop_is_throttled_and_charged(limited: list[Limited]) -> None:
    cgroup = Limited("busy", None, DAEMONSET_CPU_MILLIS)
    limited.append(cgroup)
    before = cgroup.usage()
    # 0.2 CPU-seconds: at 100m that takes two seconds or more, most periods throttled.
    result = run_in(cgroup, "import time\nend = time.process_time() + 0.2\n"
                            "while time.process_time() < end: pass")
    assert result.returncode == 0, result
    usage = cgroup.usage()
    assert before.nr_throttled == 0
    assert usage.nr_throttled > 0 and usage.throttled_seconds > 0, usage.summary()
    assert usage.cpu_seconds >= 0.2, usage.summary()
    assert usage.memory_peak_bytes > 0
    print(f"\nbusy loop at {DAEMONSET_CPU_MILLIS}m over {CFS_PERIOD_US} us periods: "
          f"{usage.summary()}")


def test_a_wrapped_command_runs_inside_with_its_own_pid(limited: list[Limited]) -> None:
    cgroup = Limited("wrap", DAEMONSET_MEMORY_BYTES, DAEMONSET_CPU_MILLIS)
    limited.append(cgroup)
    process = subprocess.Popen(cgroup.command(
        [sys.executable, "-c", "import os, sys, time; print(os.getpid(), flush=True); "
                               "sys.stdin.read()"]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert int(process.stdout.readline()) == process.pid
        assert cgroup.pids() == [process.pid]
    finally:
        process.communicate("", timeout=30)
    deadline = time.monotonic() + 5
    while cgroup.pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cgroup.pids() == []


def test_the_cgroup_carries_the_daemonsets_limits(limited: list[Limited]) -> None:
    cgroup = Limited("files")
    limited.append(cgroup)

    def read(controller: str, name: str) -> str:
        directory = cgroup.directories["" if cgroup.version == "v2" else controller]
        with open(os.path.join(directory, name)) as f:
            return f.read().strip()

    if cgroup.version == "v1":
        assert read("memory", "memory.limit_in_bytes") == "52428800"
        assert (read("cpu", "cpu.cfs_quota_us"), read("cpu", "cpu.cfs_period_us")) == (
            "10000", "100000")
        assert cgroup.usage().kernel_peak_bytes is not None or not os.path.exists(
            os.path.join(cgroup.directories["memory"], "memory.kmem.max_usage_in_bytes"))
    else:
        assert read("", "memory.max") == "52428800"
        assert read("", "cpu.max") == "10000 100000"
    assert all(os.path.basename(d).startswith(RUN_PREFIX) for d in cgroup.directories.values())
    assert cgroup.usage().memory_bytes == 0 and cgroup.pids() == []


def test_the_hierarchy_is_the_one_that_holds_memory(tmp_path: pathlib.Path) -> None:
    """A hybrid machine (this one: v1 controllers, an empty cgroup2 beside them) is v1; a
    unified one is v2, if its root gives memory and cpu; neither is an error."""
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    hybrid = tmp_path / "hybrid"
    hybrid.write_text(
        "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0\n"
        "cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,memory 0 0\n"
        f"cgroup2 {unified} cgroup2 rw,nosuid 0 0\n")
    assert cgroup_mounts(str(hybrid)) == ("v1", {
        "cpu": "/sys/fs/cgroup/cpu,cpuacct", "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
        "memory": "/sys/fs/cgroup/memory"})
    v2 = tmp_path / "v2"
    v2.write_text(f"cgroup2 {unified} cgroup2 rw,nosuid,nsdelegate 0 0\n")
    assert cgroup_mounts(str(v2)) == ("v2", {"": str(unified)})
    (unified / "cgroup.controllers").write_text("cpuset io pids\n")
    with pytest.raises(CgroupError, match="lacks memory, cpu"):
        cgroup_mounts(str(v2))
    none = tmp_path / "none"
    none.write_text("proc /proc proc rw 0 0\n")
    with pytest.raises(CgroupError, match="no cgroup hierarchy"):
        cgroup_mounts(str(none))
