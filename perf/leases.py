"""`make leases`: pyflanneld beside 10,000 leases in etcd, written there directly, with a few real
hosts among them. Reports the start-up of a daemon that joins (until it holds its lease, and
until it routes every lease), what the running daemons spend taking in the 10,000 and then
leases churning at 100 changes per second, and the fast path's TCP throughput between two real
hosts beside 10,000 leases and between two hosts of a 2-lease cluster on another etcd prefix,
alternately in the same run. Prints a Markdown table for perf/SCALE.md.

    python -m perf.leases --leases 10000 --api v3
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import sys
import time

from perf.bench import Servers, measure
from perf.paths import Endpoints
from perf.proc import machine, process_cpu_seconds, process_peak_rss_bytes
from tests.cluster import PREFIX, Flanneld, put_config, stop_all
from tests.etcd import EtcdServer
from tests.testbed import Testbed

CONFIG = {"Network": "10.0.0.0/8", "SubnetLen": 24}  # 65,536 subnets
# The fake hosts' PublicIPs: in the testbed's underlay range, never used by a namespace, and no
# packet goes to them (nothing sends into their subnets).
FAKE_HOSTS = ipaddress.IPv4Network("198.19.0.0/16")
CHURN_RATE = 100  # lease changes per second
CHURN_SECONDS = 20.0
TCP_SECONDS = 4.0
TCP_REPS = 5
FEW_PREFIX = "/few/network"

# Writes or rewrites leases through etcd's HTTP API from inside etcd's namespace, one request
# each, at most `rate` per second (0: as fast as it goes). argv: endpoint, api, prefix, how many
# subnets from the Network's second on (the first is below flannel's default SubnetMin), the
# subnet indexes to leave alone (the real hosts'), writes, rate, generation (which of two fake
# PublicIPs each lease gets).
WRITER = r"""
import base64, json, sys, time, urllib.parse, urllib.request
endpoint, api, prefix, span, skip, count, rate, generation = sys.argv[1:9]
skip = {int(i) for i in skip.split(",") if i}
indexes = [i for i in range(1, int(span) + len(skip) + 1) if i not in skip][:int(span)]
count, rate, generation = int(count), float(rate), int(generation)
def put(key, value):
    if api == "v3":
        body = json.dumps({"key": base64.b64encode(key.encode()).decode(),
                           "value": base64.b64encode(value.encode()).decode()}).encode()
        request = urllib.request.Request(endpoint + "/v3/kv/put", data=body, method="POST")
    else:
        body = urllib.parse.urlencode({"value": value}).encode()
        request = urllib.request.Request(endpoint + "/v2/keys" + key, data=body, method="PUT")
    urllib.request.urlopen(request).read()
started = time.monotonic()
for n in range(count):
    index = indexes[n % len(indexes)]
    if rate:
        time.sleep(max(0.0, started + n / rate - time.monotonic()))
    subnet = f"10.{index >> 8}.{index & 255}.0-24"
    host = 1 + (2 * index + generation) % 65000
    value = json.dumps({"PublicIP": f"198.19.{host >> 8}.{host & 255}", "PublicIPv6": None},
                       separators=(",", ":"))
    put(f"{prefix}/subnets/{subnet}", value)
"""


def write_leases(etcd: EtcdServer, api: str, span: int, skip: list[int], count: int,
                 rate: float = 0, generation: int = 0) -> float:
    """Seconds it took to write `count` leases, round `span` subnets from the Network's start
    but for those in `skip`."""
    started = time.monotonic()
    etcd.host.run(sys.executable, "-c", WRITER, etcd.endpoint, api, PREFIX, str(span),
                  ",".join(map(str, skip)), str(count), str(rate), str(generation))
    return time.monotonic() - started


def subnet_index(subnet: ipaddress.IPv4Network) -> int:
    network = ipaddress.IPv4Network(CONFIG["Network"])
    return (int(subnet.network_address) - int(network.network_address)) >> (32 - subnet.prefixlen)


def routes_logged(daemon: Flanneld) -> int:
    log = daemon.log()
    return log.count("subnet added") - log.count("subnet removed")


def wait_routes(daemon: Flanneld, count: int, timeout: float) -> float | None:
    """Seconds until the daemon has logged `count` routes, or None."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if routes_logged(daemon) >= count:
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def tcp_gbits(endpoints: Endpoints) -> float:
    sample = measure(endpoints, "tcp", TCP_SECONDS, "--streams", "1")
    if "error" in sample:
        raise RuntimeError(f"iperf3: {sample['error']}")
    return sample["bits_per_second"] / 1e9


