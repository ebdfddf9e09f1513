"""The benchmark's tables (stdout and RESULTS.md) and chart (results.png), from results.json's
meta, samples and peak RSS alone."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable
from typing import Any

# The paper's Table 1 (flannel v0.7.0, two hosts on a 100 Mbit NIC, iperf TCP), Mbit/s, by its
# rows; meta["paths"][path]["paper"] says which row a path stands beside.
PAPER_MBPS = {"direct": 94.3, "udp": 92.7, "vxlan": 91.2, "host-gw": 94.3}
# Ratios are to the kernel's VXLAN, as flannel's vxlan backend sets it up: the targets
# are such ratios, measured within one run. A path over IPv6 (meta's "ipv6") is compared with
# the kernel's VXLAN over IPv6, flannel-v6.1.
BASELINE = "vxlan"
IPV6_BASELINE = "vxlan-ipv6"
DAEMON_CPU_LIMIT_PERCENT = 10  # flannel's DaemonSet: cpu 100m

Sample = dict[str, Any]
Metric = Callable[[Sample], float | None]


def _mbps(s: Sample) -> float:
    return s["bits_per_second"] / 1e6


def _kpps(s: Sample) -> float:
    return s["zero_loss_pps"] / 1e3


def _field(name: str, scale: float = 1.0, index: int | None = None) -> Metric:
    """A sample's field (an item of it, for lists), scaled; None where the sample has none."""
    def get(s: Sample) -> float | None:
        value = s.get(name)
        if value is not None and index is not None:
            value = value[index]
        return None if value is None else value * scale
    return get


class Results:
    def __init__(self, meta: dict[str, Any], samples: list[Sample],
                 peaks: dict[str, dict[str, int]]) -> None:
        self.meta, self.samples, self.peaks = meta, samples, peaks
        self.paths = list(meta["paths"])
        self.regimes = list(meta["regimes"])
        self.shaped = [r for r in self.regimes if meta["regimes"][r]["rate"]]

    def baseline(self, path: str) -> str:
        """The path a path's ratios are over: kernel VXLAN of its family."""
        return IPV6_BASELINE if "ipv6" in self.meta["paths"].get(path, {}) else BASELINE

    def values(self, regime: str, path: str, workload: str, metric: Metric) -> list[float]:
        return list(self._by_round(regime, path, workload, metric).values())

    def median(self, regime: str, path: str, workload: str, metric: Metric) -> float | None:
        values = self.values(regime, path, workload, metric)
        return statistics.median(values) if values else None

    def ratio(self, regime: str, path: str, workload: str, metric: Metric) -> float | None:
        """The path's sample over the baseline's of the same round (repetition), the median
        over rounds: a round measures every path within minutes, so the machine's drift
        between rounds cancels out of each ratio."""
        ours, base = (self._by_round(regime, p, workload, metric)
                      for p in (path, self.baseline(path)))
        ratios = [value / base[rep] for rep, value in ours.items() if base.get(rep)]
        return statistics.median(ratios) if ratios else None

    def _by_round(self, regime: str, path: str, workload: str, metric: Metric
                  ) -> dict[int, float]:
        """The metric of each round's sample (by repetition) that has it."""
        found = {s["rep"]: metric(s) for s in self.samples if "error" not in s and
                 (s["regime"], s["path"], s["workload"]) == (regime, path, workload)}
        return {rep: value for rep, value in found.items() if value is not None}


