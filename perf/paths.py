"""The benchmark's testbed: two hosts on a veth underlay, each with a container on a CNI bridge,
pyflanneld on both, and every other path the paper compares set up beside it.

Built from the tests' testbed, etcd and pyflanneld helpers. The container subnets are routed
through flannel0 by pyflanneld's Network route; the VXLAN and host-gw paths take over by adding a
more specific route for the peer's subnet, so switching paths never touches the containers.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from tests.cluster import FIGURE_2_CONFIG, Flanneld, put_config, stop_all
from tests.etcd import EtcdServer
from tests.testbed import Host, Testbed

PATHS = ["direct", "pyflannel", "pyflannel-batch1", "vxlan", "host-gw"]
REGIMES = ["shaped-100mbit", "unshaped"]
API = "v3"
VXLAN_DEVICE, VXLAN_VNI, VXLAN_PORT, VXLAN_MTU = "flannel.1", 1, 8472, 1450


@dataclass
class Side:
    host: Host
    daemon: Flanneld
    subnet: ipaddress.IPv4Network
    vtep_mac: str = ""

    @property
    def vtep_ip(self) -> str:
        """flannel's vxlan backend puts the subnet's address on flannel.1 as a /32."""
        return str(self.subnet.network_address)


@dataclass(frozen=True)
class Endpoints:
    """Where a measurement runs (a namespace) and what it sends to."""

    client_netns: str
    server_netns: str
    server_ip: str


class PerfBed:
    def __init__(self) -> None:
        self.bed = Testbed()
        self.etcd: EtcdServer | None = None
        self.sides: list[Side] = []
        self.batch: int | None = None  # the daemons' --fastpath-batch; None: the default
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        self.etcd = EtcdServer(self.bed)
        put_config(self.etcd, API, FIGURE_2_CONFIG)
        for _ in range(2):
            host = self.bed.add_host()
            daemon = Flanneld(self.bed, host, self.etcd, API).start()
            subnet = daemon.wait_subnet()
            self.bed.add_container(host, str(subnet), int(daemon.subnet_env()["FLANNEL_MTU"]))
            self.sides.append(Side(host, daemon, subnet))
        for side in self.sides:
            side.daemon.wait_log("subnet added")
        self._add_vxlan()

    def _add_vxlan(self) -> None:
        """flannel.1 as flannel's vxlan backend makes it; routes are added per path."""
        for side in self.sides:
            side.host.ip("link", "add", VXLAN_DEVICE, "type", "vxlan", "id", str(VXLAN_VNI),
                         "local", side.host.underlay_ip, "dev", "eth0",
                         "dstport", str(VXLAN_PORT), "nolearning")
            side.host.ip("link", "set", VXLAN_DEVICE, "mtu", str(VXLAN_MTU), "up")
            side.host.ip("addr", "add", f"{side.vtep_ip}/32", "dev", VXLAN_DEVICE)
            link = side.host.ip("-o", "link", "show", VXLAN_DEVICE).stdout
            side.vtep_mac = link.split("link/ether ")[1].split()[0]
        for side, peer in self.pairs():
            side.host.ip("neigh", "replace", peer.vtep_ip, "lladdr", peer.vtep_mac, "dev",
                          VXLAN_DEVICE, "nud", "permanent")
            side.host.run("bridge", "fdb", "replace", peer.vtep_mac, "dev", VXLAN_DEVICE,
                          "dst", peer.host.underlay_ip, "self", "permanent")

    def pairs(self) -> list[tuple[Side, Side]]:
        a, b = self.sides
        return [(a, b), (b, a)]

    def use_path(self, path: str) -> Endpoints:
        """Route the peer's container subnet for `path` on both hosts; the endpoints to use."""
        client, server = self.sides
        for side, peer in self.pairs():
            side.host.ip("route", "del", str(peer.subnet), check=False)
            if path == "vxlan":
                side.host.ip("route", "add", str(peer.subnet), "via", peer.vtep_ip, "dev",
                              VXLAN_DEVICE, "onlink")
            elif path == "host-gw":
                side.host.ip("route", "add", str(peer.subnet), "via", peer.host.underlay_ip,
                              "dev", "eth0")
        if path.startswith("pyflannel"):
            self._run_pyflanneld(batch=1 if path == "pyflannel-batch1" else None)
        if path == "direct":
            return Endpoints(client.host.netns, server.host.netns, server.host.underlay_ip)
        assert client.host.container_netns and server.host.container_netns
        assert server.host.container_ip
        return Endpoints(client.host.container_netns, server.host.container_netns,
                         server.host.container_ip)

    def _run_pyflanneld(self, batch: int | None) -> None:
        """(Re)start both daemons with the batch size asked for; they take their leases back."""
        if batch == self.batch:
            return
        self.batch = batch
        # The per-packet baseline: one read, one send, no offloads (flanneld's C proxy's shape).
        flags = [] if batch is None else ["--fastpath-batch", str(batch),
                                          "--fastpath-offload=false"]
        stop_all([side.daemon for side in self.sides])
        for side in self.sides:
            side.daemon = Flanneld(self.bed, side.host, self.etcd, API, *flags).start()
        for side in self.sides:
            side.daemon.wait_log("subnet added")

    def shape(self, rate: str | None) -> None:
        """Shape each host's underlay egress to `rate` (tc tbf), or remove the shaping."""
        for side in self.sides:
            side.host.run("tc", "qdisc", "del", "dev", "eth0", "root", check=False)
            if rate:
                side.host.run("tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate,
                              "burst", "64kb", "latency", "50ms")

    def daemon_pids(self) -> list[int]:
        return [side.daemon.process.pid for side in self.sides if side.daemon.process]

    def close(self) -> None:
        stop_all([side.daemon for side in self.sides])
        if self.etcd is not None:
            self.etcd.stop()
        self.bed.close()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