class Pair:
    """Two real hosts with a container each, on their own etcd prefix."""

    def __init__(self, bed: Testbed, etcd: EtcdServer, api: str, prefix: str) -> None:
        put_config(etcd, api, CONFIG, prefix)
        self.daemons = [Flanneld(bed, bed.add_host(), etcd, api, "--etcd-prefix", prefix)
                        for _ in range(2)]
        for daemon in self.daemons:
            daemon.start()
            bed.add_container(daemon.host, str(daemon.wait_subnet()), 1472)
        for daemon in self.daemons:
            daemon.wait_log("subnet added")
        a, b = (daemon.host for daemon in self.daemons)
        assert a.container_netns and b.container_netns and b.container_ip
        self.endpoints = Endpoints(a.container_netns, b.container_netns, b.container_ip)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leases", type=int, default=10000)
    parser.add_argument("--api", choices=["v3", "v2"], default="v3")
    args = parser.parse_args()
    n, api = args.leases, args.api
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        daemons: list[Flanneld] = []
        servers = None
        try:
            # Two clusters on one etcd and one underlay: `few` keeps its 2 leases, `many` gets
            # the 10,000; their TCP runs alternate, so both meet the same machine.
            few = Pair(bed, etcd, api, FEW_PREFIX)
            many = Pair(bed, etcd, api, PREFIX)
            daemons += few.daemons + many.daemons
            pids = [d.process.pid for d in many.daemons if d.process]
            cpu = {pid: process_cpu_seconds(pid) for pid in pids}
            # The fake leases fill the Network from its start, as a cluster grows, around the
            # real hosts' subnets: a joining host must look past all of them.
            real = [subnet_index(d.wait_subnet()) for d in many.daemons]
            written = write_leases(etcd, api, n, real, n)
            absorbed = [wait_routes(d, n + 1, 300) for d in many.daemons]
            absorb_cpu = [process_cpu_seconds(pid) - cpu[pid] for pid in pids]
            print(f"{n} leases written in {written:.1f} s; routed after {absorbed}", flush=True)

            joined = Flanneld(bed, bed.add_host(), etcd, api)
            daemons.append(joined)
            start = time.monotonic()
            joined.start()
            joined.wait_subnet(timeout=120)
            leased = time.monotonic() - start
            routed = wait_routes(joined, n + 2, 300)
            routed = None if routed is None else routed + leased
            print(f"a joining daemon: lease after {leased:.2f} s, every route after {routed}",
                  flush=True)

            pids = [d.process.pid for d in [*many.daemons, joined] if d.process]
            cpu = {pid: process_cpu_seconds(pid) for pid in pids}
            churn_count = int(CHURN_RATE * CHURN_SECONDS)
            churn_started = time.monotonic()
            write_leases(etcd, api, n, real, churn_count, CHURN_RATE, generation=1)
            churn_seconds = time.monotonic() - churn_started
            time.sleep(1)  # the last changes reach the daemons
            churn_cpu = [100 * (process_cpu_seconds(pid) - cpu[pid]) / churn_seconds
                         for pid in pids]
            changed = [d.log().count("subnet changed") for d in [*many.daemons, joined]]
            print(f"churn: {churn_count} changes in {churn_seconds:.1f} s; CPU {churn_cpu}; "
                  f"changes applied {changed}", flush=True)

            servers = Servers([pair.endpoints.server_netns for pair in (few, many)])
            for pair in (few, many):  # warm-up: a fresh testbed's first transfers run slower
                tcp_gbits(pair.endpoints)
            tcp: dict[str, list[float]] = {"few": [], "many": []}
            for _ in range(TCP_REPS):
                tcp["few"].append(tcp_gbits(few.endpoints))
                tcp["many"].append(tcp_gbits(many.endpoints))
            print(f"TCP: {tcp}", flush=True)
            rss = [process_peak_rss_bytes(pid) / (1 << 20) for pid in pids]
        finally:
            if servers is not None:
                servers.close()
            stop_all(daemons)
            etcd.stop()
    few_median, many_median = statistics.median(tcp["few"]), statistics.median(tcp["many"])
    rows = [
        ("leases written directly into etcd", f"{n} (in {written:.1f} s)"),
        ("running daemons: every one routed, after the last was written",
         " / ".join(f"{s:.1f} s" if s is not None else "not within 300 s" for s in absorbed)),
        ("running daemons: CPU spent taking them in",
         " / ".join(f"{s:.2f} s" for s in absorb_cpu)),
        ("a daemon joining: lease held after", f"{leased:.2f} s"),
        ("a daemon joining: every lease routed after",
         f"{routed:.2f} s" if routed is not None else "not within 300 s"),
        (f"churn, {CHURN_RATE} changes/s for {CHURN_SECONDS:.0f} s: CPU % of a core per daemon",
         " / ".join(f"{c:.1f}" for c in churn_cpu)),
        ("churn: changes each daemon applied", " / ".join(str(c) for c in changed)
         + f" (of {churn_count})"),
        ("peak RSS per daemon, MiB", " / ".join(f"{r:.1f}" for r in rss)),
        (f"TCP, 1 stream, 2 leases (median of {TCP_REPS})", f"{few_median:.2f} Gbit/s"),
        (f"TCP, 1 stream, {n + 3} leases (median of {TCP_REPS}, alternating with the above)",
         f"{many_median:.2f} Gbit/s ({many_median / few_median:.2f}x)"),
    ]
    m = machine()
    print(f"\n- command: `python -m perf.leases --leases {n} --api {api}`\n- date: {started_at}\n"
          f"- machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}\n"
          f"- config: `{json.dumps(CONFIG)}`, etcd {api} API, pyflanneld's defaults (udp "
          f"backend); TCP between containers of two real hosts on a veth underlay\n")
    print("| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0 if routed is not None and all(s is not None for s in absorbed) else 1


if __name__ == "__main__":
    sys.exit(main())
