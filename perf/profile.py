"""`make profile`: where one TCP stream, and four, spend the machine over pyflannel, beside kernel
VXLAN, over IPv4 and over IPv6.

Builds the benchmark's testbed, runs iperf3 TCP over each path while linux-perf samples every CPU
(`perf record -a -g -e cpu-clock`), and writes perf/PROFILE.md: the share of the machine each
thread took (pyflannel's packet threads are named pyflannel-tx and pyflannel-rx) and what it went
on: payload copies between the kernel and user space, the fast path's own code, the rest of the
kernel (the network stacks, TUN, scheduling) and the rest of user space; how often each iperf3 end
went to sleep (a path that keeps both cores busy sleeps rarely: one that leaves them idle shows
it here, where CPU shares alone do not); then the kernel's work by stage (STAGES) side by side,
where the paths differ.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict

from perf.bench import IPERF_PORT, Servers
from perf.paths import DEFAULT_ROW, PerfBed, all_paths
from perf.proc import machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = [DEFAULT_ROW, "vxlan", "pyflannel-ipv6", "vxlan-ipv6"]
WARMUP_SECONDS = 2
CATEGORIES = ["payload copies", "fast path code", "kernel, other", "user space, other"]
# Where the kernel and libc move payload bytes.
COPY_SYMBOLS = re.compile(
    r"_copy_(to|from)_iter|copy_user|rep_movs|memmove|memcpy|csum_partial_copy")
# A perf report line: "  12.49%  pyflannel-tx  [k] _copy_to_iter"
REPORT_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[([k.])\]\s+(\S+)")
# One recording of a path: Mbit/s, each thread kind's shares by CATEGORIES, STAGES' shares, and
# how many times a second the iperf3 client and server went to sleep.
Recording = tuple[float, dict, dict[str, float], tuple[float, float]]
# The kernel's work where the two paths differ, each the share of samples whose call stack passes
# through it (inclusive: a stage inside another counts in both). pyflannel's data path is its tc
# programs, a bpf_redirect to the underlay and the receive-only VXLAN device's vxlan_rcv. A tail
# call leaves no frame: a plain bpf_redirect (the next-hop cache) reaches the underlay's transmit
# that way, which then counts under no stage here, where bpf_redirect_neigh's counts under
# skb_do_redirect.
STAGES = {
    "pyflannel's tc programs": re.compile(r"^bpf_prog_\w+_(tun_egress|udp_ingress|vxlan_ingress)$"),
    "bpf_redirect to the underlay (skb_do_redirect)": re.compile(r"^skb_do_redirect$"),
    "kernel VXLAN send (vxlan_xmit)": re.compile(r"^vxlan_xmit$"),
    "kernel VXLAN receive (vxlan_rcv)": re.compile(r"^vxlan_rcv$"),
    "GSO header checks of a device's transmit (__skb_gso_segment)":
        re.compile(r"^__skb_gso_segment$"),
    "netfilter rules (nft_do_chain)": re.compile(r"^nft_do_chain$"),
    "IP forwarding (ip_forward, ip6_forward)": re.compile(r"^ip6?_forward$"),
    "bridge (br_handle_frame)": re.compile(r"^br_handle_frame$"),
    "payload copies": COPY_SYMBOLS,
}


def category(symbol: str, kernel: bool) -> str:
    if COPY_SYMBOLS.search(symbol):
        return "payload copies"
    if symbol.startswith("__pyx_f_8fastpath"):
        return "fast path code"
    return "kernel, other" if kernel else "user space, other"


def thread_kind(comm: str) -> str:
    """Group the threads: the packet threads by name, the rest by program."""
    if comm == "swapper":
        return "idle"
    if comm.startswith(("pyflannel-", "iperf3", "ksoftirqd")):
        return comm.split("/")[0]
    return "other"


def stage_shares(script: str) -> dict[str, float]:
    """Each of STAGES' share (%) of the samples in `perf script` output (call stacks, one frame
    a line, a blank line after each sample)."""
    counts = dict.fromkeys(STAGES, 0)
    samples = 0
    for sample in script.split("\n\n"):
        if not sample.strip():
            continue
        samples += 1
        lines = sample.strip().splitlines()[1:]  # after the sample's header line
        frames = [words[1].split("+")[0] for words in map(str.split, lines) if len(words) > 1]
        for stage, pattern in STAGES.items():
            if any(pattern.search(frame) for frame in frames):
                counts[stage] += 1
    return {stage: 100 * count / max(samples, 1) for stage, count in counts.items()}


def sleeps(pid: int) -> int:
    """How many times the process has gone to sleep (given up its CPU of its own accord)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f
                    if line.startswith("voluntary_ctxt_switches:"))