def _cell(values: list[float], digits: int = 1) -> str:
    """median [min-max], or the single value, or - when nothing was measured."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-" \
           f"{max(values):.{digits}f}]"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(names: list[str]) -> list[str]:
    return [_row(names), _row(["---"] * len(names))]


def _with_ratio(results: Results, regime: str, path: str, workload: str, metric: Metric,
                digits: int = 1) -> list[str]:
    """The cell and its ratio to the baseline."""
    ratio = results.ratio(regime, path, workload, metric)
    return [_cell(results.values(regime, path, workload, metric), digits),
            "-" if ratio is None else f"{ratio:.2f}"]


def _daemon_percent(results: Results, regime: str, path: str, workload: str) -> str:
    """Medians of the sender's and the receiver's daemon CPU, % of one core."""
    sender = results.median(regime, path, workload, _field("daemon_cpu_percent", index=0))
    receiver = results.median(regime, path, workload, _field("daemon_cpu_percent", index=1))
    return "-" if sender is None or receiver is None else f"{sender:.1f} / {receiver:.1f}"


def _zero_loss_cells(results: Results, regime: str, path: str) -> list[str]:
    cells = _with_ratio(results, regime, path, "udp64", _kpps)
    lossy = results.values(regime, path, "udp64", _field("lowest_lossy_pps", 1e-3))
    if results.values(regime, path, "udp64", _kpps) == [0.0] and lossy:  # every trial lost
        cells[0] = f"< {lossy[0]:.1f}"
    return cells


def regime_tables(results: Results, regime: str) -> list[str]:
    machine = _field("machine_cpu_s_per_gb")
    lines = [f"### {regime}", "", "Throughput and CPU (TCP, container to container):", ""]
    lines += _header(["path", "TCP 1 stream, Mbit/s", "/ vxlan", "TCP 4 streams, Mbit/s",
                      "/ vxlan", "machine CPU s/GB, TCP 1", "/ vxlan", "machine CPU s/GB, TCP 4",
                      "/ vxlan", "daemons' CPU s/GB, TCP 1", "daemon % of a core, send / recv, "
                      "TCP 1", "TCP 4", "paper, Mbit/s"])
    for path in results.paths:
        paper = results.meta["paths"][path]["paper"]
        lines.append(_row(
            [path, *_with_ratio(results, regime, path, "tcp1", _mbps),
             *_with_ratio(results, regime, path, "tcp4", _mbps),
             *_with_ratio(results, regime, path, "tcp1", machine, 2),
             *_with_ratio(results, regime, path, "tcp4", machine, 2),
             _cell(results.values(regime, path, "tcp1", _field("daemon_cpu_s_per_gb")), 2),
             _daemon_percent(results, regime, path, "tcp1"),
             _daemon_percent(results, regime, path, "tcp4"),
             f"{PAPER_MBPS[paper]}" if regime in results.shaped and paper else ""]))
    lines += ["", "Latency (qperf udp_lat, one way) and 64-byte UDP:", ""]
    lines += _header(["path", "unloaded, us", "/ vxlan", "under a bulk TCP flow, us", "/ vxlan",
                      f"64 B zero-loss rate (< {results.meta['loss_limit_percent']} % lost), "
                      "kpps", "/ vxlan"])
    for path in results.paths:
        lines.append(_row(
            [path, *_with_ratio(results, regime, path, "latency", _field("one_way_us")),
             *_with_ratio(results, regime, path, "loaded-latency", _field("one_way_us")),
             *_zero_loss_cells(results, regime, path)]))
    return lines + [""]


# Issue 7's targets, each a ratio to kernel VXLAN within the run or a limit of flannel's own
# DaemonSet (cpu 100m, memory 50Mi); met or missed, from the data alone.
TCP_RATIO_MIN = 1.0
CPU_PER_GB_RATIO_MAX = 1.5
RSS_LIMIT_MIB = 50
LATENCY_RATIO_MAX = 1.2
BREAKDOWN = ("the README's Performance section and perf/PROFILE.md give the measured "
             "breakdown of why")


def _verdict(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "**missed**")


def _udp_rows(results: Results) -> list[str]:
    """pyflanneld's rows that run its udp backend: the defaults first, then each lever."""
    return [p for p, info in results.meta["paths"].items() if info["kind"] == "pyflannel"
            and info.get("backend", {}).get("Type", "udp") == "udp"]


