"""`make scale`: N pyflanneld hosts (namespaces on one underlay, one etcd) started at the same
moment. Reports how long until every host held a lease and until every host routed every other,
whether any subnet was handed out twice, and at steady state each daemon's CPU and RSS and
etcd's request rate. Prints a Markdown table for perf/SCALE.md.

    python -m perf.scale --hosts 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from perf.proc import (
    machine,
    machine_available_bytes,
    process_cpu_seconds,
    process_peak_rss_bytes,
    process_pss_bytes,
)
from tests.cluster import PREFIX, Flanneld, put_config, stop_all
from tests.etcd import EtcdServer
from tests.testbed import LARGE_UNDERLAY, UNDERLAY, Testbed

CONFIG = {"Network": "10.0.0.0/12", "SubnetLen": 24}  # 4095 subnets
STEADY_SECONDS = 10.0


def etcd_requests(etcd: EtcdServer) -> float:
    """gRPC requests etcd has started handling, from its own metrics (read in its host)."""
    out = etcd.host.run(sys.executable, "-c",
                        "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                        f"'{etcd.endpoint}/metrics').read().decode())").stdout
    return sum(float(line.rsplit(" ", 1)[1]) for line in out.splitlines()
               if line.startswith("grpc_server_started_total"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    n = args.hosts
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    available_before = machine_available_bytes()
    with Testbed(underlay=UNDERLAY if n < UNDERLAY.num_addresses - 4 else LARGE_UNDERLAY) as bed:
        etcd = EtcdServer(bed)
        daemons: list[Flanneld] = []
        try:
            put_config(etcd, "v3", CONFIG)
            made = time.monotonic()
            hosts = [bed.add_host() for _ in range(n)]
            print(f"{n} hosts made in {time.monotonic() - made:.1f} s", flush=True)
            daemons = [Flanneld(bed, host, etcd, "v3") for host in hosts]
            start = time.monotonic()
            for daemon in daemons:
                daemon.start()
            leased: dict[int, float] = {}
            routed: dict[int, float] = {}
            while len(routed) < n and time.monotonic() - start < args.timeout:
                for i, daemon in enumerate(daemons):
                    if i not in leased and os.path.exists(daemon.subnet_file):
                        leased[i] = time.monotonic() - start
                    if i not in routed and daemon.log().count("subnet added") >= n - 1:
                        routed[i] = time.monotonic() - start
                time.sleep(0.5)
            subnets = [daemon.wait_subnet(timeout=1) for daemon in daemons if os.path.exists(
                daemon.subnet_file)]
            pids = [d.process.pid for d in daemons if d.process and d.process.poll() is None]
            cpu_before = {pid: process_cpu_seconds(pid) for pid in pids}
            requests_before = etcd_requests(etcd)
            time.sleep(STEADY_SECONDS)
            cpu = [100 * (process_cpu_seconds(pid) - cpu_before[pid]) / STEADY_SECONDS
                   for pid in pids]
            request_rate = (etcd_requests(etcd) - requests_before) / STEADY_SECONDS
            rss = [process_peak_rss_bytes(pid) / (1 << 20) for pid in pids]
            pss = [process_pss_bytes(pid) / (1 << 20) for pid in pids]
            used = (available_before - machine_available_bytes()) / (1 << 30)
            leases = etcd.get_prefix(f"{PREFIX}/subnets/", "v3")
        finally:
            stop_all(daemons)
            etcd.stop()
    rows = [
        ("hosts started at once", f"{n}"),
        ("daemons running at the end", f"{len(pids)}"),
        ("leases in etcd / distinct subnets written", f"{len(leases)} / {len(set(subnets))}"),
        ("duplicate subnets", f"{len(subnets) - len(set(subnets))}"),
        ("every host held a lease after", f"{max(leased.values()):.1f} s"
         if len(leased) == n else f"only {len(leased)} within {args.timeout:.0f} s"),
        ("every host routed every other after", f"{max(routed.values()):.1f} s"
         if len(routed) == n else f"only {len(routed)} within {args.timeout:.0f} s"),
        ("median host routed every other after", f"{statistics.median(routed.values()):.1f} s"
         if routed else "-"),
        ("steady state, per daemon: CPU % of a core (median / max)",
         f"{statistics.median(cpu):.2f} / {max(cpu):.2f}"),
        ("per daemon: peak RSS MiB (median / max)",
         f"{statistics.median(rss):.1f} / {max(rss):.1f}"),
        ("per daemon: PSS MiB, shared pages counted once (median / max)",
         f"{statistics.median(pss):.1f} / {max(pss):.1f}"),
        ("machine memory taken by the whole run (hosts, daemons, etcd), GiB", f"{used:.1f}"),
        ("steady state: etcd gRPC requests per second", f"{request_rate:.1f}"),
    ]
    m = machine()
    print(f"\n- command: `python -m perf.scale --hosts {n}`\n- date: {started_at}\n"
          f"- machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}\n"
          f"- config: `{json.dumps(CONFIG)}`, etcd v3 API, pyflanneld's defaults\n")
    print("| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0 if len(routed) == n and len(set(subnets)) == len(subnets) == n else 1


if __name__ == "__main__":
    sys.exit(main())
