"""The benchmark's table (stdout and RESULTS.md) and chart (results.png) from its samples."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from typing import Any

# The paper's Table 1 (flannel v0.7.0, two hosts on a 100 Mbit NIC, iperf TCP), Mbit/s; its udp
# row is flanneld's udp backend, the row pyflannel replaces.
PAPER_MBPS = {"direct": 94.3, "pyflannel": 92.7, "vxlan": 91.2, "host-gw": 94.3}
# flanneld v0.20.2's udp backend measured on this kind of machine (../shared/flannel-compat.md),
# not in this run: no flanneld binary can be installed here.
FLANNELD_UNSHAPED = "TCP 1 stream 360 Mbit/s, 64 B UDP 27 kpps (64 % lost), 132 us one way"

Sample = dict[str, Any]


def _values(samples: list[Sample], regime: str, path: str, workload: str,
            metric: Callable[[Sample], float]) -> list[float]:
    return [metric(s) for s in samples if (s["regime"], s["path"], s["workload"]) ==
            (regime, path, workload) and "error" not in s]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _cell(values: list[float], digits: int = 1) -> str:
    """median [min-max], or the single value, or - when nothing was measured."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-" \
           f"{max(values):.{digits}f}]"


def _ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}"


def table(samples: list[Sample]) -> str:
    paths = list(dict.fromkeys(s["path"] for s in samples))
    regimes = list(dict.fromkeys(s["regime"] for s in samples))
    mbps = lambda s: s["bits_per_second"] / 1e6  # noqa: E731
    kpps = lambda s: s["packets_per_second"] / 1e3  # noqa: E731
    lines = []
    for regime in regimes:
        lines += [f"### {regime}", "",
                  "| path | TCP 1 stream, Mbit/s | / direct | / vxlan | TCP 4 streams, Mbit/s "
                  "| / direct | / vxlan | UDP 64 B, kpps received | lost % | one way, us "
                  "| pyflanneld CPU s/GB | RSS MB | paper, Mbit/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        base = {w: {p: _median(_values(samples, regime, p, w, mbps)) for p in ("direct", "vxlan")}
                for w in ("tcp1", "tcp4")}
        for path in paths:
            row = [path]
            for workload in ("tcp1", "tcp4"):
                values = _values(samples, regime, path, workload, mbps)
                median = _median(values)
                row += [_cell(values), _ratio(median, base[workload]["direct"]),
                        _ratio(median, base[workload]["vxlan"])]
            row += [_cell(_values(samples, regime, path, "udp64", kpps)),
                    _cell(_values(samples, regime, path, "udp64", lambda s: s["lost_percent"])),
                    _cell(_values(samples, regime, path, "latency", lambda s: s["one_way_us"])),
                    _cell([s["cpu_seconds_per_gb"] for s in samples if s["regime"] == regime
                           and s["path"] == path and "cpu_seconds_per_gb" in s], 2),
                    _cell([s["rss_bytes"] / 2**20 for s in samples if s["regime"] == regime
                           and s["path"] == path and "rss_bytes" in s], 0),
                    f"{PAPER_MBPS[path]}" if regime.startswith("shaped") and path in PAPER_MBPS
                    else ""]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    errors = [s for s in samples if "error" in s]
    if errors:
        lines += ["Failed measurements:", ""]
        lines += [f"- {s['regime']} {s['path']} {s['workload']} #{s['rep']}: {s['error']}"
                  for s in errors]
        lines.append("")
    return "\n".join(lines)


def chart(samples: list[Sample], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = list(dict.fromkeys(s["path"] for s in samples))
    regimes = list(dict.fromkeys(s["regime"] for s in samples))
    mbps = lambda s: s["bits_per_second"] / 1e6  # noqa: E731
    fig, axes = plt.subplots(1, len(regimes) + 1, figsize=(5 * (len(regimes) + 1), 5))
    width = 0.4
    for ax, regime in zip(axes, regimes, strict=False):
        for offset, workload in ((-width / 2, "tcp1"), (width / 2, "tcp4")):
            medians = [_median(_values(samples, regime, p, workload, mbps)) or 0 for p in paths]
            ax.bar([i + offset for i in range(len(paths))], medians, width,
                   label="TCP 1 stream" if workload == "tcp1" else "TCP 4 streams")
        ax.set_xticks(range(len(paths)), paths, rotation=30, ha="right")
        ax.set_ylabel("Mbit/s (median)")
        ax.set_title(f"throughput, {regime}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize="small")
    ax = axes[-1]
    pyflannel = [p for p in paths if p.startswith("pyflannel")]
    for index, regime in enumerate(regimes):
        values = [_median([s["cpu_seconds_per_gb"] for s in samples if s["regime"] == regime
                           and s["path"] == p and "cpu_seconds_per_gb" in s]) or 0
                  for p in pyflannel]
        ax.bar([i + (index - 0.5) * width for i in range(len(pyflannel))], values, width,
               label=regime)
    ax.set_xticks(range(len(pyflannel)), pyflannel)
    ax.set_ylabel("CPU seconds per GB, both pyflanneld")
    ax.set_title("pyflanneld CPU (TCP runs)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(meta: dict[str, Any], samples: list[Sample], out_dir: str) -> str:
    """Write RESULTS.md and results.png; returns the table."""
    body = table(samples)
    m = meta["machine"]
    header = "\n".join([
        "# pyflannel performance: the paper's Table 1, side by side", "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}, {meta['wall_seconds']} s",
        f"- machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, "
        f"Python {m['python']}",
        f"- {meta['reps']} repetition(s) of each measurement, as median [min-max]; "
        f"measurement lengths in seconds: {meta['seconds']}",
        "- testbed: two hosts in network namespaces on a veth underlay through a bridge, each "
        "with a container attached by the CNI bridge plugin; etcd v3. Paths: `direct` host to "
        "host on the underlay; `pyflannel` container to container through pyflanneld with its "
        "defaults (vectors of 64 packets, TUN offloads with UDP GSO/GRO); `pyflannel-batch1` "
        "the same with --fastpath-batch 1 --fastpath-offload=false (one read, one send per "
        "packet: the shape of flanneld's C proxy); `vxlan` the kernel's VXLAN set up as "
        "flannel's vxlan backend does; `host-gw` a route via the peer's underlay address.",
        f"- regimes: `shaped-100mbit` tc tbf at {meta['shaped_rate']} on each host's underlay "
        "egress (the paper's 100 Mbit NIC), `unshaped` this machine's ceiling.",
        "- UDP: 64-byte payloads offered at 2 Gbit/s by iperf3; latency: qperf udp_lat, half "
        "the request/response round trip. CPU: user + system seconds of both pyflanneld "
        "processes during the TCP runs, per GB received; RSS: the larger of the two.",
        f"- for reference, not measured in this run: flanneld v0.20.2's udp backend, unshaped, "
        f"on this kind of machine: {FLANNELD_UNSHAPED} (../shared/flannel-compat.md).",
        "", "![throughput and CPU](results.png)", ""])
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
        f.write(header + "\n" + body)
    chart(samples, os.path.join(out_dir, "results.png"))
    return body
