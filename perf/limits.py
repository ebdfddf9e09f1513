"""Inside flannel's DaemonSet limits: each daemon in a cgroup of `memory: 50Mi` and `cpu: 100m`
(requests = limits, as kube-flannel.yml gives flanneld; tests/limits.py makes the cgroups), TCP
with 1 and 4 streams between two hosts' containers (iperf3, as `make perf` runs it) in the
`unshaped` and `wire` regimes (perf/underlay.py), for pyflannel (udp, its defaults),
pyflannel-vxlan and, given a binary, flanneld v0.20.2's udp and vxlan backends. Each row runs
within the limits from its usual files (`daemonset`: already in the page cache, so only its
anonymous and kernel memory is charged to it), within the limits from a copy none of whose pages
are cached (`daemonset-cold`: a node's first start, its file pages charged to it too), and
without limits in the same kind of cgroup (`unlimited`) to compare with.

Reported: throughput; the CPU each daemon's cgroup used and how often its quota ran out; the
memory it was charged at its peak (and of that, kernel objects: BPF maps, slabs, page tables),
failcnt, major faults and OOM kills; whether each daemon still runs and holds its lease; and
what the kernel path's `whole_peers` map costs at 65536 entries and at 8192. The limits
`daemonset-cold-8192` (not run by default) stand for the 50Mi limit with whole_peers at 8192:
the limit raised by the difference measured.

    .venv/bin/python -m perf.limits --out /tmp/limits.json    # 3 x 5 s a cell: about 15 minutes
    .venv/bin/python -m perf.limits --rows pyflannel --limits daemonset --reps 1 --seconds 2

Every row gets a fresh testbed (hosts, etcd, containers, cgroups), deleted afterwards.

`make perf` repeats its own rows within the same limits (perf/paths.py's DAEMONSET_ROWS), warm
only, through the same tests/limits.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from perf.bench import IPERF_PORT, Servers, measure
from perf.paths import FLANNELD_ROWS, SETTLE_SECONDS, VXLAN_DEVICE, Endpoints
from perf.proc import machine, process_peak_rss_bytes
from perf.underlay import REGIMES, Underlay
from tests.cluster import FIGURE_2_CONFIG, PREFIX, Flanneld, key_of, put_config, stop_all
from tests.etcd import EtcdServer
from tests.flanneld import REFERENCE_FLANNELD, RealFlanneld, wait_reachable
from tests.limits import (
    DAEMONSET_CPU_MILLIS,
    DAEMONSET_MEMORY_BYTES,
    ColdCopy,
    DaemonLimits,
    Limited,
    MiB,
    Usage,
    bpf_maps,
)
from tests.testbed import Host, Testbed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Row:
    kind: str  # pyflannel or flanneld
    backend: dict[str, Any]


ROWS = {
    "pyflannel": Row("pyflannel", FIGURE_2_CONFIG["Backend"]),  # udp, pyflanneld's defaults
    "pyflannel-vxlan": Row("pyflannel", {"Type": "vxlan"}),
    "flanneld-udp": Row("flanneld", FLANNELD_ROWS["flanneld-udp"]),
    "flanneld-vxlan": Row("flanneld", FLANNELD_ROWS["flanneld-vxlan"]),
}


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None  # None: unlimited
    cpu_millis: int | None
    # Run from a copy of the daemon's files that nothing has read (tests/limits.py's ColdCopy),
    # as on a node's first start of the Pod: its file pages are charged to it too. Otherwise
    # from the usual files, which earlier runs left in the page cache, charged elsewhere.
    cold: bool = False
    # The memory limit raised by what whole_peers would give back at 8192 entries (measured by
    # whole_peers_cost at the start of the run): a preallocated map's size is a fixed charge,
    # so this stands for the 50Mi limit with the smaller map.
    whole_peers_8192: bool = False


LIMITS = {
    "daemonset": Limits(DAEMONSET_MEMORY_BYTES, DAEMONSET_CPU_MILLIS),
    "daemonset-cold": Limits(DAEMONSET_MEMORY_BYTES, DAEMONSET_CPU_MILLIS, cold=True),
    "unlimited": Limits(None, None),
    # Not run by default: pass --limits daemonset-cold-8192 --rows pyflannel.
    "daemonset-cold-8192": Limits(DAEMONSET_MEMORY_BYTES, DAEMONSET_CPU_MILLIS, cold=True,
                                  whole_peers_8192=True),
}
DEFAULT_LIMITS = ["daemonset", "daemonset-cold", "unlimited"]
DEFAULT_REGIMES = ["unshaped", "wire"]
DEFAULT_STREAMS = [1, 4]
START_TIMEOUT = 60.0  # pyflanneld's start takes ~4 s at 100m
FLANNELD_RESTARTS = 3  # flanneld v0.20.2 can miss the other host's lease (tests/flanneld.py)
# fastpath/udp_tc.bpf.c's whole_peers: an LRU hash of a PublicIP (4 bytes) to struct peer
# (eight __u64), 65536 entries; 8192 would cover Kubernetes' 5000 nodes.
WHOLE_PEERS_KEY, WHOLE_PEERS_VALUE = 4, 64
WHOLE_PEERS_ENTRIES = [65536, 8192]
BPF_MAP_TYPE_LRU_HASH = 9


# Makes one map in a fresh process and hands back its memlock (/proc/self/fdinfo).
MAKE_MAP = """import ctypes, re, sys
lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
lib.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                               ctypes.c_uint32, ctypes.c_void_p]
print("ready", flush=True)
sys.stdin.readline()
fd = lib.bpf_map_create(int(sys.argv[1]), b"whole_peers", int(sys.argv[2]), int(sys.argv[3]),
                        int(sys.argv[4]), None)