def _ratio_checks(results: Results, path: str, regimes: list[str], workloads: list[str],
                  metric: Metric, ok: Callable[[float], bool], digits: int = 1
                  ) -> tuple[list[str], bool | None]:
    """'regime workload: value against vxlan's (ratio)' for each measured pair, and whether
    every ratio passes `ok` (None when nothing was measured)."""
    parts, verdicts = [], []
    for regime in regimes:
        for workload in workloads:
            ours = results.median(regime, path, workload, metric)
            base = results.median(regime, results.baseline(path), workload, metric)
            ratio = results.ratio(regime, path, workload, metric)
            if ours is None or base is None or ratio is None:
                continue
            verdicts.append(ok(ratio))
            parts.append(f"{regime} {workload}: {ours:.{digits}f} against {base:.{digits}f} "
                         f"({ratio:.2f}x)")
    return parts, (all(verdicts) if verdicts else None)


def targets_tables(results: Results) -> list[str]:
    """Issue 7's targets for pyflanneld's default row, and again over IPv6 (issue 30)."""
    rows = [row for row in _udp_rows(results) if "ipv6" not in results.meta["paths"][row]]
    rows6 = [row for row in _udp_rows(results) if "ipv6" in results.meta["paths"][row]]
    lines = []
    if rows and BASELINE in results.paths:
        lines += targets_table(results, rows, "")
    if rows6 and IPV6_BASELINE in results.paths:
        lines += targets_table(results, rows6, ", over IPv6 (the containers' IPv6 addresses)")
    return lines


def targets_table(results: Results, rows: list[str], family: str) -> list[str]:
    """Issue 7's targets 1-6 for the first of `rows` (pyflanneld's udp rows of one family),
    each with what this run measured."""
    default = rows[0]
    unshaped = [r for r in results.regimes if r not in results.shaped]
    searched = [r for r in results.regimes if results.meta["regimes"][r]["udp_search"]]
    machine, latency = _field("machine_cpu_s_per_gb"), _field("one_way_us")
    checks: list[tuple[str, list[str], bool | None]] = []

    parts, met = _ratio_checks(results, default, unshaped, ["tcp1", "tcp4"], _mbps,
                               lambda r: r >= TCP_RATIO_MIN, 0)
    checks.append((f"1. TCP, 1 and 4 streams, >= {TCP_RATIO_MIN}x VXLAN (Mbit/s)", parts, met))
    parts, met = _ratio_checks(results, default, [r for r in unshaped
                                                  if not results.meta["regimes"][r]["wire"]],
                               ["tcp1", "tcp4"], machine,
                               lambda r: r <= CPU_PER_GB_RATIO_MAX, 2)
    checks.append((f"2. whole-machine CPU per GB, unshaped, <= {CPU_PER_GB_RATIO_MAX}x VXLAN "
                   "(s/GB)", parts, met))
    parts, verdicts = [], []
    for regime in results.shaped:
        for workload in ("tcp1", "tcp4"):
            shares = [results.median(regime, default, workload,
                                     _field("daemon_cpu_percent", index=i)) for i in (0, 1)]
            if None not in shares:
                verdicts.append(max(shares) <= DAEMON_CPU_LIMIT_PERCENT)
                parts.append(f"{regime} {workload}: sender {shares[0]:.1f} %, receiver "
                             f"{shares[1]:.1f} %")
    checks.append((f"3. each daemon at 100 Mbit/s <= {DAEMON_CPU_LIMIT_PERCENT} % of a core",
                   parts, all(verdicts) if verdicts else None))
    parts, verdicts = [], []
    for api in ("v3", "v2"):
        peaks = {p: max(results.peaks[p].values()) / 2**20 for p in rows
                 if p in results.peaks and results.meta["paths"][p]["etcd_api"] == api}
        if peaks:
            over = [f"`{p}` {mib:.1f}" for p, mib in peaks.items() if mib > RSS_LIMIT_MIB]
            verdicts.append(not over)
            parts.append(f"etcd {api}: at most {max(peaks.values()):.1f} MiB over "
                         f"{len(peaks)} row(s)" + (f", over the limit: {', '.join(over)}"
                                                   if over else ""))
    checks.append((f"4. peak RSS of every pyflanneld of the udp backend's rows <= "
                   f"{RSS_LIMIT_MIB} MiB", parts, all(verdicts) if verdicts else None))
    parts, met = _ratio_checks(results, default, results.regimes, ["latency"], latency,
                               lambda r: r <= LATENCY_RATIO_MAX)
    loaded, _ = _ratio_checks(results, default, results.regimes, ["loaded-latency"], latency,
                              lambda r: True)
    checks.append((f"5. one-way latency, unloaded, <= {LATENCY_RATIO_MAX}x VXLAN (us); under "
                   "a bulk flow shown beside it", parts + loaded, met))
    parts, met = _ratio_checks(results, default, searched, ["udp64"], _kpps,
                               lambda r: r >= 1.0)
    checks.append(("6. 64-byte UDP, highest rate with no loss, >= VXLAN's (kpps)", parts, met))

    lines = [f"### issue 7's targets, for `{default}` (pyflanneld's defaults){family}", ""]
    lines += _header(["target", "this run", "verdict"])
    for name, parts, met in checks:
        lines.append(_row([name, "; ".join(parts) or "not measured", _verdict(met)]))
    if any(met is False for _, _, met in checks):
        lines += ["", f"For a missed target, {BREAKDOWN}."]
    return lines + [""]


