"""`make perf`: the paper's Table 1 (direct, udp, vxlan, host-gw), measured side by side in one
run on a namespace testbed, with pyflannel in the udp row, one row per pyflannel lever
(perf/paths.py's PYFLANNEL_ROWS) and, given a flanneld binary, flanneld's own udp and vxlan rows;
and pyflannel's and flanneld's rows again inside flannel's DaemonSet limits (DAEMONSET_ROWS).

Every path runs every workload in three regimes (perf/underlay.py): the underlay shaped to
100 Mbit/s (the paper's NIC), unshaped, and `wire` (1500-byte frames on the underlay), in rounds
that visit every path once per repetition (rounds()). Each measurement runs in a fresh process
(perf/measure.py). Results go to RESULTS.md, results.json and results.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from perf.measure import LATENCY_CPU, NO_ROUND_TRIP, QPERF, UDP_SOCKET_BUFFER
from perf.paths import FLANNELD_ROWS, Endpoints, PerfBed, all_paths, base_row, describe
from perf.proc import machine, machine_busy_seconds
from perf.report import write_report
from perf.underlay import REGIMES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_FLANNELD = os.path.normpath(os.path.join(REPO, "..", "shared", "reference",
                                                 "flanneld-v0.20.2"))
IPERF_PORT = 5201
# RFC 2544 asks for zero loss; a 1-second trial of ~100k packets allows this much.
LOSS_LIMIT_PERCENT = 0.1
BACKGROUND_SECONDS = 2.0
RETRIES = 3
RETRIED_ERRORS = ("server is busy", NO_ROUND_TRIP)


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # tcp, latency, loaded-latency (perf.measure's), or udp-search
    streams: int = 1


WORKLOADS = [Workload("tcp1", "tcp", 1), Workload("tcp4", "tcp", 4),
             Workload("latency", "latency"), Workload("loaded-latency", "loaded-latency"),
             Workload("udp64", "udp-search")]


@dataclass(frozen=True)
class Plan:
    reps: int  # of every workload, the 64-byte search included
    seconds: dict[str, float]  # length of one measurement (a search's trial: "udp"), by kind
    udp_rates: int  # rates one 64-byte search tries


# The full run: about 2.5 minutes per path (3 regimes, each path started afresh in every round) on
# 2 cores, so 20 paths in about 50 minutes; the quick one about 5.
FULL = Plan(3, {"tcp": 4.0, "latency": 1.0, "loaded-latency": 1.0, "udp": 1.0}, 6)
QUICK = Plan(1, {"tcp": 1.0, "latency": 1.0, "loaded-latency": 1.0, "udp": 1.0}, 3)


class Servers:
    """iperf3 and qperf servers in every namespace a measurement may target (qperf's on the
    CPU its client runs on); ended by PID."""

    def __init__(self, namespaces: list[str]) -> None:
        self.processes = []
        for netns in namespaces:
            for command in (["iperf3", "-s", "-p", str(IPERF_PORT)], QPERF):
                self.processes.append(subprocess.Popen(
                    ["ip", "netns", "exec", netns, *command], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL))
        time.sleep(0.5)

    def close(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait()


def measure(endpoints: Endpoints, kind: str, seconds: float, *options: str) -> dict[str, Any]:
    """One perf.measure process in the client's namespace; its result or {"error": ...}.

    Tried again when the trial said nothing about the path: iperf3's server takes a moment to
    let go of a test its client ended early (the bulk flow of loaded-latency) and turns the
    next away as busy; and a latency trial can find the path carrying nothing for a moment
    (seen once in the tests, path unknown)."""
    turned_away = []
    for _ in range(RETRIES):
        sample = _measure_once(endpoints, kind, seconds, *options)
        if not any(error in str(sample.get("error", "")) for error in RETRIED_ERRORS):
            break
        turned_away.append(sample["error"])
        time.sleep(1)
    if turned_away:  # kept in results.json
        sample["retried_after"] = turned_away
    return sample


def _measure_once(endpoints: Endpoints, kind: str, seconds: float, *options: str
                  ) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = ["ip", "netns", "exec", endpoints.client_netns, sys.executable, "-m",
                   "perf.measure", kind, "--server", endpoints.server_ip,
                   "--port", str(IPERF_PORT), "--duration", str(seconds), *options,
                   "--out", out.name]
        try:
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                    timeout=seconds + 90)
        except subprocess.TimeoutExpired:
            return {"error": f"{kind} took longer than {seconds + 90} s"}
        if result.returncode != 0:
            return {"error": (result.stderr or result.stdout).strip().splitlines()[-1:]}
        with open(out.name) as f:
            return json.load(f)


def zero_loss_rate(endpoints: Endpoints, seconds: float, rates: int) -> dict[str, Any]:
    """RFC 2544's throughput for 64-byte UDP: the highest rate offered with less than
    LOSS_LIMIT_PERCENT lost. The first rate is as fast as iperf3 sends; if that loses too much,
    the others bisect between nothing and it. A bisected rate that loses is tried once more
    before it counts as lossy: on a shared 2-core machine one stall of another process costs
    more than that. Each trial is a fresh process."""
    low, high = 0.0, 0.0
    best: dict[str, Any] | None = None
    done: list[dict[str, Any]] = []
    for step in range(rates):
        rate = (low + high) / 2 if step else None
        for _ in range(2 if rate else 1):
            trial = measure(endpoints, "udp", seconds,
                            *(["--rate-pps", str(rate)] if rate else []))
            if "error" in trial:
                return {**trial, "trials": done}
            done.append(trial)
            if trial["lost_percent"] < LOSS_LIMIT_PERCENT:
                break
        if trial["lost_percent"] < LOSS_LIMIT_PERCENT:
            best = trial
            if rate is None:
                break
            low = rate
        else:
            high = rate or trial["sent_pps"]
    return {"zero_loss_pps": best["sent_pps"] if best else 0.0,
            "lowest_lossy_pps": high or None, "trials": done}


def run_workload(endpoints: Endpoints, workload: Workload, plan: Plan,
                 daemon_pids: list[int]) -> dict[str, Any]:
    seconds = plan.seconds["udp" if workload.kind == "udp-search" else workload.kind]
    if workload.kind == "udp-search":
        return zero_loss_rate(endpoints, seconds, plan.udp_rates)
    if workload.kind == "tcp":
        return measure(endpoints, "tcp", seconds, "--streams", str(workload.streams),
                       "--daemon-pids", ",".join(map(str, daemon_pids)))
    return measure(endpoints, workload.kind, seconds)


def describe_sample(workload: Workload, sample: dict[str, Any]) -> str:
    if "error" in sample:
        return f"error: {sample['error']}"
    if workload.kind == "tcp":
        text = (f"{sample['bits_per_second'] / 1e6:.1f} Mbit/s, machine "
                f"{sample['machine_cpu_s_per_gb']:.2f} CPU s/GB")
        if "daemon_cpu_percent" in sample:
            sender, receiver = sample["daemon_cpu_percent"]
            text += (f", daemons {sample['daemon_cpu_s_per_gb']:.2f} CPU s/GB, "
                     f"{sender:.1f} % / {receiver:.1f} % of a core")
        return text
    if workload.kind == "udp-search":
        return (f"{sample['zero_loss_pps'] / 1e3:.1f} kpps with < {LOSS_LIMIT_PERCENT} % lost "
                f"({len(sample['trials'])} trials)")
    under = " under a bulk TCP flow" if workload.kind == "loaded-latency" else ""
    return f"{sample['one_way_us']:.1f} us one way{under}"


def regime_workloads(regime: str, workloads: list[Workload]) -> list[Workload]:
    """The workloads a regime runs (a shaped link only measures its shaper with 64-byte UDP)."""
    return [w for w in workloads if w.kind != "udp-search" or REGIMES[regime].udp_search]


def rounds(regimes: list[str], paths: list[str], reps: int) -> list[tuple[str, int, str]]:
    """(regime, repetition, path) in the order measured. Each regime in turn; in it, one round
    per repetition, in which every path runs all its workloads once. So a path's k-th sample
    and the baseline's were taken minutes apart, never the whole run apart: this machine's
    speed drifts by 20 % and more over a run, and the report's ratios pair samples of one
    round. Rounds alternate direction (counted across regimes), so drift within a round
    favours neither end, and the path that ends a round begins the next without a restart."""
    order = []
    for turn, (regime, rep) in enumerate((regime, rep) for regime in regimes
                                         for rep in range(1, reps + 1)):
        order += [(regime, rep, path) for path in (paths if turn % 2 == 0 else paths[::-1])]
    return order


def udp_socket_buffer_bytes() -> int:
    """What the receiving iperf3's socket gets of UDP_SOCKET_BUFFER: the kernel caps it at
    net.core.rmem_max, which is the machine's (every namespace's) and left as it is."""
    with open("/proc/sys/net/core/rmem_max") as f:
        return min(UDP_SOCKET_BUFFER, int(f.read()))


def background_busy_percent() -> float:
    """How busy the whole machine is while nothing of the benchmark runs: such load counts in
    every machine CPU figure, so the report states it."""
    busy = machine_busy_seconds()
    time.sleep(BACKGROUND_SECONDS)
    percent = 100 * (machine_busy_seconds() - busy) / (BACKGROUND_SECONDS * (os.cpu_count() or 1))
    print(f"the machine is {percent:.1f} % busy without the benchmark", flush=True)
    return percent


def run(paths: list[str], regimes: list[str], workloads: list[Workload], plan: Plan,
        flanneld: str | None
        ) -> tuple[list[dict[str, Any]], dict[str, list[int]], dict[str, Any]]:
    """Every measurement; each daemon row's peak RSS, client's and server's; and what the
    DaemonSet rows' cgroups were charged and did (PerfBed.cgroups)."""
    samples: list[dict[str, Any]] = []
    order = rounds(regimes, paths, plan.reps)
    total = sum(len(regime_workloads(regime, workloads)) for regime, _, _ in order)
    done = 0
    print(f"building the testbed: 2 hosts, containers, etcd, pyflanneld, vxlan; {total} "
          f"measurements follow in {len(regimes) * plan.reps} rounds over every path",
          flush=True)
    bed = PerfBed(flanneld)
    servers: Servers | None = None
    try:
        server_side = bed.sides[1].host
        assert server_side.container_netns
        servers = Servers([server_side.netns, server_side.container_netns])
        for regime, rep, path in order:
            todo = regime_workloads(regime, workloads)
            try:
                endpoints = bed.use(path, regime)
            except Exception as error:  # the other paths (and this one's next round) go on
                done += len(todo)
                print(f"[{done}/{total}] {regime} {path} #{rep}: setup failed, {len(todo)} "
                      f"measurements skipped: {error}", flush=True)
                samples.append({"error": f"setup: {error}", "regime": regime, "path": path,
                                "workload": "setup", "rep": rep})
                continue
            for workload in todo:
                sample = run_workload(endpoints, workload, plan, bed.daemon_pids())
                sample.update(regime=regime, path=path, workload=workload.name, rep=rep)
                samples.append(sample)
                done += 1
                print(f"[{done}/{total}] {regime} {path} {workload.name} #{rep}: "
                      f"{describe_sample(workload, sample)}", flush=True)
    finally:
        try:
            if servers is not None:
                servers.close()
        finally:
            bed.close()
    return samples, bed.peak_rss, bed.cgroups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 repetition of short measurements (about 5 minutes)")
    parser.add_argument("--paths", nargs="+", choices=all_paths(True),
                        help="default: all (flanneld's rows only with a flanneld binary)")
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    parser.add_argument("--workloads", nargs="+", choices=[w.name for w in WORKLOADS],
                        default=[w.name for w in WORKLOADS])
    parser.add_argument("--reps", type=int, help="repetitions (default 3, 1 with --quick)")
    parser.add_argument("--seconds", type=float, help="length of every measurement and trial")
    parser.add_argument("--udp-rates", type=int, help="rates each 64-byte zero-loss search "
                        "tries (default 6, 3 with --quick)")
    parser.add_argument("--flanneld", default=DEFAULT_FLANNELD if os.path.exists(
                        DEFAULT_FLANNELD) else "", help="a flanneld binary (etcd v3 API) for "
                        "flanneld's own rows; '' leaves them out (default: %(default)r)")
    parser.add_argument("--out-dir", help="default perf/ (perf/quick/ with --quick)")
    args = parser.parse_args(argv)

    flanneld = os.path.abspath(args.flanneld) if args.flanneld else None
    if flanneld and not os.access(flanneld, os.X_OK):
        parser.error(f"--flanneld {args.flanneld}: not an executable file")
    paths = args.paths or all_paths(flanneld is not None)
    if not flanneld and {base_row(path) for path in paths} & set(FLANNELD_ROWS):
        parser.error(f"{', '.join(FLANNELD_ROWS)} and their DaemonSet rows need --flanneld")
    base = QUICK if args.quick else FULL
    plan = Plan(args.reps or base.reps,
                dict.fromkeys(base.seconds, args.seconds) if args.seconds else base.seconds,
                args.udp_rates or base.udp_rates)
    out_dir = args.out_dir or os.path.join(REPO, "perf", "quick" if args.quick else "")
    os.makedirs(out_dir, exist_ok=True)
    workloads = [w for w in WORKLOADS if w.name in args.workloads]

    started = datetime.datetime.now(datetime.UTC)
    background = [background_busy_percent()]
    samples, peak_rss, cgroups = run(paths, args.regimes, workloads, plan, flanneld)
    background.append(background_busy_percent())
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m perf.bench", *given])
    if os.environ.get("MAKELEVEL"):  # run by make
        command = f"make perf{' QUICK=1' if args.quick else ''} ({command})"
    meta = {"command": command,
            "date": started.strftime("%Y-%m-%d %H:%M UTC"), **asdict(plan),
            "loss_limit_percent": LOSS_LIMIT_PERCENT,
            "udp_socket_buffer_bytes": udp_socket_buffer_bytes(), "latency_cpu": LATENCY_CPU,
            "machine": machine(),
            "background_busy_percent": [round(percent, 1) for percent in background],
            "flanneld": flanneld, "paths": {path: describe(path) for path in paths},
            "regimes": {name: asdict(REGIMES[name]) for name in args.regimes},
            "daemonset_cgroups": cgroups,
            "wall_seconds": round((datetime.datetime.now(datetime.UTC) - started)
                                  .total_seconds())}
    peaks = {row: {"sender": client, "receiver": server}
             for row, (client, server) in peak_rss.items()}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "samples": samples, "peak_rss_bytes": peaks}, f, indent=1)
    table = write_report(meta, samples, peaks, out_dir)
    print(table)
    print(f"wrote {out_dir.rstrip('/')}/RESULTS.md, results.json and results.png "
          f"in {meta['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
