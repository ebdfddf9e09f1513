"""`make perf`: the paper's Table 1 (direct, udp, vxlan, host-gw), measured side by side in one
run on a namespace testbed, with pyflannel in the udp row and its per-packet baseline beside it.

Every workload runs over every path, in two regimes: the underlay shaped to 100 Mbit/s (the
paper's 100 Mbit NIC) and unshaped (this machine's ceiling). Each measurement runs in a fresh
process (perf/measure.py). Results go to RESULTS.md, results.json and results.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from perf.paths import PATHS, REGIMES, Endpoints, PerfBed, process_cpu_seconds, process_rss_bytes
from perf.report import write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IPERF_PORT = 5201
SHAPED_RATE = "100mbit"


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # perf.measure's: tcp, udp, latency
    streams: int = 1


WORKLOADS = [Workload("tcp1", "tcp", 1), Workload("tcp4", "tcp", 4),
             Workload("udp64", "udp"), Workload("latency", "latency")]
FULL_SECONDS = {"tcp": 10.0, "udp": 3.0, "latency": 3.0}
QUICK_SECONDS = {"tcp": 2.0, "udp": 1.0, "latency": 1.0}


def machine() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"kernel": platform.release(), "cpu": cpu, "cores": str(os.cpu_count()),
            "python": platform.python_version()}


class Servers:
    """iperf3 and qperf servers in every namespace a measurement may target; ended by PID."""

    def __init__(self, namespaces: list[str]) -> None:
        self.processes = []
        for netns in namespaces:
            for command in (["iperf3", "-s", "-p", str(IPERF_PORT)], ["qperf"]):
                self.processes.append(subprocess.Popen(
                    ["ip", "netns", "exec", netns, *command], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL))
        time.sleep(0.5)

    def close(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait()


def measure(endpoints: Endpoints, workload: Workload, seconds: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = ["ip", "netns", "exec", endpoints.client_netns, sys.executable, "-m",
                   "perf.measure", workload.kind, "--server", endpoints.server_ip,
                   "--port", str(IPERF_PORT), "--duration", str(seconds),
                   "--streams", str(workload.streams), "--out", out.name]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                timeout=seconds + 90)
        if result.returncode != 0:
            return {"error": (result.stderr or result.stdout).strip().splitlines()[-1:]}
        with open(out.name) as f:
            return json.load(f)


def describe(workload: Workload, sample: dict[str, Any]) -> str:
    if "error" in sample:
        return f"error: {sample['error']}"
    if workload.kind == "tcp":
        extra = (f", {sample['cpu_seconds_per_gb']:.2f} CPU s/GB"
                 if "cpu_seconds_per_gb" in sample else "")
        return f"{sample['bits_per_second'] / 1e6:.1f} Mbit/s{extra}"
    if workload.kind == "udp":
        return (f"{sample['packets_per_second'] / 1e3:.1f} kpps received, "
                f"{sample['lost_percent']:.1f} % lost")
    return f"{sample['one_way_us']:.1f} us one way"


def run(paths: list[str], regimes: list[str], workloads: list[Workload], reps: int,
        seconds: dict[str, float]) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    total = len(paths) * len(regimes) * len(workloads) * reps
    print(f"building the testbed: 2 hosts, containers, etcd, pyflanneld, vxlan; {total} "
          "measurements follow", flush=True)
    bed = PerfBed()
    server_side = bed.sides[1].host
    assert server_side.container_netns
    servers = Servers([server_side.netns, server_side.container_netns])
    try:
        for regime in regimes:
            bed.shape(SHAPED_RATE if regime.startswith("shaped") else None)
            for path in paths:
                endpoints = bed.use_path(path)
                for workload in workloads:
                    for rep in range(1, reps + 1):
                        pids = bed.daemon_pids() if path.startswith("pyflannel") else []
                        cpu_before = sum(map(process_cpu_seconds, pids))
                        sample = measure(endpoints, workload, seconds[workload.kind])
                        if pids and "bytes" in sample and sample["bytes"]:
                            cpu = sum(map(process_cpu_seconds, pids)) - cpu_before
                            sample["cpu_seconds_per_gb"] = cpu / (sample["bytes"] / 1e9)
                            sample["rss_bytes"] = max(map(process_rss_bytes, pids))
                        sample.update(regime=regime, path=path, workload=workload.name, rep=rep)
                        samples.append(sample)
                        print(f"[{len(samples)}/{total}] {regime} {path} {workload.name} "
                              f"#{rep}: {describe(workload, sample)}", flush=True)
    finally:
        servers.close()
        bed.close()
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="1 repetition of short measurements (about 2 minutes)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=PATHS)
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, default=REGIMES)
    parser.add_argument("--workloads", nargs="+", choices=[w.name for w in WORKLOADS],
                        default=[w.name for w in WORKLOADS])
    parser.add_argument("--reps", type=int, help="repetitions (default 3, 1 with --quick)")
    parser.add_argument("--seconds", type=float, help="length of every measurement")
    parser.add_argument("--out-dir", help="default perf/ (perf/quick/ with --quick)")
    args = parser.parse_args(argv)

    reps = args.reps or (1 if args.quick else 3)
    seconds = dict(QUICK_SECONDS if args.quick else FULL_SECONDS)
    if args.seconds:
        seconds = dict.fromkeys(seconds, args.seconds)
    out_dir = args.out_dir or os.path.join(REPO, "perf", "quick" if args.quick else "")
    os.makedirs(out_dir, exist_ok=True)
    workloads = [w for w in WORKLOADS if w.name in args.workloads]

    started = datetime.datetime.now(datetime.UTC)
    samples = run(args.paths, args.regimes, workloads, reps, seconds)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m perf.bench", *given])
    if os.environ.get("MAKELEVEL"):  # run by make
        command = f"make perf{' QUICK=1' if args.quick else ''} ({command})"
    meta = {"command": command,
            "date": started.strftime("%Y-%m-%d %H:%M UTC"), "reps": reps, "seconds": seconds,
            "shaped_rate": SHAPED_RATE, "machine": machine(),
            "wall_seconds": round((datetime.datetime.now(datetime.UTC) - started)
                                  .total_seconds())}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "samples": samples}, f, indent=1)
    table = write_report(meta, samples, out_dir)
    print(table)
    print(f"wrote {out_dir.rstrip('/')}/RESULTS.md, results.json and results.png "
          f"in {meta['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