def memory_table(results: Results) -> list[str]:
    lines = ["### daemons' peak RSS over the whole run (VmHWM, the largest of every round's)", ""]
    lines += _header(["path", "etcd API", "sender, MiB", "receiver, MiB"])
    for path in results.paths:
        if path in results.peaks:
            peak = results.peaks[path]
            lines.append(_row([path, results.meta["paths"][path]["etcd_api"],
                               f"{peak['sender'] / 2**20:.1f}",
                               f"{peak['receiver'] / 2**20:.1f}"]))
    return lines + [""]


def daemonset_table(results: Results) -> list[str]:
    """What the DaemonSet rows' cgroups were charged and how their CPU quota held them, over
    every start of the run (a row's daemons start afresh in every round)."""
    cgroups = results.meta.get("daemonset_cgroups") or {}
    if not cgroups:
        return []
    limits = next(info["daemonset"] for info in results.meta["paths"].values()
                  if "daemonset" in info)
    lines = [f"### inside flannel's DaemonSet limits (memory {limits['memory_bytes'] // 2**20}"
             f" MiB, CPU {limits['cpu_millis']}m, each daemon in a cgroup of its own)", ""]
    lines += _header(["path", "starts", "charged at peak, MiB (sender / receiver)",
                      "of it kernel, MiB", "limit hit (failcnt)", "OOM kills",
                      "CPU periods throttled", "measurements failed"])
    for path, starts in cgroups.items():
        sides = list(zip(*starts, strict=True))  # per daemon: its usage at each start

        def peak(key: str, sides: list[tuple[dict[str, Any], ...]] = sides) -> str:
            values = [max((u[key] or 0) for u in side) for side in sides]
            return " / ".join(f"{v / 2**20:.1f}" for v in values)

        def total(key: str, sides: list[tuple[dict[str, Any], ...]] = sides) -> str:
            return " / ".join(str(sum(u[key] for u in side)) for side in sides)

        throttled = " / ".join(
            f"{100 * sum(u['nr_throttled'] for u in side) / periods:.0f} %"
            if (periods := sum(u["nr_periods"] for u in side)) else "-" for side in sides)
        errors = [s for s in results.samples if s["path"] == path and "error" in s]
        lines.append(_row([path, str(len(starts)), peak("memory_peak_bytes"),
                           peak("kernel_peak_bytes"), total("failcnt"), total("oom_kills"),
                           throttled, str(len(errors))]))
    return lines + [""]


