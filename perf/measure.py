"""One measurement, in a fresh process started inside a namespace by perf/bench.py.

The iperf3 Python wrapper keeps global state in libiperf and takes over stdout, so each
measurement gets its own process and hands its result back as JSON in a file.

    python -m perf.measure tcp --server 10.10.16.2 --duration 10 --streams 4 \
        --daemon-pids 1234,1235 --out F
    python -m perf.measure udp --server 10.10.16.2 --duration 1 --rate-pps 80000 --out F
    python -m perf.measure latency --server 10.10.16.2 --duration 2 --out F
    python -m perf.measure loaded-latency --server 10.10.16.2 --duration 2 --out F
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import signal
import subprocess
import time
from typing import Any

from perf.proc import machine_busy_seconds, process_cpu_seconds
from tests.testbed import end_process

UDP_PAYLOAD = 64
# "As fast as iperf3 sends": far more than any path here carries.
UDP_UNLIMITED_BPS = 2_000_000_000
# The receiving iperf3's socket buffer (iperf3 -w, capped by net.core.rmem_max). With the default
# 208 KiB (~250 datagrams, 3 ms at 80 kpps) every path lost 1-13 % of a trial in the receiving
# container's socket whenever its iperf3 waited for a core, at rates the same path carried whole
# the trial before: the search measured the scheduler, not the path.
UDP_SOCKET_BUFFER = 4 * 1024 * 1024
# A latency trial in which not one request was answered: the path carried nothing for the whole
# trial (qperf then reports a latency of 0).
NO_ROUND_TRIP = "latency 0: no request was answered during the trial"
# The bulk flow under which loaded-latency runs qperf has this long to fill the queues first.
LOAD_WARMUP_SECONDS = 1.0
# The one CPU that qperf's client and server (perf/bench.py's) both run on. Left to the
# scheduler, a trial measured mostly where the two ends landed, not the path: on this 2-core VM
# an unloaded request/response costs 11-13 us one way when both ends share a CPU and 31-36 us
# when each wakes the other's idle CPU, on every path alike (vxlan and pyflannel, 8 trials of
# each placement), and a run's trials fell on either side at random (medians 15-31 us for one
# path). Under a bulk flow both CPUs are awake and the placement made no difference.
LATENCY_CPU = 0
# qperf, client or server, on LATENCY_CPU.
QPERF = ["taskset", "-c", str(LATENCY_CPU), "qperf"]


def tcp(server: str, port: int, duration: float, streams: int,
        daemon_pids: list[int]) -> dict[str, Any]:
    """iperf3 TCP, client to server, with the CPU the whole machine and each daemon (sender's
    first, then receiver's) spent meanwhile, read right around the transfer."""
    import iperf3

    client = iperf3.Client()
    client.server_hostname = server
    client.port = port
    client.duration = max(1, round(duration))
    client.num_streams = streams
    busy = machine_busy_seconds()
    daemons = [process_cpu_seconds(pid) for pid in daemon_pids]
    result = client.run()
    busy = machine_busy_seconds() - busy
    daemons = [process_cpu_seconds(pid) - cpu for pid, cpu in zip(daemon_pids, daemons,
                                                                    strict=True)]
    if result.error:
        raise RuntimeError(f"iperf3: {result.error}")
    gigabytes = result.received_bytes / 1e9
    # The transfer's own length: the daemons idle through the set-up around it.
    seconds = result.json["end"]["sum_received"]["seconds"]
    sample: dict[str, Any] = {
        "bits_per_second": result.received_bps, "bytes": result.received_bytes,
        "retransmits": result.retransmits, "seconds": seconds, "machine_busy_seconds": busy,
        "machine_cpu_s_per_gb": busy / gigabytes}
    if daemon_pids:
        sample["daemon_cpu_seconds"] = daemons
        sample["daemon_cpu_s_per_gb"] = sum(daemons) / gigabytes
        sample["daemon_cpu_percent"] = [100 * cpu / seconds for cpu in daemons]
    return sample


def udp(server: str, port: int, duration: float, rate_pps: float | None) -> dict[str, Any]:
    """64-byte datagrams offered at rate_pps (None: as fast as iperf3 sends)."""
    import iperf3

    client = iperf3.Client()
    client.server_hostname = server
    client.port = port
    client.duration = max(1, round(duration))
    client.protocol = "udp"
    client.blksize = UDP_PAYLOAD
    # iperf3's rate counts payload bits.
    client.bandwidth = round(rate_pps * UDP_PAYLOAD * 8) if rate_pps else UDP_UNLIMITED_BPS
    # The wrapper has no setter for it; iperf3 hands it to the server with the test's parameters.
    client.lib.iperf_set_test_socket_bufsize.argtypes = (ctypes.c_void_p, ctypes.c_int)
    client.lib.iperf_set_test_socket_bufsize(client._test, UDP_SOCKET_BUFFER)
    result = client.run()
    if result.error:
        raise RuntimeError(f"iperf3: {result.error}")
    received = result.packets - result.lost_packets
    return {"offered_pps": rate_pps, "packets_sent": result.packets,
            "packets_received": received, "sent_pps": result.packets / result.seconds,
            "packets_per_second": received / result.seconds, "lost_percent": result.lost_percent}


def latency(server: str, duration: float) -> dict[str, Any]:
    """One-way UDP latency from qperf's udp_lat (half the request/response round trip), the
    client on LATENCY_CPU."""
    out = subprocess.run([*QPERF, "-t", str(max(1, round(duration))), server, "udp_lat"],
                         capture_output=True, text=True, timeout=duration + 30)
    found = re.search(r"latency\s*=\s*([\d.]+)\s*(ns|us|ms|sec)", out.stdout)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"qperf: {out.stdout}{out.stderr}")
    value = float(found.group(1))
    if value == 0:  # what qperf reports when not one request was answered
        raise RuntimeError(f"qperf: {NO_ROUND_TRIP}")
    return {"one_way_us": value * {"ns": 1e-3, "us": 1.0, "ms": 1e3, "sec": 1e6}[found.group(2)]}


