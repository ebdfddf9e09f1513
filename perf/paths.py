"""The benchmark's testbed and its paths: two hosts on a veth underlay, each with a container on a
CNI bridge, and every way of carrying the containers' traffic that the benchmark compares.

Built from the tests' testbed, etcd and pyflanneld helpers. The network is dual-stack (the
paper's Figure 2 config with an IPv6Network), the hosts have an IPv6 address beside their IPv4
one and the containers one of each family. The containers keep the subnets the first pyflanneld
leased for them; every path carries traffic between those same subnets, the `-ipv6` paths
between the containers' IPv6 addresses. The daemons of one row run at a time (pyflanneld's with
a row's flags, or flanneld's own); the kernel's paths (vxlan, host-gw) add a route for the
peer's subnet and run no daemon.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any

from fastpath.hello import HELLO_SECONDS
from perf.proc import process_peak_rss_bytes
from perf.underlay import REGIMES, Underlay
from tests.cluster import FIGURE_2_CONFIG, Flanneld, put_config, stop_all
from tests.etcd import EtcdServer
from tests.flanneld import RealFlanneld
from tests.limits import DAEMONSET_CPU_MILLIS, DAEMONSET_MEMORY_BYTES, DaemonLimits
from tests.testbed import Host, Testbed, sh

# pyflanneld's rows: row name -> extra pyflanneld flags. The first row runs pyflanneld's
# defaults and stands for the paper's udp row; add one row per switchable lever. A row's
# --etcd-api also picks the etcd keyspace its config is put in.
PYFLANNEL_ROWS: dict[str, list[str]] = {
    "pyflannel": [],
    "pyflannel-etcdv2": ["--etcd-api", "v2"],
    # One lever off (or on) per row, each against the defaults row.
    "pyflannel-no-udp-coalesce": ["--fastpath-udp-coalesce=false"],
    "pyflannel-nice0": ["--fastpath-nice", "0"],
    "pyflannel-nooffload": ["--fastpath-offload=false"],
    # The kernel path (tc programs beside the loops): on by default; without it.
    "pyflannel-kernel-off": ["--fastpath-kernel", "off"],
    # TCP super-packets whole to the veth peers that say hello (on by default): without them.
    "pyflannel-no-whole": ["--fastpath-whole-superpackets=false"],
    # Between hosts on one kernel (this testbed's) they go plain (on by default): without, they
    # go as to any peer, the receiving host taking them in through the kernel's VXLAN receive
    # (on by default); without that too, its loops write them into the TUN.
    "pyflannel-no-plain": ["--fastpath-plain-superpackets=false"],
    "pyflannel-no-vxlan-receive": ["--fastpath-plain-superpackets=false",
                                   "--fastpath-vxlan-receive=false"],
    # Source verification (on by default): what it costs.
    "pyflannel-no-verify-source": ["--fastpath-verify-source=false"],
    # Loops alone, one read, one send per packet, no offloads: the shape of flanneld's C proxy.
    "pyflannel-batch1": ["--fastpath-kernel", "off", "--fastpath-batch", "1",
                         "--fastpath-offload=false"],
    # pyflanneld's other backends: the kernel forwards, pyflanneld sets it up.
    "pyflannel-vxlan": [],
    "pyflannel-host-gw": [],
}
DEFAULT_ROW = next(iter(PYFLANNEL_ROWS))
# The config's Backend of pyflanneld's rows that do not run FIGURE_2_CONFIG's udp one.
PYFLANNEL_BACKENDS: dict[str, dict[str, Any]] = {
    "pyflannel-vxlan": {"Type": "vxlan"},
    "pyflannel-host-gw": {"Type": "host-gw"},
}
# flanneld's own rows (when a binary is given): row name -> the config's Backend.
FLANNELD_ROWS: dict[str, dict[str, Any]] = {
    "flanneld-udp": {"Type": "udp", "Port": 7890},  # FIGURE_2_CONFIG's, as pyflanneld's rows
    "flanneld-vxlan": {"Type": "vxlan"},
}
# Rows inside flannel's DaemonSet limits: each daemon in a cgroup of its own with
# kube-flannel.yml's requests = limits, memory 50Mi and cpu 100m (tests/limits.py), as a
# Kubernetes node runs it; row name -> the row it repeats so. Its files are in the page cache
# (`make limits` also starts them cold: docs/daemonset-limits.md).
DAEMONSET_ROWS: dict[str, str] = {
    "pyflannel-daemonset": DEFAULT_ROW,
    "pyflannel-vxlan-daemonset": "pyflannel-vxlan",
    "flanneld-udp-daemonset": "flanneld-udp",
    "flanneld-vxlan-daemonset": "flanneld-vxlan",
}
# Paths over IPv6 between the containers: path name -> the path whose daemons (or kernel
# devices, for IPv6: flannel-v6.1 and the IPv6 routes as flanneld makes them) carry it.
IPV6_PATHS: dict[str, str] = {
    "pyflannel-ipv6": DEFAULT_ROW,
    "vxlan-ipv6": "vxlan",
    "host-gw-ipv6": "host-gw",
}
# The config of every row: the paper's, dual-stack.
IPV6_NETWORK = "fd00:10::/48"
PERF_CONFIG: dict[str, Any] = {**FIGURE_2_CONFIG, "EnableIPv6": True,
                               "IPv6Network": IPV6_NETWORK}
# The paper's Table 1 row each path stands beside.
PAPER_ROWS = {"direct": "direct", DEFAULT_ROW: "udp", "pyflannel-vxlan": "vxlan",
              "pyflannel-host-gw": "host-gw", "vxlan": "vxlan", "host-gw": "host-gw",
              "flanneld-udp": "udp", "flanneld-vxlan": "vxlan"}
VXLAN_DEVICE, VXLAN_VNI, VXLAN_PORT, VXLAN_MTU = "flannel.1", 1, 8472, 1450
VXLAN6_DEVICE = "flannel-v6.1"  # the kernel's own MTU, 1430, as flanneld leaves it
REACH_TIMEOUT = 20.0
# After the underlay changes (TSO on or off) or pyflanneld starts: it looks at the underlay and
# hears its peer's hello every HELLO_SECONDS, to send TCP super-packets whole only to a peer that
# says hello over a veth that carries them whole. Every path waits alike after every change.
SETTLE_SECONDS = HELLO_SECONDS + 0.5
FLANNELD_SETTLE, FLANNELD_RESTARTS = 5.0, 3


def all_paths(with_flanneld: bool) -> list[str]:
    """Every path, in the order each round measures them (perf/bench.py's rounds). The
    baseline, kernel VXLAN, comes right after pyflanneld's defaults: the targets compare those
    two rows, so in every round they are measured within a minute of each other."""
    others = [row for row in PYFLANNEL_ROWS if row != DEFAULT_ROW]
    limited = [row for row, base in DAEMONSET_ROWS.items()
               if with_flanneld or base not in FLANNELD_ROWS]
    return ["direct", DEFAULT_ROW, "vxlan", *others, "host-gw",
            *(FLANNELD_ROWS if with_flanneld else []), *limited, *IPV6_PATHS]


def base_row(path: str) -> str:
    """The row whose daemons a path runs (a DaemonSet row's, inside the limits; an IPv6
    path's, over IPv6)."""
    return DAEMONSET_ROWS.get(path, IPV6_PATHS.get(path, path))


def etcd_api(flags: list[str]) -> str:
    """The etcd API pyflanneld's flags select (its default: v3)."""
    for index, flag in enumerate(flags):
        if flag == "--etcd-api":
            return flags[index + 1]
        if flag.startswith("--etcd-api="):
            return flag.split("=", 1)[1]
    return "v3"


def describe(path: str) -> dict[str, Any]:
    """What a path is, for the report: its kind, flags or backend, and its paper row."""
    info: dict[str, Any] = {"paper": PAPER_ROWS.get(path)}
    row = base_row(path)
    if row in PYFLANNEL_ROWS:
        info.update(kind="pyflannel", flags=PYFLANNEL_ROWS[row],
                    etcd_api=etcd_api(PYFLANNEL_ROWS[row]),
                    backend=PYFLANNEL_BACKENDS.get(row, FIGURE_2_CONFIG["Backend"]))
    elif row in FLANNELD_ROWS:
        info.update(kind="flanneld", backend=FLANNELD_ROWS[row], etcd_api="v3")
    else:
        info.update(kind="kernel")
    if path in DAEMONSET_ROWS:
        info.update(daemonset={"repeats": row, "memory_bytes": DAEMONSET_MEMORY_BYTES,
                               "cpu_millis": DAEMONSET_CPU_MILLIS})
    if path in IPV6_PATHS:
        info.update(ipv6={"repeats": row})
    return info


@dataclass
class Side:
    host: Host
    subnet: ipaddress.IPv4Network
    subnet6: ipaddress.IPv6Network
    vtep_mac: str = ""
    vtep6_mac: str = ""

    @property
    def vtep_ip(self) -> str:
        """flannel's vxlan backend puts the subnet's address on flannel.1 as a /32."""
        return str(self.subnet.network_address)

    @property
    def vtep6_ip(self) -> str:
        """And the IPv6 subnet's on flannel-v6.1 as a /128."""
        return str(self.subnet6.network_address)


@dataclass(frozen=True)
class Endpoints:
    """Where a measurement runs (a namespace) and what it sends to."""

    client_netns: str
    server_netns: str
    server_ip: str


class PerfBed:
    """The testbed; sides[0] is the client (the sender of TCP), sides[1] the server."""

    def __init__(self, flanneld: str | None = None) -> None:
        self.flanneld_binary = flanneld
        self.bed = Testbed()
        self.etcd: EtcdServer | None = None
        self.sides: list[Side] = []
        self.underlay: Underlay | None = None
        self.path: str | None = None
        self.regime: str | None = None
        self.running: str | None = None  # the row whose daemons run
        self.daemons: list[Flanneld | RealFlanneld] = []  # the client's, then the server's
        # Each row's peak RSS (VmHWM) of the client's and the server's daemon, over the run.
        self.peak_rss: dict[str, list[int]] = {}
        # The DaemonSet rows' cgroups, and what each row's were charged and did over the run
        # (tests/limits.py's Usage of each start, client's and server's).
        self.limits = DaemonLimits()
        self.cgroups: dict[str, list[list[dict[str, Any]]]] = {}
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        self.etcd = EtcdServer(self.bed)
        flags = PYFLANNEL_ROWS[DEFAULT_ROW]
        api = etcd_api(flags)
        put_config(self.etcd, api, PERF_CONFIG)
        self.running = DEFAULT_ROW
        daemons = []
        for _ in range(2):
            host = self.bed.add_host(ipv6=True)
            daemon = Flanneld(self.bed, host, self.etcd, api, *flags).start()
            self.daemons.append(daemon)
            daemons.append(daemon)
            subnet, subnet6 = daemon.wait_subnet(), daemon.wait_ipv6_subnet()
            env = daemon.subnet_env()
            self.bed.add_container(host, str(subnet), int(env["FLANNEL_MTU"]),
                                   env["FLANNEL_NETWORK"], str(subnet6),
                                   env["FLANNEL_IPV6_NETWORK"])
            self.sides.append(Side(host, subnet, subnet6))
        for daemon in daemons:
            daemon.wait_log("subnet added")
        self.underlay = Underlay([side.host for side in self.sides], self.bed.underlay)

    def _add_vxlan(self) -> None:
        """flannel.1 as flannel's vxlan backend makes it, with its neighbour and forwarding
        entries; routes are added per path. A flannel.1 that pyflanneld's vxlan row made is
        the same device and is kept (pyflanneld's other rows delete it, as a backend change
        should)."""
        for side in self.sides:
            if side.host.ip("link", "show", VXLAN_DEVICE, check=False).returncode != 0:
                side.host.ip("link", "add", VXLAN_DEVICE, "type", "vxlan", "id",
                             str(VXLAN_VNI), "local", side.host.underlay_ip, "dev", "eth0",
                             "dstport", str(VXLAN_PORT), "nolearning")
            side.host.ip("link", "set", VXLAN_DEVICE, "mtu", str(VXLAN_MTU), "up")
            side.host.ip("addr", "replace", f"{side.vtep_ip}/32", "dev", VXLAN_DEVICE)
            link = side.host.ip("-o", "link", "show", VXLAN_DEVICE).stdout
            side.vtep_mac = link.split("link/ether ")[1].split()[0]
        for side, peer in self.pairs():
            side.host.ip("neigh", "replace", peer.vtep_ip, "lladdr", peer.vtep_mac, "dev",
                         VXLAN_DEVICE, "nud", "permanent")
            side.host.run("bridge", "fdb", "replace", peer.vtep_mac, "dev", VXLAN_DEVICE,
                          "dst", peer.host.underlay_ip, "self", "permanent")

    def _add_vxlan6(self) -> None:
        """flannel-v6.1 as flannel's vxlan backend makes it: over the hosts' IPv6 addresses,
        the kernel's MTU, the IPv6 subnet's address as a /128; kept like flannel.1."""
        for side in self.sides:
            if side.host.ip("link", "show", VXLAN6_DEVICE, check=False).returncode != 0:
                side.host.ip("link", "add", VXLAN6_DEVICE, "type", "vxlan", "id",
                             str(VXLAN_VNI), "local", str(side.host.underlay_ipv6), "dev",
                             "eth0", "dstport", str(VXLAN_PORT), "nolearning")
            side.host.ip("link", "set", VXLAN6_DEVICE, "up")
            side.host.ip("addr", "replace", f"{side.vtep6_ip}/128", "dev", VXLAN6_DEVICE)
            link = side.host.ip("-o", "link", "show", VXLAN6_DEVICE).stdout
            side.vtep6_mac = link.split("link/ether ")[1].split()[0]
        for side, peer in self.pairs():
            side.host.ip("-6", "neigh", "replace", peer.vtep6_ip, "lladdr", peer.vtep6_mac,
                         "dev", VXLAN6_DEVICE, "nud", "permanent")
            side.host.run("bridge", "fdb", "replace", peer.vtep6_mac, "dev", VXLAN6_DEVICE,
                          "dst", str(peer.host.underlay_ipv6), "self", "permanent")

    def _remove_vxlan(self) -> None:
        """Make way for flanneld's own flannel.1 and flannel-v6.1 (their neighbours and routes
        go with them)."""
        for side in self.sides:
            for device in (VXLAN_DEVICE, VXLAN6_DEVICE):
                side.host.ip("link", "del", device, check=False)

    def pairs(self) -> list[tuple[Side, Side]]:
        a, b = self.sides
        return [(a, b), (b, a)]

    def use(self, path: str, regime: str) -> Endpoints:
        """Carry the containers' traffic over `path` with the underlay in `regime`, settled;
        the endpoints to measure between."""
        assert self.underlay is not None
        changed = (path, regime) != (self.path, self.regime)
        if regime != self.regime:
            self.regime = None  # until it is entered: a failed change is redone
            self.underlay.enter(REGIMES[regime])
            self.regime = regime
        endpoints = self._use_path(path)
        if changed:
            time.sleep(SETTLE_SECONDS)
        return endpoints

    def endpoints(self, path: str) -> Endpoints:
        client, server = self.sides
        if path == "direct":
            return Endpoints(client.host.netns, server.host.netns, server.host.underlay_ip)
        assert client.host.container_netns and server.host.container_netns
        server_ip = server.host.container_ipv6 if path in IPV6_PATHS else \
            server.host.container_ip
        assert server_ip
        return Endpoints(client.host.container_netns, server.host.container_netns, server_ip)

    def _use_path(self, path: str) -> Endpoints:
        """Carry the containers' traffic over `path` (its daemons running, the others not), and
        check it does; the endpoints to measure between."""
        endpoints = self.endpoints(path)
        if path == self.path:
            return endpoints
        self.path = None
        self._forget_path_mtus()
        for side, peer in self.pairs():
            side.host.ip("route", "del", str(peer.subnet), check=False)
            side.host.ip("-6", "route", "del", str(peer.subnet6), check=False)
        self._run_row(path if base_row(path) in PYFLANNEL_ROWS or
                      base_row(path) in FLANNELD_ROWS else None)
        kernel = base_row(path)
        if kernel == "vxlan":
            self._add_vxlan()
            self._add_vxlan6()
        for side, peer in self.pairs():
            if kernel == "vxlan":
                side.host.ip("route", "add", str(peer.subnet), "via", peer.vtep_ip, "dev",
                             VXLAN_DEVICE, "onlink")
                side.host.ip("-6", "route", "add", str(peer.subnet6), "via", peer.vtep6_ip,
                             "dev", VXLAN6_DEVICE, "onlink")
            elif kernel == "host-gw":
                side.host.ip("route", "add", str(peer.subnet), "via", peer.host.underlay_ip,
                             "dev", "eth0")
                side.host.ip("-6", "route", "add", str(peer.subnet6), "via",
                             str(peer.host.underlay_ipv6), "dev", "eth0")
        if not self._reachable(endpoints, REACH_TIMEOUT):
            logs = "".join(f"\n--- {daemon.log_path}:\n{daemon.log()[-2000:]}"
                           for daemon in self.daemons)
            raise RuntimeError(f"{path}: {endpoints.server_ip} not reachable from "
                               f"{endpoints.client_netns} in {REACH_TIMEOUT}s{logs}")
        self.path = path
        return endpoints

    def _forget_path_mtus(self) -> None:
        """Drop the path MTUs the hosts and containers learnt (the route cache's exceptions), so
        that no path inherits another's. The vxlan paths carry 1450-byte packets where the
        containers' MTU is FLANNEL_MTU's 1472: the sending container learns a path MTU of 1450
        for the peer container, for 10 minutes. Inherited, it cut pyflannel's four TCP streams
        from 20 to 14 Gbit/s here (super-packets of 33 segments instead of 46), and a round
        measures every path within those 10 minutes."""
        for side in self.sides:
            side.host.ip("route", "flush", "cache")
            side.host.in_container("ip", "route", "flush", "cache")

    def _run_row(self, row: str | None) -> None:
        if row == self.running:
            return
        self._stop_daemons()
        self.running = row  # before they start: stopped by the next switch even if they fail
        if base_row(row or "") in PYFLANNEL_ROWS:
            self._start_pyflanneld(row)
        elif base_row(row or "") in FLANNELD_ROWS:
            self._start_flanneld(row)

    def _limited(self, row: str, daemon: Flanneld | RealFlanneld) -> None:
        """A DaemonSet row's daemon runs in its host's cgroup (made on its first start)."""
        if row in DAEMONSET_ROWS:
            daemon.command = self.limits.command(daemon.host.netns, daemon.command)

    def _start_pyflanneld(self, row: str) -> None:
        """Both daemons with the row's flags; they take the containers' subnets back (from etcd,
        or from their subnet files on a keyspace they have not used yet)."""
        assert self.etcd is not None
        flags = PYFLANNEL_ROWS[base_row(row)]
        api = etcd_api(flags)
        put_config(self.etcd, api, {**PERF_CONFIG,
                                    "Backend": PYFLANNEL_BACKENDS.get(base_row(row),
                                                                      PERF_CONFIG["Backend"])})
        daemons = [Flanneld(self.bed, side.host, self.etcd, api, *flags) for side in self.sides]
        self.daemons = list(daemons)
        for daemon in daemons:
            self._limited(row, daemon)
            daemon.start()
        for side, daemon in zip(self.sides, daemons, strict=True):
            daemon.wait_log("subnet added")
            self._check_subnet(row, side, daemon)

    def _start_flanneld(self, row: str) -> None:
        """flanneld on both hosts with the row's backend, one host after the other. Each finds
        the lease that carries its PublicIP and keeps that subnet.

        The second learns the first's lease from its listing at start. flanneld v0.20.2 can
        miss the first's event of the second's lease (it reads one event per watch and may
        re-watch from the current revision), so if the hosts cannot reach each other the
        first is restarted: its listing then has the second's lease."""
        assert self.etcd is not None and self.flanneld_binary
        backend = FLANNELD_ROWS[base_row(row)]
        put_config(self.etcd, "v3", {**PERF_CONFIG, "Backend": backend})
        if backend["Type"] == "vxlan":
            self._remove_vxlan()
        for side in self.sides:
            # v0.20.2 finds the interface's IPv6 address beside --iface only when told it.
            daemon = RealFlanneld(self.flanneld_binary, self.bed, side.host, self.etcd,
                                  f"--public-ipv6={side.host.underlay_ipv6}")
            self._limited(row, daemon)
            self.daemons.append(daemon)
            self._check_subnet(row, side, daemon.start())
        first = self.daemons[0]
        assert isinstance(first, RealFlanneld)
        for _ in range(FLANNELD_RESTARTS):
            if self._reachable(self.endpoints(row), FLANNELD_SETTLE):
                return
            print(f"{row}: {first.host.netns} missed the other host's lease; restarting it",
                  flush=True)
            self._record_peaks(row, self.daemons)
            first.stop()
            self._check_subnet(row, self.sides[0], first.start())

    @staticmethod
    def _check_subnet(row: str, side: Side, daemon: Flanneld | RealFlanneld) -> None:
        """The subnet the daemon wrote to its subnet file must be the container's."""
        subnet = daemon.wait_subnet()
        if subnet != side.subnet:
            raise RuntimeError(f"{row} on {side.host.netns} took {subnet}, but the container "
                               f"is on {side.subnet}; {daemon.log_path}:\n{daemon.log()[-2000:]}")

    def _stop_daemons(self) -> None:
        """Stop the running row's daemons (noting their peak RSS first) and undo what they
        changed."""
        row, daemons = self.running, self.daemons
        self.running, self.daemons = None, []
        self._record_peaks(row, daemons)
        if base_row(row or "") in FLANNELD_ROWS:
            assert self.etcd is not None and row is not None
            vxlan = FLANNELD_ROWS[base_row(row)]["Type"] == "vxlan"
            for daemon in daemons:
                assert isinstance(daemon, RealFlanneld)
                daemon.stop()
                daemon.clean(VXLAN_DEVICE if vxlan else None)
                if vxlan:
                    daemon.host.ip("link", "del", VXLAN6_DEVICE, check=False)
            put_config(self.etcd, "v3", PERF_CONFIG)
        else:
            stop_all([d for d in daemons if isinstance(d, Flanneld)])
        if row in DAEMONSET_ROWS:  # each start's cgroups, charges and all, then gone
            self.cgroups.setdefault(row, []).append(
                [self.limits.release(side.host.netns).as_dict() for side in self.sides
                 if side.host.netns in self.limits.cgroups])

    def _record_peaks(self, row: str | None, daemons: list[Flanneld | RealFlanneld]) -> None:
        if row is None or not daemons:  # none started (the row's setup failed)
            return
        peaks = self.peak_rss.setdefault(row, [0] * len(daemons))
        for index, daemon in enumerate(daemons):
            if daemon.process is not None and daemon.process.poll() is None:
                peaks[index] = max(peaks[index], process_peak_rss_bytes(daemon.process.pid))

    @staticmethod
    def _reachable(endpoints: Endpoints, timeout: float) -> bool:
        """Whether a ping from the client gets its answer within `timeout`: both hosts route
        the other's subnet."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sh("ip", "netns", "exec", endpoints.client_netns, "ping", "-c", "1", "-W", "1",
                  endpoints.server_ip, check=False).returncode == 0:
                return True
            time.sleep(0.1)
        return False

    def daemon_pids(self) -> list[int]:
        """The running daemons' PIDs, the client's (TCP sender's) first."""
        return [daemon.process.pid for daemon in self.daemons if daemon.process is not None]

    def close(self) -> None:
        try:
            self._stop_daemons()
        finally:
            try:
                self.limits.close()
            finally:
                try:
                    if self.underlay is not None:
                        self.underlay.leave()
                finally:
                    if self.etcd is not None:
                        self.etcd.stop()
                    self.bed.close()