def tables(results: Results) -> str:
    lines = targets_tables(results)
    for regime in results.regimes:
        lines += regime_tables(results, regime)
    if results.peaks:
        lines += memory_table(results)
    lines += daemonset_table(results)
    errors = [s for s in results.samples if "error" in s]
    if errors:
        lines += ["Failed measurements:", ""]
        lines += [f"- {s['regime']} {s['path']} {s['workload']} #{s['rep']}: {s['error']}"
                  for s in errors]
        lines.append("")
    return "\n".join(lines)


def _bars(ax: Any, labels: list[str], series: list[tuple[str, list[float | None]]],
          title: str, ylabel: str, log: bool = False, colors: dict[str, str] | None = None
          ) -> None:
    """Grouped bars: one group per label, one bar per series (its colour from `colors`, by
    name, when given); nothing where a value is None."""
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in range(len(labels))],
               [math.nan if v is None else v for v in values], width, label=name,
               color=(colors or {}).get(name, f"C{index}"))
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize="small")
    ax.set_title(title, fontsize="medium")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if len(series) > 1:  # below the tick labels, clear of the bars
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.32),
                  ncol=min(4, len(series)))


def chart(results: Results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths, regimes = results.paths, results.regimes
    machine = _field("machine_cpu_s_per_gb")
    latency = _field("one_way_us")
    by_regime = {regime: f"C{index}" for index, regime in enumerate(regimes)}  # same everywhere

    def per_regime(workload: str, metric: Metric, among: list[str] = regimes
                   ) -> list[tuple[str, list[float | None]]]:
        return [(regime, [results.median(regime, p, workload, metric) for p in paths])
                for regime in among
                if any(results.values(regime, p, workload, metric) for p in paths)]

    panels: list[Callable[[Any], None]] = []
    for regime in results.shaped:
        papers = [results.meta["paths"][p]["paper"] for p in paths]
        panels.append(lambda ax, regime=regime, papers=papers: _bars(
            ax, paths, [(f"{regime}, TCP 1 stream (median)",
                         [results.median(regime, p, "tcp1", _mbps) for p in paths]),
                        ("the paper's Table 1", [PAPER_MBPS.get(row) if row else None
                                                 for row in papers])],
            "the paper's Table 1 beside this run", "Mbit/s"))
    for regime in regimes:
        panels.append(lambda ax, regime=regime: _bars(
            ax, paths, [(f"TCP {n} stream{'s' if n > 1 else ''}",
                         [results.median(regime, p, f"tcp{n}", _mbps) for p in paths])
                        for n in (1, 4)], f"throughput, {regime}", "Mbit/s (median)"))
    # Shaped, a GB takes minutes and every background cost dwarfs the path's own.
    unshaped = [r for r in regimes if r not in results.shaped]
    panels.append(lambda ax: _bars(ax, paths, per_regime("tcp1", machine, unshaped),
                                   "whole machine CPU per GB, TCP 1 stream", "CPU s/GB",
                                   colors=by_regime))
    daemons = [p for p in paths if any(results.values(r, p, "tcp1",
                                                      _field("daemon_cpu_percent", index=0))
                                       for r in regimes)]
    for regime in results.shaped if daemons else []:
        def daemon_panel(ax: Any, regime: str = regime) -> None:
            _bars(ax, daemons, [(f"{role}, TCP {n}", [results.median(
                regime, p, f"tcp{n}", _field("daemon_cpu_percent", index=index))
                for p in daemons]) for n in (1, 4) for index, role in
                enumerate(("sender", "receiver"))],
                f"each daemon's CPU, {regime}", "% of one core (median)")
            ax.axhline(DAEMON_CPU_LIMIT_PERCENT, color="black", linewidth=0.8, linestyle="--")
        panels.append(daemon_panel)
    panels.append(lambda ax: _bars(ax, paths, per_regime("latency", latency),
                                   "one-way latency, unloaded", "us (median)",
                                   colors=by_regime))
    panels.append(lambda ax: _bars(ax, paths, per_regime("loaded-latency", latency),
                                   "one-way latency under a bulk TCP flow", "us (median)",
                                   log=True, colors=by_regime))
    panels.append(lambda ax: _bars(ax, paths, per_regime("udp64", _kpps),
                                   "64-byte UDP, highest rate with "
                                   f"< {results.meta['loss_limit_percent']} % lost", "kpps",
                                   colors=by_regime))
    columns = 3
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 5.5 * rows), squeeze=False)
    for ax, draw in zip(axes.flat, panels, strict=False):
        draw(ax)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _path_lines(meta: dict[str, Any]) -> list[str]:
    kernel = {"direct": "host to host on the underlay, no overlay",
              "vxlan": "the kernel's VXLAN set up by hand as flannel's vxlan backend does "
                       "(flannel.1, VNI 1, port 8472, MTU 1450), for reference",
              "host-gw": "a route to the peer's subnet via its underlay address (by hand, for "
                         "reference)",
              "vxlan-ipv6": "the kernel's VXLAN over IPv6 between the containers' IPv6 "
                            "addresses, set up by hand as flannel's vxlan backend does "
                            "(flannel-v6.1 over the hosts' IPv6 addresses, the kernel's MTU "
                            "1430), for reference",
              "host-gw-ipv6": "a route to the peer's IPv6 subnet via its underlay IPv6 address "
                              "(by hand, for reference)"}
    lines = []
    for name, info in meta["paths"].items():
        if "daemonset" in info:
            limits = info["daemonset"]
            lines.append(f"  - `{name}`: `{limits['repeats']}`'s daemons, each in a cgroup "
                         f"with memory {limits['memory_bytes'] // 2**20} MiB and CPU "
                         f"{limits['cpu_millis']}m (kube-flannel.yml's requests = limits), as "
                         "a Kubernetes node runs them; their files already in the page cache")
        elif "ipv6" in info and info["kind"] == "pyflannel":
            lines.append(f"  - `{name}`: `{info['ipv6']['repeats']}`'s daemons, between the "
                         "containers' IPv6 addresses (each packet one datagram over IPv4)")
        elif info["kind"] == "pyflannel":
            flags = " ".join(info["flags"]) or "its defaults"
            backend = info.get("backend", {}).get("Type", "udp")
            lines.append(f"  - `{name}`: pyflanneld with {flags}"
                         + (f", Backend `{json.dumps(info['backend'])}`" if backend != "udp"
                            else ""))
        elif info["kind"] == "flanneld":
            lines.append(f"  - `{name}`: {os.path.basename(meta['flanneld'])} with Backend "
                         f"`{json.dumps(info['backend'])}`, etcd v3 API")
        else:
            lines.append(f"  - `{name}`: {kernel.get(name, name)}")
    if not meta["flanneld"]:
        lines.append("  - flanneld's own udp and vxlan rows are left out: no flanneld binary "
                     "was given. `make perf FLANNELD=/path/to/flanneld` (v0.20.2, or any with "
                     "the etcd v3 API) adds them.")
    return lines