def profile(endpoints_netns: str, server_ip: str, server_pid: int, seconds: int,
            streams: int) -> Recording:
    """`streams` TCP streams for `seconds` with perf sampling the middle of it: (Mbit/s,
    shares, stage shares, sleeps a second of the client and of the server at server_pid)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        flow = subprocess.Popen(
            ["ip", "netns", "exec", endpoints_netns, "iperf3", "-c", server_ip, "-p",
             str(IPERF_PORT), "-t", str(seconds + 2 * WARMUP_SECONDS), "-P", str(streams),
             "-J"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        subprocess.run(["sleep", str(WARMUP_SECONDS)], check=True)
        # `ip netns exec` runs iperf3 in its own process: flow.pid is the client's
        before = sleeps(flow.pid), sleeps(server_pid)
        subprocess.run(["perf", "record", "-a", "-g", "-e", "cpu-clock", "-o", data, "--",
                        "sleep", str(seconds)], check=True, capture_output=True)
        slept = ((sleeps(flow.pid) - before[0]) / seconds,
                 (sleeps(server_pid) - before[1]) / seconds)
        out, _ = flow.communicate(timeout=seconds + 60)
        report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort",
                                 "comm,sym", "-g", "none", "--percent-limit", "0", "--stdio"],
                                check=True, capture_output=True, text=True).stdout
        stages = stage_shares(subprocess.run(["perf", "script", "-i", data], check=True,
                                             capture_output=True, text=True).stdout)
    mbps = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
    shares: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(CATEGORIES, 0.0))
    for line in report.splitlines():
        found = REPORT_LINE.match(line)
        if found:
            percent, comm, space, symbol = found.groups()
            kind = thread_kind(comm)
            shares[kind][category(symbol, space == "k") if kind != "idle" else
                         "kernel, other"] += float(percent)
    return mbps, shares, stages, slept


def stage_table(results: dict[str, Recording]) -> list[str]:
    """STAGES side by side: % of a core, and that per 10 Gbit/s carried."""
    lines = ["### the kernel's work by stage", "",
             "Each cell: the share of samples whose call stack passes through the stage, as % "
             "of one core, and in brackets that per 10 Gbit/s carried (stages inside others "
             "count in both).", "",
             "| stage | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for stage in STAGES:
        cells = [f"{2 * stages[stage]:.1f} % ({2 * stages[stage] * 1e4 / mbps:.2f})"
                 for mbps, _, stages, _ in results.values()]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return lines + [""]


def flows(streams: int) -> str:
    return "one TCP stream" if streams == 1 else f"{streams} TCP streams"


def write(results: dict[int, dict[str, Recording]], seconds: int, out: str) -> str:
    """PROFILE.md: for each stream count, each path's threads, then the stages side by side."""
    m = machine()
    counts = " ".join(map(str, results))
    lines = ["# Where TCP spends the machine: pyflannel beside kernel VXLAN, IPv4 and IPv6", "",
             f"- command: `make profile` (`python -m perf.profile --seconds {seconds} "
             f"--streams {counts} --paths {' '.join(next(iter(results.values())))}`)",
             f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
             f"- machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}",
             "- `perf record -a -g -e cpu-clock` over both cores while iperf3 runs container to "
             "container on `make perf`'s testbed (unshaped), each path in turn; each cell is a "
             "share of all samples of both cores (200 % would be both cores for the whole "
             "time).", ""]
    for streams, paths in results.items():
        lines += [f"## {flows(streams)}", ""]
        for path, (mbps, shares, _, (client, server)) in paths.items():
            lines += [f"### {path}: {mbps / 1000:.1f} Gbit/s", "",
                      f"iperf3 went to sleep {client:.0f} times a second sending and "
                      f"{server:.0f} receiving.", "",
                      "| thread | all | " + " | ".join(CATEGORIES) + " |",
                      "|---|---|" + "---|" * len(CATEGORIES)]
            for kind in sorted(shares, key=lambda k: -sum(shares[k].values())):
                row = shares[kind]
                total = sum(row.values())
                if total < 0.5:
                    continue
                cells = [f"{2 * row[c]:.1f} %" for c in CATEGORIES]
                lines.append(f"| {kind} | {2 * total:.1f} % | " + " | ".join(cells) + " |")
            lines.append("")
        lines += stage_table(paths)
    text = "\n".join(lines)
    with open(out, "w") as f:
        f.write(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="length of each recording")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4],
                        help="parallel TCP streams: one recording of each path per count")
    parser.add_argument("--paths", nargs="+", default=PATHS, choices=all_paths(False),
                        metavar="PATH", help=f"the paths, of make perf's (default: {PATHS})")
    parser.add_argument("--out", default=os.path.join(REPO, "perf", "PROFILE.md"))
    args = parser.parse_args(argv)
    bed = PerfBed()
    servers = Servers([bed.sides[1].host.container_netns or ""])
    results: dict[int, dict[str, Recording]] = {}
    try:
        for streams in args.streams:
            results[streams] = {}
            for path in args.paths:
                endpoints = bed.use(path, "unshaped")
                result = profile(endpoints.client_netns, endpoints.server_ip,
                                 servers.processes[0].pid,  # its iperf3 (then its qperf)
                                 args.seconds, streams)
                results[streams][path] = result
                print(f"{flows(streams)}, {path}: {result[0]:.0f} Mbit/s", flush=True)
    finally:
        servers.close()
        bed.close()
    print(write(results, args.seconds, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
