"""The benchmark harness cannot rot: a short run of every kind of measurement over a pyflannel row
on each etcd API, pyflanneld's vxlan and host-gw backends, each followed by the kernel's own set
up by hand, (when the reference flanneld is there) flanneld's vxlan row, and the IPv6 paths, in
the wire regime. This checks the shape of what it writes, never the speed."""

import json
import os
import subprocess
import sys
from pathlib import Path

from perf.bench import DEFAULT_FLANNELD, WORKLOADS, rounds
from perf.paths import DEFAULT_ROW, IPV6_PATHS, PYFLANNEL_ROWS, PerfBed, describe, etcd_api
from tests.conftest import require_host_network_tools
from tests.limits import DAEMONSET_CPU_MILLIS, DAEMONSET_MEMORY_BYTES


def test_every_kind_of_measurement(tmp_path: Path) -> None:
    require_host_network_tools()
    v2_row = next(row for row, flags in PYFLANNEL_ROWS.items() if etcd_api(flags) == "v2")
    flanneld = DEFAULT_FLANNELD if os.path.exists(DEFAULT_FLANNELD) else ""
    # pyflanneld's vxlan row, then the hand-built one on the device it leaves; the same for
    # host-gw, whose hand-built routes replace those pyflanneld leaves.
    paths = [DEFAULT_ROW, v2_row, "pyflannel-vxlan", "vxlan", "pyflannel-host-gw", "host-gw",
             *(["flanneld-vxlan"] if flanneld else []), *IPV6_PATHS]
    result = subprocess.run(
        [sys.executable, "-m", "perf.bench", "--paths", *paths, "--regimes", "wire",
         "--reps", "1", "--seconds", "1", "--udp-rates", "2", "--flanneld", flanneld,
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    meta = data["meta"]
    assert {"command", "date", "machine", "reps", "seconds", "udp_rates", "paths",
            "regimes", "flanneld", "udp_socket_buffer_bytes", "latency_cpu"} <= set(meta)
    assert meta["udp_socket_buffer_bytes"] > 0
    assert "vulnerabilities" in meta["machine"]
    samples = data["samples"]
    assert [(s["path"], s["workload"]) for s in samples] == \
        [(path, w.name) for path in paths for w in WORKLOADS]
    for sample in samples:
        assert "error" not in sample, sample
        assert (sample["regime"], sample["rep"]) == ("wire", 1)
        with_daemons = meta["paths"][sample["path"]]["kind"] != "kernel"
        if sample["workload"].startswith("tcp"):
            assert sample["bits_per_second"] > 0 and sample["bytes"] > 0
            assert sample["machine_cpu_s_per_gb"] > 0
            assert ("daemon_cpu_s_per_gb" in sample) == with_daemons
            if with_daemons:
                assert len(sample["daemon_cpu_percent"]) == 2
                assert all(percent >= 0 for percent in sample["daemon_cpu_percent"])
        elif sample["workload"].endswith("latency"):
            assert sample["one_way_us"] > 0, sample
        else:
            assert sample["workload"] == "udp64"
            assert 1 <= len(sample["trials"]) <= 3 and sample["zero_loss_pps"] >= 0
            assert all({"sent_pps", "lost_percent"} <= set(t) for t in sample["trials"])
    peaks = data["peak_rss_bytes"]
    assert set(peaks) == {p for p in paths if meta["paths"][p]["kind"] != "kernel"}
    assert all(peak["sender"] > 0 and peak["receiver"] > 0 for peak in peaks.values())
    report = (tmp_path / "RESULTS.md").read_text()
    assert "### wire" in report and all(f"| {path} |" in report for path in paths)
    assert "for `pyflannel-ipv6` (pyflanneld's defaults), over IPv6" in report
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")


def test_rounds_alternate_and_cover_every_path_once_per_repetition() -> None:
    order = rounds(["shaped", "wire"], ["a", "b", "c"], 2)
    assert order == [("shaped", 1, "a"), ("shaped", 1, "b"), ("shaped", 1, "c"),
                     ("shaped", 2, "c"), ("shaped", 2, "b"), ("shaped", 2, "a"),
                     ("wire", 1, "a"), ("wire", 1, "b"), ("wire", 1, "c"),
                     ("wire", 2, "c"), ("wire", 2, "b"), ("wire", 2, "a")]
    # With an odd count the direction carries over the regime's end: no path is restarted there.
    order = rounds(["shaped", "wire"], ["a", "b"], 1)
    assert [path for _, _, path in order] == ["a", "b", "b", "a"]


def test_no_path_inherits_the_path_mtu_another_taught_the_containers() -> None:
    """The vxlan path's 1450-byte MTU, learnt by the sending container as a path MTU, must not
    carry over to the next path measured (it cut pyflannel's throughput by a third)."""
    require_host_network_tools()
    bed = PerfBed()
    try:
        client = bed.sides[0].host
        endpoints = bed.use("vxlan", "unshaped")
        # A full-sized packet with DF: flannel.1 answers "fragmentation needed" with its MTU.
        client.in_container("ping", "-c", "2", "-W", "1", "-M", "do", "-s", "1444",
                            endpoints.server_ip, check=False)
        assert "mtu 1450" in client.in_container("ip", "route", "show", "cache").stdout
        bed.use(DEFAULT_ROW, "unshaped")
        assert "mtu" not in client.in_container("ip", "route", "show", "cache").stdout
    finally:
        bed.close()


def test_a_daemonset_row_runs_its_daemons_inside_flannels_limits() -> None:
    """`pyflannel-daemonset` runs the default row's daemons, each in a cgroup of its own with
    kube-flannel.yml's limits; the next row finds them gone, their charges kept for the
    report."""
    require_host_network_tools()
    assert describe("pyflannel-daemonset")["daemonset"]["repeats"] == DEFAULT_ROW
    bed = PerfBed()
    try:
        bed.use("pyflannel-daemonset", "unshaped")
        cgroups = list(bed.limits.cgroups.values())
        assert sorted(pid for cgroup in cgroups for pid in cgroup.pids()) == \
            sorted(bed.daemon_pids())
        assert all(cgroup.usage().memory_limit_bytes == DAEMONSET_MEMORY_BYTES
                   for cgroup in cgroups)
        bed.use(DEFAULT_ROW, "unshaped")
        assert not bed.limits.cgroups
        [start] = bed.cgroups["pyflannel-daemonset"]
        assert len(start) == 2
        for usage in start:
            assert (usage["memory_limit_bytes"], usage["cpu_millis"]) == \
                (DAEMONSET_MEMORY_BYTES, DAEMONSET_CPU_MILLIS)
            assert usage["memory_peak_bytes"] > 0 and usage["oom_kills"] == 0
    finally:
        bed.close()