def loaded_latency(server: str, port: int, duration: float) -> dict[str, Any]:
    """qperf's one-way latency while one bulk iperf3 TCP flow runs to the same server: the
    standing queue any buffer on the path builds shows up here."""
    # The iperf3 command, not the wrapper: the wrapper's run() blocks this process.
    flow = subprocess.Popen(
        ["iperf3", "-c", server, "-p", str(port), "-t", str(round(duration + 30))],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(LOAD_WARMUP_SECONDS)
        if flow.poll() is not None:
            raise RuntimeError(f"the bulk flow ended before qperf ran: {flow.stderr.read()}")
        sample = latency(server, duration)
        if flow.poll() is not None:
            raise RuntimeError(f"the bulk flow ended during qperf: {flow.stderr.read()}")
    finally:
        # SIGINT: iperf3 tells its server the test is over, so the server is ready for the next.
        end_process(flow, signal.SIGINT)
    return sample


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["tcp", "udp", "latency", "loaded-latency"])
    parser.add_argument("--server", required=True)
    parser.add_argument("--port", type=int, default=5201)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--rate-pps", type=float, help="udp: offered packets/s (default: all)")
    parser.add_argument("--daemon-pids", default="",
                        help="tcp: the sending and receiving daemons' PIDs, comma-separated")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.kind == "tcp":
        pids = [int(pid) for pid in args.daemon_pids.split(",") if pid]
        result = tcp(args.server, args.port, args.duration, args.streams, pids)
    elif args.kind == "udp":
        result = udp(args.server, args.port, args.duration, args.rate_pps)
    elif args.kind == "latency":
        result = latency(args.server, args.duration)
    else:
        result = loaded_latency(args.server, args.port, args.duration)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
