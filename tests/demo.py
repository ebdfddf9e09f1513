"""`make demo`: a three-host pyflannel cluster in network namespaces, with traffic across it.

etcd on its own host, the paper's Figure 2 config (its udp backend, or --backend vxlan or
host-gw), pyflanneld on three hosts, and on each host a
container attached by the real CNI bridge plugin from its FLANNEL_SUBNET, as flannel's CNI plugin
does. Then every container pings every other, iperf3 runs between two of them, and the leases in
etcd and each subnet.env are shown. Everything is torn down at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from tests.cluster import FIGURE_2_CONFIG, PREFIX, Flanneld, put_config, stop_all
from tests.etcd import EtcdServer
from tests.testbed import Testbed


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def iperf3(server: Flanneld, client: Flanneld, seconds: int) -> float:
    """TCP throughput from client's container to server's, in Gbit/s."""
    listener = subprocess.Popen(["ip", "netns", "exec", server.host.container_netns,
                                 "iperf3", "-s", "-1", "-B", server.host.container_ip],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            result = client.host.in_container("iperf3", "-c", server.host.container_ip, "-t",
                                              str(seconds), "-J", check=False)
            # iperf3 may exit 0 with only an "error" in its report ("Connection refused").
            report = json.loads(result.stdout) if result.stdout.strip() else {}
            if result.returncode == 0 and "sum_received" in report.get("end", {}):
                return report["end"]["sum_received"]["bits_per_second"] / 1e9
            time.sleep(0.1)  # the server was not listening yet
        raise RuntimeError(f"iperf3 failed: {result.stdout[-500:]}")
    finally:
        listener.kill()
        listener.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--etcd-api", choices=["v3", "v2"], default="v3")
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--backend", choices=["udp", "vxlan", "host-gw"], default="udp")
    args = parser.parse_args()
    api = args.etcd_api
    config = FIGURE_2_CONFIG
    if args.backend != "udp":
        config = {**FIGURE_2_CONFIG, "Backend": {"Type": args.backend}}

    started = time.monotonic()
    with Testbed() as bed:
        say(f"testbed: underlay bridge in namespace {bed.underlay}, hosts on 198.18.0.0/24")
        etcd = EtcdServer(bed)
        daemons: list[Flanneld] = []
        try:
            say(f"etcd {api} API on {etcd.endpoint} (host {etcd.host.netns})")
            put_config(etcd, api, config)
            say(f"config at {PREFIX}/config: {json.dumps(config)}")

            for _ in range(args.hosts):
                host = bed.add_host()
                daemons.append(Flanneld(bed, host, etcd, api).start())
            say(f"started pyflanneld on {', '.join(d.host.netns for d in daemons)}")
            for daemon in daemons:
                subnet = daemon.wait_subnet()
                mtu = int(daemon.subnet_env()["FLANNEL_MTU"])
                address = bed.add_container(daemon.host, str(subnet), mtu)
                say(f"{daemon.host.netns} ({daemon.host.underlay_ip}) leased {subnet}; container "
                    f"{daemon.host.container_netns} at {address} (CNI bridge, MTU {mtu})")
            for daemon in daemons:
                daemon.wait_log("subnet added", count=len(daemons) - 1)

            say("ping from every container to every other")
            failures = 0
            for src in daemons:
                for dst in daemons:
                    if dst is src:
                        continue
                    result = src.host.in_container("ping", "-c", "3", "-i", "0.2", "-W", "2",
                                                   dst.host.container_ip, check=False)
                    summary = result.stdout.strip().splitlines()[-1] if result.stdout else ""
                    ok = result.returncode == 0
                    failures += not ok
                    print(f"    {src.host.container_ip:>12} -> {dst.host.container_ip:<12} "
                          f"{'ok ' if ok else 'FAIL'} {summary}")

            say(f"iperf3, 3 s of TCP from {daemons[0].host.container_ip} to "
                f"{daemons[1].host.container_ip}, through pyflannel's {args.backend} backend")
            print(f"    {iperf3(daemons[1], daemons[0], 3):.2f} Gbit/s")

            say(f"leases in etcd ({api} keyspace)")
            for key, value in etcd.get_prefix(f"{PREFIX}/subnets/", api).items():
                print(f"    {key} = {value}")
            for daemon in daemons:
                say(f"{daemon.subnet_file}")
                with open(daemon.subnet_file) as f:
                    print("".join(f"    {line}" for line in f))
        finally:
            say("tearing down: pyflanneld (SIGTERM), etcd, namespaces")
            stop_all(daemons)
            etcd.stop()
    say(f"done in {time.monotonic() - started:.0f} s"
        + (f"; {failures} ping pair(s) FAILED" if failures else ": every container reached "
           "every other"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
