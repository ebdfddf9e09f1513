"""One measurement, in a fresh process started inside a namespace by perf/bench.py.

The iperf3 Python wrapper keeps global state in libiperf and takes over stdout, so each
measurement gets its own process and hands its result back as JSON in a file.

    python -m perf.measure tcp --server 10.10.16.2 --port 5201 --duration 10 --streams 4 --out F
    python -m perf.measure udp --server 10.10.16.2 --port 5201 --duration 3 --out F
    python -m perf.measure latency --server 10.10.16.2 --duration 2 --out F
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from typing import Any

# 64-byte UDP payloads offered at this rate: far more than any path here carries.
UDP_OFFERED_BPS = 2_000_000_000
UDP_PAYLOAD = 64


def tcp(server: str, port: int, duration: float, streams: int) -> dict[str, Any]:
    import iperf3

    client = iperf3.Client()
    client.server_hostname = server
    client.port = port
    client.duration = max(1, round(duration))
    client.num_streams = streams
    result = client.run()
    if result.error:
        raise RuntimeError(f"iperf3: {result.error}")
    return {"bits_per_second": result.received_bps, "bytes": result.received_bytes,
            "retransmits": result.retransmits}


def udp(server: str, port: int, duration: float) -> dict[str, Any]:
    import iperf3

    client = iperf3.Client()
    client.server_hostname = server
    client.port = port
    client.duration = max(1, round(duration))
    client.protocol = "udp"
    client.blksize = UDP_PAYLOAD
    client.bandwidth = UDP_OFFERED_BPS
    result = client.run()
    if result.error:
        raise RuntimeError(f"iperf3: {result.error}")
    received = result.packets - result.lost_packets
    return {"packets_sent": result.packets, "packets_received": received,
            "packets_per_second": received / result.seconds, "lost_percent": result.lost_percent}


def latency(server: str, duration: float) -> dict[str, Any]:
    """One-way UDP latency from qperf's udp_lat (half the request/response round trip)."""
    out = subprocess.run(["qperf", "-t", str(max(1, round(duration))), server, "udp_lat"],
                         capture_output=True, text=True, timeout=duration + 30)
    found = re.search(r"latency\s*=\s*([\d.]+)\s*(ns|us|ms|sec)", out.stdout)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"qperf: {out.stdout}{out.stderr}")
    scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "sec": 1e6}[found.group(2)]
    return {"one_way_us": float(found.group(1)) * scale}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["tcp", "udp", "latency"])
    parser.add_argument("--server", required=True)
    parser.add_argument("--port", type=int, default=5201)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.kind == "tcp":
        result = tcp(args.server, args.port, args.duration, args.streams)
    elif args.kind == "udp":
        result = udp(args.server, args.port, args.duration)
    else:
        result = latency(args.server, args.duration)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