def _regime_lines(meta: dict[str, Any]) -> list[str]:
    lines = []
    for name, regime in meta["regimes"].items():
        if regime["rate"]:
            what = f"tc tbf at {regime['rate']} on each host's underlay egress (the paper's NIC)"
        elif regime["wire"]:
            what = ("underlay veths with TSO and GSO off and GRO on at both ends: 1500-byte "
                    "frames on the underlay, as on a NIC's wire")
        else:
            what = "plain veths, which carry 64 KB GSO frames: this machine's ceiling"
        skip = "" if regime["udp_search"] else "; no 64-byte search"
        lines.append(f"  - `{name}`: {what}{skip}")
    return lines


def write_report(meta: dict[str, Any], samples: list[Sample],
                 peaks: dict[str, dict[str, int]], out_dir: str) -> str:
    """Write RESULTS.md and results.png; returns the tables."""
    results = Results(meta, samples, peaks)
    body = tables(results)
    m = meta["machine"]
    before, after = meta["background_busy_percent"]
    header = "\n".join([
        "# pyflannel performance: the paper's Table 1, side by side", "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}, {meta['wall_seconds']} s",
        f"- machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, "
        f"Python {m['python']}; CPU vulnerabilities: {m['vulnerabilities']}",
        f"- background: the machine was {before} % busy before the run and {after} % after "
        "it, with nothing of the benchmark running; machine CPU figures include such load.",
        f"- {meta['reps']} repetition(s) of each measurement, as median [min-max]; lengths in "
        f"seconds: {meta['seconds']}; up to {meta['udp_rates']} rates per 64-byte search",
        "- testbed: two hosts in network namespaces on a veth underlay through a bridge, each "
        "with a container attached by the CNI bridge plugin; etcd 3.4. TCP goes from the first "
        "host's container (the sender) to the second's (the receiver). Paths:",
        *_path_lines(meta),
        "- regimes:", *_regime_lines(meta),
        "- TCP: iperf3. Machine CPU: busy time of all cores (/proc/stat, all but idle and "
        "iowait) during the transfer, per GB received, whatever ran: other load on the "
        "machine counts too. Daemons' CPU: user + system time of both daemons, per GB, and "
        "each one's as % of one core.",
        "- latency: qperf udp_lat, half the request/response round trip, its client and server "
        f"both on CPU {meta['latency_cpu']} (left to the scheduler, where the two ends landed "
        "weighed more than the path: perf/measure.py's LATENCY_CPU); under load, while one "
        "bulk iperf3 TCP flow runs between the same containers, wherever the scheduler puts it.",
        f"- 64-byte UDP: iperf3, the highest rate offered with < {meta['loss_limit_percent']} "
        "% lost (RFC 2544's search: one trial as fast as iperf3 sends, then bisection, a "
        "lossy rate tried twice); `< x` when every rate lost packets, x the lowest tried. "
        f"The receiving iperf3's socket buffer: {meta['udp_socket_buffer_bytes'] // 1024} KiB "
        "(iperf3 -w, capped by net.core.rmem_max).",
        "- peak RSS: each daemon's VmHWM, read before it is stopped; a row's daemons start "
        "afresh in every round, and the table gives the largest of their starts.",
        f"- order: each regime in turn, and in it {meta['reps']} round(s), each of which "
        "runs every path's workloads once, in the path order above and back again. Ratios "
        f"(`/ vxlan`, and the targets' `x`) are each path's sample over the `{BASELINE}` "
        "row's sample of the same round and regime (a `-ipv6` path's over "
        f"`{IPV6_BASELINE}`'s), the median over rounds (so drift of the machine between "
        "rounds cancels); the values beside them are each row's median.",
        "", "![throughput, CPU, latency and 64-byte UDP](results.png)", ""])
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
        f.write(header + "\n" + body)
    chart(results, os.path.join(out_dir, "results.png"))
    return body


def main(argv: list[str] | None = None) -> int:
    """Write RESULTS.md and results.png again from a run's results.json (the report changed,
    the measurements did not)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("dir", nargs="?", default=os.path.dirname(os.path.abspath(__file__)),
                        help="where results.json is and the report goes (default: perf/)")
    args = parser.parse_args(argv)
    with open(os.path.join(args.dir, "results.json")) as f:
        run = json.load(f)
    print(write_report(run["meta"], run["samples"], run["peak_rss_bytes"], args.dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