if fd < 0:
    sys.exit(f"bpf_map_create: {fd}")
with open(f"/proc/self/fdinfo/{fd}") as f:
    print(re.search(r"memlock:\\s*(\\d+)", f.read()).group(1), flush=True)
sys.stdin.readline()
"""


def whole_peers_cost(entries: int) -> dict[str, int]:
    """What a map shaped like whole_peers with `entries` entries costs: bytes_memlock, and what
    its cgroup was charged when it was made (the creator's process in a cgroup of its own)."""
    with Limited(f"map{entries}", None, None) as cgroup:
        process = subprocess.Popen(
            [sys.executable, "-c", MAKE_MAP, str(BPF_MAP_TYPE_LRU_HASH), str(WHOLE_PEERS_KEY),
             str(WHOLE_PEERS_VALUE), str(entries)], preexec_fn=cgroup.preexec,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert process.stdin is not None and process.stdout is not None
        try:
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("the map maker did not start")
            before = cgroup.usage()
            process.stdin.write("\n")
            process.stdin.flush()
            memlock = process.stdout.readline().strip()
            if not memlock.isdigit():
                raise RuntimeError(f"the map maker failed: {memlock!r}")
            after = cgroup.usage()
            process.stdin.write("\n")
            process.stdin.flush()
        finally:
            process.communicate(timeout=30)
    return {"entries": entries, "bytes_memlock": int(memlock),
            "charged_bytes": after.memory_bytes - before.memory_bytes,
            "kernel_charged_bytes": (after.kernel_bytes or 0) - (before.kernel_bytes or 0)}


def start_daemons(row: Row, bed: Testbed, etcd: EtcdServer, hosts: list[Host],
                  limits: DaemonLimits, flanneld: str, copies: list[ColdCopy] | None = None
                  ) -> list[Flanneld | RealFlanneld]:
    """The row's daemon on each host inside its cgroup, a container on each subnet, until
    the containers reach each other. pyflanneld's start together; flanneld's one after the
    other, the first restarted if it missed the second's lease (tests/flanneld.py). copies:
    one cold copy per host to run the daemon from (the first restart of flanneld finds it
    warm)."""
    put_config(etcd, "v3", {**FIGURE_2_CONFIG, "Backend": row.backend})
    daemons: list[Flanneld | RealFlanneld] = []
    try:
        for index, host in enumerate(hosts):
            copy = copies[index] if copies else None
            daemon: Flanneld | RealFlanneld = (
                Flanneld(bed, host, etcd, "v3", program=copy.program if copy else None,
                         environ=copy.environ if copy else None)
                if row.kind == "pyflannel"
                else RealFlanneld(copy.program[0] if copy else flanneld, bed, host, etcd))
            daemon.command = limits.command(host.netns, daemon.command)
            daemons.append(daemon)
            daemon.start()
            if row.kind == "flanneld":
                daemon.wait_subnet(START_TIMEOUT)
        for daemon in daemons:
            subnet = daemon.wait_subnet(START_TIMEOUT)
            bed.add_container(daemon.host, str(subnet), int(daemon.subnet_env()["FLANNEL_MTU"]))
        for daemon in daemons:
            if isinstance(daemon, Flanneld):
                daemon.wait_log("subnet added", START_TIMEOUT)
        first = daemons[0]
        for _ in range(FLANNELD_RESTARTS):
            if wait_reachable(hosts[0], hosts[1]):
                return daemons
            if not isinstance(first, RealFlanneld):
                break
            print(f"{first.host.netns}: flanneld missed the other host's lease; restarting it",
                  flush=True)
            first.stop()
            first.start().wait_subnet(START_TIMEOUT)
        raise RuntimeError("the containers do not reach each other:\n" + "".join(
            f"--- {d.log_path}:\n{d.log()[-2000:]}\n" for d in daemons))
    except BaseException:
        stop_daemons(daemons, row)
        raise


def stop_daemons(daemons: list[Flanneld | RealFlanneld], row: Row) -> None:
    stop_all([d for d in daemons if isinstance(d, Flanneld)])
    for daemon in daemons:
        if isinstance(daemon, RealFlanneld):
            daemon.stop()
            daemon.clean(VXLAN_DEVICE if row.backend["Type"] == "vxlan" else None)


def rss_file_bytes(pid: int) -> int:
    """The file pages a process has mapped (RssFile): charged to the cgroup that read them
    first, so to a daemon's only where its binary and libraries were not in the page cache."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RssFile in /proc/{pid}/status")


def lease_held(etcd: EtcdServer, daemon: Flanneld | RealFlanneld) -> bool:
    """The host's lease is in etcd with its PublicIP."""
    subnet = daemon.wait_subnet(1)
    value = etcd.get_prefix(f"{PREFIX}/subnets/", "v3").get(key_of(subnet, PREFIX), "")
    return f'"PublicIP":"{daemon.host.underlay_ip}"' in value


def run_row(name: str, limit: str, regimes: list[str], streams: list[int], seconds: float,
            reps: int, flanneld: str, whole_peers_saving: int = 0) -> dict[str, Any]:
    """One row with one set of limits on a fresh testbed: its samples and the cgroups'
    usage. whole_peers_saving: what whole_peers at 8192 entries would give back, in bytes."""
    row = ROWS[name]
    memory = LIMITS[limit].memory_bytes
    if memory is not None and LIMITS[limit].whole_peers_8192:
        memory += whole_peers_saving
    result: dict[str, Any] = {"row": name, "limits": limit, "memory_limit_bytes": memory,
                              "backend": row.backend, "samples": [],
                              "loadavg_before": os.getloadavg()}
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        limits = DaemonLimits(memory, LIMITS[limit].cpu_millis)
        daemons: list[Flanneld | RealFlanneld] = []
        copies: list[ColdCopy] = []
        servers: Servers | None = None
        underlay: Underlay | None = None
        try:
            hosts = [bed.add_host(), bed.add_host()]
            if LIMITS[limit].cold:
                for _ in hosts:
                    copies.append(ColdCopy(row.kind, flanneld))
            began = time.monotonic()
            daemons = start_daemons(row, bed, etcd, hosts, limits, flanneld, copies)
            result["start_seconds"] = time.monotonic() - began
            client, server = hosts
            assert client.container_netns and server.container_netns and server.container_ip
            endpoints = Endpoints(client.container_netns, server.container_netns,
                                  server.container_ip)
            servers = Servers([server.container_netns])
            underlay = Underlay(hosts, bed.underlay)
            pids = ",".join(str(d.process.pid) for d in daemons if d.process is not None)
            for regime in regimes:
                underlay.enter(REGIMES[regime])
                time.sleep(SETTLE_SECONDS)
                for count in streams:
                    for rep in range(reps):
                        before = [limits.usage(host.netns) for host in hosts]
                        sample = measure(endpoints, "tcp", seconds, "--streams", str(count),
                                         "--daemon-pids", pids)
                        after = [limits.usage(host.netns) for host in hosts]
                        sample.update(regime=regime, streams=count, rep=rep,
                                      **cgroup_deltas(before, after, sample.get("seconds")))
                        result["samples"].append(sample)
                        print(f"{name} [{limit}] {regime} TCP x{count}: {describe(sample)}",
                              flush=True)
            result["alive"] = [d.process is not None and d.process.poll() is None
                               for d in daemons]
            result["lease_held"] = [lease_held(etcd, d) for d in daemons]
            result["peak_rss_bytes"] = [process_peak_rss_bytes(d.process.pid)
                                        for d in daemons if d.process is not None]
            result["rss_file_bytes"] = [rss_file_bytes(d.process.pid)
                                        for d in daemons if d.process is not None]
            if row.kind == "pyflannel" and row.backend["Type"] == "udp":
                assert daemons[0].process is not None
                result["bpf_maps"] = [asdict(m) for m in bpf_maps(daemons[0].process.pid)]
            result["loadavg_after"] = os.getloadavg()
            # While they still run (after they exit only the cumulative figures remain).
            result["usage"] = [limits.usage(host.netns).as_dict() for host in hosts]
        except Exception as error:  # noqa: BLE001 - the row's failure is a result too
            result["error"] = f"{type(error).__name__}: {error}"[-3000:]
            print(f"{name} [{limit}]: {result['error']}", flush=True)
        finally:
            try:
                if servers is not None:
                    servers.close()
                if underlay is not None:
                    underlay.leave()
                stop_daemons(daemons, row)
                exited = [limits.release(host.netns).as_dict()
                          for host in list(bed.hosts) if host.netns in limits.cgroups]
                result.setdefault("usage", exited)
                # An OOM kill or a hit of the limit while they stopped counts too.
                for running, final in zip(result["usage"], exited, strict=True):
                    for key in ("memory_peak_bytes", "kernel_peak_bytes", "failcnt",
                                "oom_kills"):
                        running[key] = final[key]
            finally:
                limits.close()
                etcd.stop()
                for copy in copies:
                    copy.close()
    return result


def cgroup_deltas(before: list[Usage], after: list[Usage], seconds: float | None
                  ) -> dict[str, Any]:
    """What each daemon's cgroup (sender's first) spent during one sample: CPU (as a share of
    one core over the transfer), periods and throttled periods, throttled time."""
    span = seconds or 1.0
    return {
        "cgroup_cpu_percent": [100 * (a.cpu_seconds - b.cpu_seconds) / span
                               for b, a in zip(before, after, strict=True)],
        "periods": [a.nr_periods - b.nr_periods for b, a in zip(before, after, strict=True)],
        "throttled_periods": [a.nr_throttled - b.nr_throttled
                              for b, a in zip(before, after, strict=True)],
        "throttled_seconds": [a.throttled_seconds - b.throttled_seconds
                              for b, a in zip(before, after, strict=True)],
        "oom_kills": [a.oom_kills for a in after],
    }


def describe(sample: dict[str, Any]) -> str:
    if "error" in sample:
        return f"error: {sample['error']}"
    cpu = "/".join(f"{p:.1f}" for p in sample["cgroup_cpu_percent"])
    throttled = " and ".join(f"{t} of {p}" for t, p in zip(sample["throttled_periods"],
                                                            sample["periods"], strict=True))
    return (f"{sample['bits_per_second'] / 1e6:.1f} Mbit/s, daemons {cpu} % of a core, "
            f"throttled {throttled} periods")


def median_of(samples: list[dict[str, Any]], regime: str, streams: int, key: str
              ) -> float | None:
    values = [s[key] for s in samples
              if s.get("regime") == regime and s.get("streams") == streams and key in s]
    return statistics.median(values) if values else None


def throttled_share(samples: list[dict[str, Any]]) -> str:
    """Over all the row's samples: throttled periods of all periods, each daemon."""
    good = [s for s in samples if "periods" in s]
    if not good:
        return "—"
    shares = []
    for index in range(len(good[0]["periods"])):
        periods = sum(s["periods"][index] for s in good)
        throttled = sum(s["throttled_periods"][index] for s in good)
        shares.append(f"{100 * throttled / periods:.0f} %" if periods else "—")
    return " / ".join(shares)


def mib(value: float | None) -> str:
    return "—" if value is None else f"{value / MiB:.1f}"


def tables(results: dict[str, Any]) -> str:
    """Markdown: throughput and CPU; memory, OOM kills, leases; the whole_peers map's cost."""
    regimes, streams = results["regimes"], results["streams"]
    columns = [(regime, count) for regime in regimes for count in streams]
    head = ["row", "limits", *[f"{r} TCP {n}, Mbit/s" for r, n in columns],
            "daemon CPU, % of a core (sender / receiver)", "periods throttled"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in results["rows"]:
        samples = row["samples"]
        rates = [median_of(samples, r, n, "bits_per_second") for r, n in columns]
        cpu = max((s for s in samples if "cgroup_cpu_percent" in s),
                  key=lambda s: sum(s["cgroup_cpu_percent"]), default=None)
        cpu_text = ("—" if cpu is None else " / ".join(
            f"{p:.1f}" for p in cpu["cgroup_cpu_percent"]) + f" ({cpu['regime']} "
            f"TCP {cpu['streams']})")
        lines.append("| " + " | ".join([
            f"`{row['row']}`", row["limits"],
            *("—" if r is None else f"{r / 1e6:.1f}" for r in rates), cpu_text,
            throttled_share(samples)]) + " |")
    head = ["row", "limits", "peak charged, MiB", "of it kernel, MiB", "anon at the end, MiB",
            "peak RSS (VmHWM), MiB", "mapped files at the end (RssFile), MiB", "failcnt",
            "major faults", "OOM kills", "running, lease held"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in results["rows"]:
        usage = row.get("usage", [])

        def each(key: str, form: Any, usage: list[dict[str, Any]] = usage) -> str:
            return " / ".join(form(u.get(key)) for u in usage) or "—"

        anon = " / ".join(mib(u["stat"].get("rss", u["stat"].get("anon"))) for u in usage)
        held = "—" if "alive" not in row else " / ".join(
            "yes" if alive and lease else "NO" for alive, lease in
            zip(row["alive"], row["lease_held"], strict=True))
        lines.append("| " + " | ".join([
            f"`{row['row']}`", row["limits"], each("memory_peak_bytes", mib),
            each("kernel_peak_bytes", mib), anon or "—",
            " / ".join(mib(b) for b in row.get("peak_rss_bytes", [])) or "—",
            " / ".join(mib(b) for b in row.get("rss_file_bytes", [])) or "—",
            each("failcnt", str),
            " / ".join(str(u["stat"].get("pgmajfault", "—")) for u in usage) or "—",
            each("oom_kills", str),
            held + (f" (error: {row['error'][:120]})" if "error" in row else "")]) + " |")
    maps = next((row["bpf_maps"] for row in results["rows"] if row.get("bpf_maps")), None)
    if maps:
        total = sum(m["bytes_memlock"] for m in maps)
        lines += ["", "pyflanneld's BPF maps (udp, Network 10.0.0.0/8 in /20s), bytes_memlock: "
                  + ", ".join(f"`{m['name']}` {m['bytes_memlock'] / 1024:.0f} KiB ("
                              f"{m['max_entries']} entries)" for m in maps)
                  + f"; {total / MiB:.2f} MiB in all."]
    costs = results.get("whole_peers", [])
    if costs:
        lines += ["", "| `whole_peers` entries | bytes_memlock, MiB | charged to the creator's "
                  "cgroup, MiB |", "| --- | --- | --- |"]
        lines += [f"| {c['entries']} | {c['bytes_memlock'] / MiB:.2f} | "
                  f"{c['charged_bytes'] / MiB:.2f} |" for c in costs]
    return "\n".join(lines)


def git(*args: str) -> str:
    """A read-only git command in the checkout (nothing written, not even the index)."""
    return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="limits.json", help="the results as JSON")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--limits", default=",".join(DEFAULT_LIMITS),
                        help=f"comma-separated, of {', '.join(LIMITS)}")
    parser.add_argument("--regimes", default=",".join(DEFAULT_REGIMES))
    parser.add_argument("--streams", default=",".join(map(str, DEFAULT_STREAMS)))
    parser.add_argument("--seconds", type=float, default=5.0, help="one TCP trial's length")
    parser.add_argument("--reps", type=int, default=3,
                        help="trials of each workload (the table shows their median)")
    parser.add_argument("--flanneld", default=REFERENCE_FLANNELD if os.path.exists(
        REFERENCE_FLANNELD) else "", help="flanneld's binary ('': leave its rows out)")
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    for row in rows:
        if row not in ROWS:
            parser.error(f"unknown row {row}")
    if not args.flanneld:
        rows = [r for r in rows if ROWS[r].kind != "flanneld"]
    regimes = [r for r in args.regimes.split(",") if r]
    streams = [int(n) for n in args.streams.split(",") if n]
    limits = [limit for limit in args.limits.split(",") if limit]
    for limit in limits:
        if limit not in LIMITS:
            parser.error(f"unknown limits {limit}")
    began = datetime.datetime.now(datetime.UTC)
    results: dict[str, Any] = {
        "date": began.strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([os.path.relpath(sys.executable, REPO), "-m", "perf.limits",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(), "regimes": regimes, "streams": streams, "seconds": args.seconds,
        "reps": args.reps, "flanneld": args.flanneld,
        "limits": {name: asdict(LIMITS[name]) for name in limits},
        "commit": git("rev-parse", "HEAD").strip(),
        # Uncommitted changes of the checkout (others' work in progress among them).
        "changed": git("--no-optional-locks", "status", "--porcelain",
                       "--untracked-files=no").splitlines(),
        "iperf_port": IPERF_PORT, "rows": [],
        "whole_peers": [whole_peers_cost(entries) for entries in WHOLE_PEERS_ENTRIES],
    }
    costs = {cost["entries"]: cost["bytes_memlock"] for cost in results["whole_peers"]}
    saving = costs[max(costs)] - costs[min(costs)]
    for name in rows:
        for limit in limits:
            results["rows"].append(run_row(name, limit, regimes, streams, args.seconds,
                                           args.reps, args.flanneld, saving))
            with open(args.out, "w") as f:  # kept as it grows: a run cut short says this much
                json.dump(results, f, indent=1)
    results["elapsed_seconds"] = (datetime.datetime.now(datetime.UTC) - began).total_seconds()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{results['date']}, {results['machine']['cpu']}, {results['machine']['cores']} "
          f"cores, Linux {results['machine']['kernel']}: {results['command']}\n")
    print(tables(results))
    return 0 if all("error" not in row for row in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
