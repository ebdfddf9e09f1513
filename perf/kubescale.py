"""`make kube-scale`: pyflanneld --kube-subnet-mgr in a cluster of NODES Nodes (5,000 by default,
Kubernetes' supported maximum) on a real API server and controller manager v1.19.0
(tests/kubeapi.py), beside flanneld v0.20.2 run as kube-flannel.yml runs it
(EVENT_QUEUE_DEPTH=5000). Prints a Markdown table for perf/SCALE.md.

    python -m perf.kubescale --nodes 5000 [--flanneld PATH]

What it does, in order (each step's time is printed as it goes):
1. the control plane, with --cluster-cidr 10.0.0.0/8 and a /24 per Node;
2. four real hosts (namespaces) registered as kubelets register, their podCIDRs from the
   controller manager's nodeipam: a and b (pyflanneld, started now), c (pyflanneld) and f
   (flanneld), which join later;
3. NODES - 4 more Nodes POSTed as the admin on a few connections at once: kubelet-sized
   (conditions, capacity, nodeInfo, images: what a list costs), annotated as flannel's vxlan
   leases, their podCIDRs given in the Node (10.128.0.0/24 up, away from nodeipam's, which
   would take minutes to hand out 5,000: the real hosts' come from it);
4. a and b take those in while they are created; then c and f start: seconds from the process's
   start to subnet.env, to "running", and to every Node routed (the /24 routes on flannel.1,
   seen through a netlink monitor in each host); peak RSS (VmHWM);
5. 100 Nodes a second change for 30 s, first a label (what a kubelet's status update looks like
   to a watch: no lease changes, no work but reading the event), then the public-ip annotation
   (a lease change each): each daemon's CPU, and the changes applied;
6. a new annotated Node, a few times: seconds from its POST to its route on every host, and from
   its DELETE to the route gone;
7. when flanneld survived step 4: one more annotated Node, then c and f started again with
   EVENT_QUEUE_DEPTH one less than the annotated Nodes (5000 at NODES=5000, kube-flannel.yml's):
   more than flanneld's queue holds (flannel 1352, 2252). If flanneld writes no subnet.env
   within --deadlock-wait seconds, SIGQUIT makes it print its goroutines, which show where it
   waits. pyflanneld has no such queue and ignores the variable.
If flanneld deadlocks at its first start already (NODES above 5001), step 7 is that.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import http.client
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from perf.proc import machine, process_cpu_seconds
from tests.cluster import Flanneld, LoggedDaemon
from tests.flanneld import REFERENCE_FLANNELD, RealFlanneld
from tests.kubeapi import KubeApi
from tests.testbed import Host, Testbed, inside

CLUSTER_CIDR = "10.0.0.0/8"  # the controller manager's --cluster-cidr and flannel's Network
NODE_CIDR_MASK = 24
# The made-up Nodes' podCIDRs, from here up (5,000 of them end at 10.147.135.0/24); nodeipam
# hands the real hosts theirs from the Network's start.
FAKE_FIRST = int(ipaddress.IPv4Address("10.128.0.0"))
# Their PublicIPs: in the testbed's underlay range, never used by a namespace, and no packet goes
# there (nothing sends into their subnets).
FAKE_PUBLIC = ipaddress.IPv4Network("198.19.0.0/16")
ANNOTATION = "flannel.alpha.coreos.com/"
BACKEND = "vxlan"  # kube-flannel.yml's
NET_CONF = {"Network": CLUSTER_CIDR, "Backend": {"Type": BACKEND}}
FLANNEL_QUEUE_DEPTH = 5000  # kube-flannel.yml's EVENT_QUEUE_DEPTH, and flanneld's default
CONNECTIONS = 8  # the admin's connections that create Nodes
# ... and that change them: enough that the API server's answers (50-100 ms under load) do not
# hold the rate back
CHURN_CONNECTIONS = 32
CHURN_RATE = 100  # Node changes per second
CHURN_SECONDS = 30.0
NEW_NODE_SAMPLES = 5
START_TIMEOUT = 600.0
DEADLOCK_WAIT = 90.0
STRATEGIC = "application/strategic-merge-patch+json"
REAL_HOSTS = ("a", "b", "c", "f")

# What a kubelet of 2020 reports in its Node's status.images (names and sizes as `crictl images`
# shows them on a kubeadm worker with flannel, kube-proxy and a few workloads).
IMAGES = [
    ("k8s.gcr.io/kube-proxy", "v1.19.0", 119_000_000),
    ("quay.io/coreos/flannel", "v0.20.2", 59_200_000),
    ("docker.io/rancher/mirrored-flannelcni-flannel-cni-plugin", "v1.1.0", 8_090_000),
    ("k8s.gcr.io/coredns", "1.7.0", 45_200_000),
    ("docker.io/library/nginx", "1.19.2", 133_000_000),
    ("quay.io/prometheus/node-exporter", "v1.0.1", 26_400_000),
    ("docker.io/library/redis", "6.0.8", 104_000_000),
    ("k8s.gcr.io/metrics-server/metrics-server", "v0.3.7", 55_000_000),
    ("docker.io/fluent/fluent-bit", "1.5.6", 78_700_000),
    ("k8s.gcr.io/pause", "3.2", 683_000),
]
STAMP = "2026-01-01T00:00:00Z"


def fake_cidr(index: int) -> str:
    return f"{ipaddress.IPv4Address(FAKE_FIRST + (index << 8))}/{NODE_CIDR_MASK}"


def fake_public_ip(index: int, generation: int = 0) -> str:
    """A PublicIP for made-up Node `index`; another one for each generation (a lease change)."""
    host = 1 + (2 * index + generation) % (FAKE_PUBLIC.num_addresses - 2)
    return str(FAKE_PUBLIC.network_address + host)


def fake_vtep_mac(index: int) -> str:
    return "0a:58:" + ":".join(f"{b:02x}" for b in index.to_bytes(4, "big"))


def flannel_annotations(public_ip: str, vtep_mac: str) -> dict[str, str]:
    """The annotations flanneld's vxlan backend writes on its Node (../shared/kube-compat.md)."""
    return {ANNOTATION + "kube-subnet-manager": "true", ANNOTATION + "backend-type": "vxlan",
            ANNOTATION + "backend-data": json.dumps({"VNI": 1, "VtepMAC": vtep_mac},
                                                    separators=(",", ":")),
            ANNOTATION + "public-ip": public_ip}


def kubelet_node(name: str, cidr: str | None, address: str,
                 annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A Node the size of one a kubelet registers and keeps (about 6 KB of JSON as served, the
    API server's managedFields included): labels, the kubelet's annotations (and `annotations`),
    five conditions, capacity and allocatable, addresses, nodeInfo and ten images. Its podCIDR
    is `cidr` (None: left to the controller manager)."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    uuid = f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
    zone = f"zone-{int(digest[:2], 16) % 3}"
    labels = {
        "beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/instance-type": "n2-standard-8",
        "beta.kubernetes.io/os": "linux", "failure-domain.beta.kubernetes.io/region": "region-1",
        "failure-domain.beta.kubernetes.io/zone": zone, "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
        "node.kubernetes.io/instance-type": "n2-standard-8",
        "topology.kubernetes.io/region": "region-1", "topology.kubernetes.io/zone": zone,
    }
    conditions = [
        ("NetworkUnavailable", "False", "FlannelIsUp", "Flannel is running on this node"),
        ("MemoryPressure", "False", "KubeletHasSufficientMemory",
         "kubelet has sufficient memory available"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        ("Ready", "True", "KubeletReady", "kubelet is posting ready status. AppArmor enabled"),
    ]
    capacity = {"cpu": "8", "ephemeral-storage": "101445540Ki", "hugepages-1Gi": "0",
                "hugepages-2Mi": "0", "memory": "32882924Ki", "pods": "110"}
    images = [{"names": [f"{repo}@sha256:{hashlib.sha256(repo.encode()).hexdigest()}",
                         f"{repo}:{tag}"], "sizeBytes": size} for repo, tag, size in IMAGES]
    spec: dict[str, Any] = {"providerID": f"gce://project-1/{zone}/{name}"}
    if cidr is not None:
        spec.update(podCIDR=cidr, podCIDRs=[cidr])
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {
            "node.alpha.kubernetes.io/ttl": "0",
            "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            **(annotations or {})}},
        "spec": spec,
        "status": {
            "capacity": capacity,
            "allocatable": {**capacity, "cpu": "7910m", "ephemeral-storage": "93492541286",
                            "memory": "29532396Ki"},
            "conditions": [{"type": kind, "status": status, "lastHeartbeatTime": STAMP,
                            "lastTransitionTime": STAMP, "reason": reason, "message": message}
                           for kind, status, reason, message in conditions],
            "addresses": [{"type": "InternalIP", "address": address},
                          {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": digest[:32], "systemUUID": uuid,
                         "bootID": f"{digest[32:40]}-{digest[40:44]}-{digest[44:48]}-"
                                   f"{digest[48:52]}-{digest[52:64]}",
                         "kernelVersion": "5.10.0-18-cloud-amd64",
                         "osImage": "Debian GNU/Linux 11 (bullseye)",
                         "containerRuntimeVersion": "containerd://1.4.13",
                         "kubeletVersion": "v1.19.0", "kubeProxyVersion": "v1.19.0",
                         "operatingSystem": "linux", "architecture": "amd64"},
            "images": images,
        },
    }


def fake_node(index: int, name: str | None = None) -> dict[str, Any]:
    """Made-up Node `index`: a flannel vxlan lease on its own podCIDR."""
    name = name or f"node-{index:05d}"
    return kubelet_node(name, fake_cidr(index), str(ipaddress.IPv4Address("172.16.0.0") + index),
                        flannel_annotations(fake_public_ip(index), fake_vtep_mac(index)))


class ApiPool:
    """Requests to the API server as its admin, `workers` at a time, each worker on a
    connection of its own that it keeps (made in the API server's namespace)."""

    def __init__(self, api: KubeApi, workers: int = CONNECTIONS) -> None:
        assert api.admin.cert and api.admin.key
        self.api = api
        self._context = ssl.create_default_context(cafile=api.ca)
        self._context.load_cert_chain(api.admin.cert, api.admin.key)
        self._local = threading.local()
        self._connections: list[http.client.HTTPSConnection] = []
        self._lock = threading.Lock()
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="api")

    def _connection(self) -> http.client.HTTPSConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPSConnection(self.api.address, self.api.port,
                                                     context=self._context, timeout=120)
            with inside(self.api.host.netns):
                connection.connect()
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def request(self, method: str, path: str, body: object = None,
                content_type: str = "application/json") -> tuple[int, bytes]:
        """(status, body); a broken connection is made again and the request sent again (a
        create that went through the first time then answers 409)."""
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in range(3):
            connection = self._connection()
            try:
                connection.request(method, path, body=data, headers=headers)
                response = connection.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                self._local.connection = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def check(self, method: str, path: str, body: object = None,
              content_type: str = "application/json", ok: Iterable[int] = (200, 201)) -> bytes:
        status, answer = self.request(method, path, body, content_type)
        if status not in ok:
            raise RuntimeError(f"{method} {path}: {status} {answer[:300]!r}")
        return answer

    def all(self, calls: list[Callable[[], object]]) -> list[object]:
        """Run the calls on the workers; their results, in order."""
        return list(self.executor.map(lambda call: call(), calls))

    def paced(self, calls: list[Callable[[], object]], rate: float) -> float:
        """Start the calls at `rate` a second on the workers (a slow answer does not hold the
        next call back); returns the seconds from the first start to the last answer."""
        started = time.monotonic()
        futures = []
        for n, call in enumerate(calls):
            time.sleep(max(0.0, started + n / rate - time.monotonic()))
            futures.append(self.executor.submit(call))
        for future in futures:
            future.result()
        return time.monotonic() - started

    def create(self, node: dict[str, Any]) -> None:
        self.check("POST", "/api/v1/nodes", node, ok=(201, 409))

    def patch(self, name: str, patch: dict[str, Any]) -> None:
        self.check("PATCH", f"/api/v1/nodes/{name}", patch, STRATEGIC)

    def delete(self, name: str) -> None:
        self.check("DELETE", f"/api/v1/nodes/{name}", ok=(200, 202, 404))

    def close(self) -> None:
        self.executor.shutdown()
        for connection in self._connections:
            connection.close()


# rtnetlink, for RouteWatch: the IPv4 route group, messages and attributes it reads.
RTMGRP_IPV4_ROUTE = 0x40
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTA_DST, RTA_TABLE = 1, 15
RT_TABLE_MAIN = 254
SO_RCVBUFFORCE = 33


class RouteWatch:
    """The /24 routes into the Network in a host's main table, followed as the kernel announces
    them (a netlink socket in the host's namespace, read by a thread): which are there, and
    when each came or went. Started before the daemon makes any."""

    def __init__(self, host: Host, network: str = CLUSTER_CIDR) -> None:
        self.host = host
        self._network = ipaddress.IPv4Network(network)
        with inside(host.netns):
            self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                                         socket.NETLINK_ROUTE)
        self._socket.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        self._socket.bind((0, RTMGRP_IPV4_ROUTE))
        self._socket.settimeout(0.2)
        self.present: set[str] = set()
        self.added: dict[str, float] = {}  # each subnet's last route add
        self.removed: dict[str, float] = {}
        self.history: list[tuple[float, int]] = [(time.monotonic(), 0)]  # (when, how many)
        self.overflows = 0  # ENOBUFS: announcements lost (the count is then checked by a dump)
        self.lock = threading.Lock()  # held while the thread updates the above
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"routes-{host.netns}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self._socket.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    self.overflows += 1
                    continue
                return
            now = time.monotonic()
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if length < 16:
                    break
                if kind in (RTM_NEWROUTE, RTM_DELROUTE):
                    with self.lock:
                        self._route(kind, data[offset + 16:offset + length], now)
                offset += (length + 3) & ~3

    def _route(self, kind: int, body: bytes, now: float) -> None:
        family, dst_len, _, _, table = struct.unpack_from("=BBBBB", body)
        if family != socket.AF_INET or dst_len != NODE_CIDR_MASK:
            return
        dst = None
        offset = 12
        while offset + 4 <= len(body):
            length, attr = struct.unpack_from("=HH", body, offset)
            if length < 4:
                break
            if attr == RTA_DST:
                dst = socket.inet_ntoa(body[offset + 4:offset + 8])
            elif attr == RTA_TABLE:
                table = struct.unpack_from("=I", body, offset + 4)[0]
            offset += (length + 3) & ~3
        if dst is None or table != RT_TABLE_MAIN:
            return
        subnet = f"{dst}/{dst_len}"
        if not ipaddress.IPv4Network(subnet).subnet_of(self._network):
            return
        if kind == RTM_NEWROUTE:
            self.added[subnet] = now
            self.present.add(subnet)
        else:
            self.removed[subnet] = now
            self.present.discard(subnet)
        if len(self.present) != self.history[-1][1]:
            self.history.append((now, len(self.present)))

    def reached(self, count: int) -> float | None:
        """When the routes first numbered `count` or more."""
        with self.lock:
            return next((when for when, n in self.history if n >= count), None)

    def removed_since(self, since: float) -> int:
        """Routes taken away since then (and perhaps put back)."""
        with self.lock:
            return sum(1 for when in self.removed.values() if when >= since)

    def wait_count(self, count: int, timeout: float,
                   alive: Callable[[], bool] = lambda: True) -> float | None:
        """When the routes first numbered `count`, waiting up to `timeout` s for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and alive():
            if (when := self.reached(count)) is not None:
                return when
            time.sleep(0.05)
        return self.reached(count)

    def dumped(self) -> int:
        """The routes as `ip route` lists them now (to check the count followed)."""
        out = self.host.ip("-4", "route", "show", "table", "main").stdout
        return sum(1 for line in out.splitlines() if (subnet := line.split(" ", 1)[0]).endswith(
            f"/{NODE_CIDR_MASK}") and ipaddress.IPv4Network(subnet).subnet_of(self._network))

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self._socket.close()


def write_net_conf(bed: Testbed, host: Host, net_conf: dict[str, Any]) -> str:
    path = os.path.join(bed.workdir, f"{host.netns}-net-conf.json")
    with open(path, "w") as f:
        json.dump(net_conf, f)
    return path


class KubePyflanneld(Flanneld):
    """pyflanneld in kube mode on a host, for Node `node` (its kubelet's certificate)."""

    def __init__(self, bed: Testbed, host: Host, api: KubeApi, node: str,
                 net_conf: dict[str, Any], *flags: str,
                 environ: dict[str, str] | None = None) -> None:
        super().__init__(bed, host, None, "", "--kube-subnet-mgr",
                         f"--kubeconfig-file={api.node_kubeconfig(node)}",
                         f"--net-config-path={write_net_conf(bed, host, net_conf)}", *flags,
                         environ={"NODE_NAME": node, **(environ or {})})
        self.node = node
        self.started = 0.0

    def start(self, handed: Any = None) -> KubePyflanneld:
        self.started = time.monotonic()
        super().start(handed)
        return self


class KubeFlanneld(RealFlanneld):
    """flanneld v0.20.2 in kube mode on a host, for Node `node`, with EVENT_QUEUE_DEPTH
    `queue_depth` (kube-flannel.yml's 5000 unless told)."""

    def __init__(self, bed: Testbed, host: Host, api: KubeApi, node: str,
                 net_conf: dict[str, Any], queue_depth: int = FLANNEL_QUEUE_DEPTH,
                 binary: str = REFERENCE_FLANNELD) -> None:
        subnet_file = os.path.join(bed.workdir, f"{host.netns}-flanneld.env")
        LoggedDaemon.__init__(
            self, host, subnet_file, os.path.join(bed.workdir, f"{host.netns}-flanneld.log"),
            ["ip", "netns", "exec", host.netns, binary, "--kube-subnet-mgr",
             f"--kubeconfig-file={api.node_kubeconfig(node)}",
             f"--net-config-path={write_net_conf(bed, host, net_conf)}", "--iface=eth0",
             f"--subnet-file={subnet_file}"],
            {"NODE_NAME": node, "EVENT_QUEUE_DEPTH": str(queue_depth)})
        self.node = node
        self.started = 0.0

    def start(self) -> KubeFlanneld:
        self.started = time.monotonic()
        super().start()
        return self

    def goroutines(self, timeout: float = 10.0) -> str:
        """SIGQUIT (by PID): the Go runtime prints every goroutine's stack and exits. Their
        text, from the log."""
        assert self.process is not None
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.stop()
        log = self.log()
        start = log.find("goroutine ")
        return log[start:] if start >= 0 else ""


def wait_file(path: str, timeout: float, alive: Callable[[], bool]) -> float | None:
    """When `path` appeared, waiting up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if os.path.exists(path):
            return time.monotonic()
        time.sleep(0.02)
    return time.monotonic() if os.path.exists(path) else None


def running(daemon: LoggedDaemon) -> Callable[[], bool]:
    return lambda: daemon.process is not None and daemon.process.poll() is None


def wait_logged(daemon: LoggedDaemon, text: str, timeout: float, count: int = 1
                ) -> float | None:
    """When the daemon's log held `text` `count` times, waiting up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running(daemon)():
        if daemon.log().count(text) >= count:
            return time.monotonic()
        time.sleep(0.02 if count == 1 else 0.1)
    return None


def memory_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def mib(pid: int, field: str = "VmHWM") -> float:
    return memory_kib(pid, field) / 1024


def blocked_where(stacks: str) -> str:
    """What flanneld's goroutine dump says it waits on: the event handler's channel send and
    the goroutine waiting for the informer's sync."""
    found = []
    for block in stacks.split("\n\n"):
        head = block.split("\n", 1)[0]
        if "handleAddLeaseEvent" in block:
            found.append(f"{head.strip()} in kube.(*kubeSubnetManager).handleAddLeaseEvent")
        elif "HasSynced" in block:
            found.append(f"{head.strip()} in HasSynced")
    return "; ".join(found) or "(no such goroutine in the dump)"


def seconds(value: float | None, since: float, digits: int = 2) -> str:
    return "never" if value is None else f"{value - since:.{digits}f}"


class Joined:
    """A daemon's start-up: seconds from its process's start to subnet.env, to its "running"
    line and to every Node routed (`routes` routes on its host; or, after a restart, when the
    routes are still there from the run before, `routes` "subnet added" lines); its CPU then.
    On a first start also its peak RSS at three moments: when its first route came (it has
    listed the Nodes), when the last came, and SETTLE seconds later (the backend's clean-up of
    what no lease explains runs after the routes: pyflanneld's prune)."""

    SETTLE = 3.0

    def __init__(self, daemon: KubePyflanneld | KubeFlanneld, watch: RouteWatch, routes: int,
                 running_line: str, timeout: float, *, by_log: bool = False) -> None:
        self.daemon = daemon
        alive = running(daemon)
        assert daemon.process is not None
        pid = daemon.process.pid
        samples: list[tuple[int, float]] = []  # (routes, VmHWM) every 10 ms
        sampling = not by_log

        def sample() -> None:
            while sampling and alive():
                try:
                    peak = mib(pid)  # read first: a sample with no route yet is from before one
                    samples.append((len(watch.present), peak))
                except (OSError, RuntimeError):
                    return
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        self.env = wait_file(daemon.subnet_file, timeout, alive)
        self.running = wait_logged(daemon, running_line, timeout) if self.env else None
        self.routed = None
        if self.env and by_log:
            self.routed = wait_logged(daemon, "subnet added", START_TIMEOUT, routes)
        elif self.env:
            self.routed = watch.wait_count(routes, START_TIMEOUT, alive)
            if self.routed is not None:
                time.sleep(max(0.0, self.routed + self.SETTLE - time.monotonic()))
        sampling = False
        sampler.join()
        self.cpu = process_cpu_seconds(pid) if alive() else float("nan")
        # VmHWM before the first route, once every route was in, and at the end.
        self.peaks = [max((hwm for n, hwm in samples if n == 0), default=float("nan")),
                      next((hwm for n, hwm in samples if n >= routes), float("nan")),
                      samples[-1][1] if samples else float("nan")]

    @property
    def ok(self) -> bool:
        return self.routed is not None

    def times(self) -> tuple[str, str, str]:
        since = self.daemon.started
        return (f"{seconds(self.env, since)} s", f"{seconds(self.running, since)} s",
                f"{seconds(self.routed, since)} s")

    def peak_phases(self) -> str:
        return " / ".join(f"{peak:.1f}" for peak in self.peaks)


class Run:
    """One run's control plane, hosts, daemons and figures: rows of (measure, pyflanneld,
    flanneld)."""

    def __init__(self, bed: Testbed, args: argparse.Namespace) -> None:
        self.bed = bed
        self.args = args
        self.nodes = args.nodes
        self.fakes = self.nodes - len(REAL_HOSTS)
        self.rows: list[tuple[str, str, str]] = []
        self.notes: list[str] = []
        self.steps: list[tuple[str, float]] = []
        self.api: KubeApi | None = None
        self.pool: ApiPool | None = None
        self.churn_pool: ApiPool | None = None
        self.daemons: list[LoggedDaemon] = []
        self.watches: dict[str, RouteWatch] = {}
        self.step_started = time.monotonic()

    def step(self, text: str) -> None:
        now = time.monotonic()
        self.steps.append((text, now - self.step_started))
        print(f"[{time.strftime('%H:%M:%S')}] {text} ({now - self.step_started:.1f} s)",
              flush=True)
        self.step_started = now

    def row(self, measure: str, pyflanneld: str, flanneld: str = "") -> None:
        self.rows.append((measure, pyflanneld, flanneld))

    def close(self) -> None:
        for daemon in self.daemons:
            if isinstance(daemon, Flanneld):
                daemon.terminate()
        for daemon in self.daemons:
            try:
                daemon.stop()  # type: ignore[attr-defined]
            except AssertionError as err:  # it ignored SIGTERM: killed, and said
                print(err, file=sys.stderr)
        for watch in self.watches.values():
            watch.close()
        for pool in (self.pool, self.churn_pool):
            if pool is not None:
                pool.close()
        if self.api is not None:
            self.api.stop()

    def control_plane_memory(self) -> str:
        api = self.api
        assert api is not None and api.apiserver and api.controller_manager
        assert api.etcd.process is not None
        return (f"{mib(api.apiserver.pid, 'VmRSS'):.0f} / "
                f"{mib(api.controller_manager.pid, 'VmRSS'):.0f} / "
                f"{mib(api.etcd.process.pid, 'VmRSS'):.0f}")

    def main(self) -> int:
        args = self.args
        started = time.monotonic()
        self.api = api = KubeApi(self.bed, None, cluster_cidr=CLUSTER_CIDR,
                                 node_cidr_mask_size=NODE_CIDR_MASK)
        self.step("the API server ready")
        self.pool = pool = ApiPool(api)
        self.churn_pool = ApiPool(api, CHURN_CONNECTIONS)

        hosts = {name: self.bed.add_host(name) for name in REAL_HOSTS}
        for name, host in hosts.items():
            api.register_node(name, host.underlay_ip)
            self.watches[name] = RouteWatch(host)
        cidrs = {name: api.wait_pod_cidr(name) for name in hosts}
        self.step(f"the real hosts registered, their podCIDRs from nodeipam: {cidrs}")

        a, b, c = (KubePyflanneld(self.bed, hosts[name], api, name, NET_CONF)
                   for name in ("a", "b", "c"))
        self.daemons += [a, b, c]
        for daemon in (a, b):
            daemon.start()
        for daemon in (a, b):
            daemon.wait_subnet(timeout=60)
        for name in ("a", "b"):
            if self.watches[name].wait_count(1, 30) is None:
                raise RuntimeError(f"{name} did not route its peer")
        self.step("a and b running and routing each other")

        # The Nodes, created as the admin on CONNECTIONS connections, while a and b run.
        cpu = {d.node: process_cpu_seconds(d.process.pid) for d in (a, b) if d.process}
        created_from = time.monotonic()
        pool.all([lambda i=i: pool.create(fake_node(i)) for i in range(self.fakes)])
        created = time.monotonic()
        create_seconds = created - created_from
        self.step(f"{self.fakes} Nodes created ({self.fakes / create_seconds:.0f}/s)")
        absorbed = [self.watches[n].wait_count(self.fakes + 1, START_TIMEOUT)
                    for n in ("a", "b")]
        absorb_cpu = [process_cpu_seconds(d.process.pid) - cpu[d.node]
                      for d in (a, b) if d.process]
        self.step("a and b routed them, after the last was created: "
                  + ", ".join(f"{seconds(t, created)} s" for t in absorbed))
        served = pool.check("GET", f"/api/v1/nodes/{fake_node(0)['metadata']['name']}")
        whole_from = time.monotonic()
        whole = pool.check("GET", "/api/v1/nodes?limit=500&resourceVersion=0")
        whole_seconds = time.monotonic() - whole_from
        whole_count, whole_mb = len(json.loads(whole)["items"]), len(whole) / 1e6
        del whole
        self.step(f"flanneld's list: {whole_count} Nodes, {whole_mb:.1f} MB in "
                  f"{whole_seconds:.2f} s")
        memory_after_create = self.control_plane_memory()
        self.notes += [
            f"Nodes in the API server: {self.nodes}, four of them real hosts (a, b, c: "
            f"pyflanneld; f: flanneld), {self.fakes} made up; a Node as served (JSON, "
            f"managedFields included): {len(served) / 1024:.1f} KiB",
            f"creating the {self.fakes} Nodes ({CONNECTIONS} connections, as the admin): "
            f"{create_seconds:.1f} s ({self.fakes / create_seconds:.0f} Nodes/s); a and b, "
            "running meanwhile, routed every one "
            + " / ".join(f"{seconds(t, created)} s" for t in absorbed)
            + " after the last was created, taking "
            + " / ".join(f"{s:.1f}" for s in absorb_cpu) + " s of CPU each",
            f"the whole list as flanneld asks for it (`limit=500&resourceVersion=0`, served "
            f"from the watch cache, the limit ignored): {whole_count} Nodes, {whole_mb:.1f} MB, "
            f"in {whole_seconds:.2f} s; pyflanneld lists in pages of 50 from etcd",
        ]

        # c (pyflanneld) joins, then f (flanneld, as kube-flannel.yml runs it).
        c.start()
        joined_c = Joined(c, self.watches["c"], self.fakes + 2, "running: watching Nodes",
                          START_TIMEOUT)
        self.step("c joined: subnet.env, running, routed after " + ", ".join(joined_c.times()))
        f: KubeFlanneld | None = None
        joined_f: Joined | None = None
        if args.flanneld:
            f = KubeFlanneld(self.bed, hosts["f"], api, "f", NET_CONF, FLANNEL_QUEUE_DEPTH,
                             args.flanneld)
            self.daemons.append(f)
            f.start()
            joined_f = Joined(f, self.watches["f"], self.fakes + 3, "Running backend",
                              args.deadlock_wait)
            self.step("f joined: subnet.env, running, routed after "
                      + ", ".join(joined_f.times()))
        else:
            self.notes.append("no flanneld given (--flanneld): its column is empty")
        f_runs = joined_f is not None and joined_f.ok
        header = (f"c, with {self.fakes + 2} annotated Nodes besides its own",
                  f"f, with {self.fakes + 3} annotated Nodes besides its own, "
                  f"EVENT_QUEUE_DEPTH={FLANNEL_QUEUE_DEPTH}" if f else "-")
        self.row("a daemon joining", *header)
        if joined_f is not None and not joined_f.env:
            self.notes.append("flanneld deadlocked on its first start: "
                              + self.deadlock(f, self.fakes + 3))  # type: ignore[arg-type]
        for i, measure in enumerate(("... subnet.env written, after its process started",
                                     "... \"running\" logged (flanneld: \"Running backend\")",
                                     "... every Node routed (a /24 route on flannel.1 each)")):
            self.row(measure, joined_c.times()[i], joined_f.times()[i] if joined_f else "")
        self.row("... CPU until every Node was routed", f"{joined_c.cpu:.1f} s",
                 f"{joined_f.cpu:.1f} s" if joined_f else "")
        self.row(f"... peak RSS (VmHWM), MiB, before its first route (the Nodes listed) / once "
                 f"every route was in / {Joined.SETTLE:.0f} s later",
                 joined_c.peak_phases(), joined_f.peak_phases() if joined_f else "")

        pyflannelds = [a, b, c]
        live: list[LoggedDaemon] = [*pyflannelds, *([f] if f_runs and f else [])]

        def peaks() -> tuple[str, str]:
            return (" / ".join(f"{mib(d.process.pid):.1f}" for d in pyflannelds if d.process),
                    f"{mib(f.process.pid):.1f}" if f_runs and f and f.process else "")

        self.row("peak RSS (VmHWM) after start-up, MiB: a / b / c; f", *peaks())

        # 100 Nodes a second change: a label, then the public-ip annotation.
        for kind in ("label", "lease"):
            churn = self.churn(kind, live)
            self.row(f"{churn['count']} changes at 100 Nodes/s ({churn['rate']:.1f}/s "
                     f"achieved) of {churn['what']}: CPU, % of a core, a / b / c; f",
                     churn["pyflanneld"], churn["flanneld"])
            self.row("... lease changes applied: \"subnet changed\" (pyflanneld), the "
                     "fdb entry's new address (flanneld)", churn["applied"],
                     churn["flanneld_applied"])
            self.row("... routes removed and put back meanwhile", churn["gaps"],
                     churn["flanneld_gaps"])
            self.row("... the API server's CPU meanwhile, % of a core", churn["apiserver"])

        # A new Node, a few times.
        added, removed = self.new_nodes(live)
        self.row(f"a new annotated Node: POST to its route, median (max) of "
                 f"{NEW_NODE_SAMPLES}, s: a / b / c; f", added["pyflanneld"], added["flanneld"])
        self.row("... DELETE to its route gone", removed["pyflanneld"], removed["flanneld"])
        self.row("peak RSS (VmHWM) at the end, MiB: a / b / c; f", *peaks())
        for name, watch in self.watches.items():
            if watch.overflows:
                self.notes.append(f"the route monitor of {name} overflowed {watch.overflows} "
                                  "times")
        self.notes.append("RSS of the API server / controller manager / etcd, MiB: "
                          f"{memory_after_create} once the Nodes were created, "
                          f"{self.control_plane_memory()} at the end")

        # Past flanneld's queue: one more annotated Node; c and f started again.
        if f is not None and f_runs:
            annotated = self.fakes + 5
            depth = min(FLANNEL_QUEUE_DEPTH, annotated - 1)
            pool.create(fake_node(self.fakes + 100, "one-more"))
            self.watches["c"].wait_count(self.fakes + 4, 30)
            for daemon in (c, f):
                daemon.stop()
            c.environ["EVENT_QUEUE_DEPTH"] = f.environ["EVENT_QUEUE_DEPTH"] = str(depth)
            os.unlink(c.subnet_file)  # so that the time to it is this run's
            c.start()
            again = Joined(c, self.watches["c"], self.fakes + 4, "running: watching Nodes",
                           START_TIMEOUT, by_log=True)
            self.step("c again: " + ", ".join(again.times()))
            f.start()
            outcome = self.deadlock(f, annotated)
            self.step(f"f again: {outcome}")
            self.row(f"started again with {annotated} annotated Nodes, its own among them, "
                     f"EVENT_QUEUE_DEPTH={depth}: subnet.env / every Node routed",
                     f"{again.times()[0]} / {again.times()[2]}", outcome)

            if c.process is not None:
                self.row("... its peak RSS (VmHWM), MiB", f"{mib(c.process.pid):.1f}")
        self.notes.append(f"the whole run: {time.monotonic() - started:.0f} s")
        return 0 if joined_c.ok and all(t is not None for t in absorbed) else 1

    def deadlock(self, f: KubeFlanneld, annotated: int) -> str:
        """flanneld started with `annotated` Nodes: whether it writes subnet.env within
        --deadlock-wait s; if not, where its goroutines wait (SIGQUIT ends it)."""
        wait = self.args.deadlock_wait
        env = wait_file(f.subnet_file, max(0.0, f.started + wait - time.monotonic()),
                        running(f))
        if env is not None:
            return f"subnet.env after {env - f.started:.2f} s: no deadlock"
        assert f.process is not None
        cpu = process_cpu_seconds(f.process.pid)
        log = f.log()
        waiting = "Waiting 10m0s for node controller to sync" in log
        synced = "Node controller sync successful" in log
        stacks = f.goroutines()
        return (f"**deadlocked**: no subnet.env after {wait:.0f} s "
                f"({'logged' if waiting else 'did not log'} \"Waiting 10m0s for node controller "
                f"to sync\", {'then' if synced else 'never'} \"sync successful\"; "
                f"{cpu:.1f} s of CPU); its goroutines (SIGQUIT): {blocked_where(stacks)}")

    def churn(self, kind: str, daemons: list[LoggedDaemon]) -> dict[str, Any]:
        """CHURN_RATE Nodes a second change for --churn-seconds: a label, or the public-ip
        annotation (a lease change each); each daemon's CPU meanwhile."""
        assert self.churn_pool is not None and self.api is not None and self.api.apiserver
        pool = self.churn_pool
        count = int(CHURN_RATE * self.args.churn_seconds)
        indexes = [i % self.fakes for i in range(count)]
        if kind == "label":
            what = "a label"
            calls = [lambda i=i, n=n: pool.patch(
                f"node-{i:05d}", {"metadata": {"labels": {"pyflannel.test/churn": str(n)}}})
                for n, i in enumerate(indexes)]
        else:
            what = "the public-ip annotation"
            calls = [lambda i=i: pool.patch(
                f"node-{i:05d}", {"metadata": {"annotations": {
                    ANNOTATION + "public-ip": fake_public_ip(i, 1)}}}) for i in indexes]
        pids = {id(d): d.process.pid for d in daemons if d.process}
        apiserver = self.api.apiserver.pid
        before = {key: process_cpu_seconds(pid) for key, pid in pids.items()}
        api_before = process_cpu_seconds(apiserver)
        changed_before = {id(d): d.log().count("subnet changed") for d in daemons}
        by_netns = {watch.host.netns: watch for watch in self.watches.values()}
        churn_from = time.monotonic()
        elapsed = pool.paced(calls, CHURN_RATE)
        changes = len(set(indexes)) if kind == "lease" else 0
        for d in daemons:  # until the last changes have reached the daemons
            if isinstance(d, Flanneld):
                wait_logged(d, "subnet changed", 30, changed_before[id(d)] + changes)
        time.sleep(1.0)
        window = time.monotonic() - churn_from
        cpu = {key: 100 * (process_cpu_seconds(pid) - before[key]) / window
               for key, pid in pids.items()}
        api_cpu = 100 * (process_cpu_seconds(apiserver) - api_before) / window
        py = [d for d in daemons if isinstance(d, Flanneld)]
        fl = [d for d in daemons if isinstance(d, KubeFlanneld)]

        def gaps(d: LoggedDaemon) -> int:
            """Routes taken away meanwhile (and put back): a lease change's gap."""
            return by_netns[d.host.netns].removed_since(churn_from)

        result = {
            "what": what, "count": count, "rate": count / elapsed,
            "pyflanneld": " / ".join(f"{cpu[id(d)]:.1f}" for d in py),
            "applied": " / ".join(
                f"{d.log().count('subnet changed') - changed_before[id(d)]} of {changes}"
                for d in py),
            "apiserver": f"{api_cpu:.0f}",
            "flanneld": " / ".join(f"{cpu[id(d)]:.1f}" for d in fl),
            "flanneld_applied": " / ".join(self.fdb_applied(d, indexes) for d in fl)
            if kind == "lease" else ("0 of 0" if fl else ""),
            "gaps": " / ".join(str(gaps(d)) for d in py),
            "flanneld_gaps": " / ".join(str(gaps(d)) for d in fl),
        }
        self.step(f"{kind} churn: {result}")
        return result

    def fdb_applied(self, daemon: LoggedDaemon, indexes: list[int]) -> str:
        """How many of the changed Nodes' VTEP MACs point at their new PublicIP in the host's
        forwarding database (flanneld logs no lease change)."""
        out = daemon.host.run("bridge", "fdb", "show", "dev", "flannel.1").stdout
        dst = dict(re.findall(r"^(\S+) dst (\S+)", out, re.MULTILINE))
        wanted = set(indexes)
        applied = sum(1 for i in wanted if dst.get(fake_vtep_mac(i)) == fake_public_ip(i, 1))
        return f"{applied} of {len(wanted)}"

    def new_nodes(self, daemons: list[LoggedDaemon]) -> tuple[dict[str, str], dict[str, str]]:
        """NEW_NODE_SAMPLES times: an annotated Node created, routed everywhere, deleted,
        unrouted everywhere. Seconds from the request to the route, per host."""
        assert self.pool is not None
        by_netns = {watch.host.netns: watch for watch in self.watches.values()}
        hosts = {id(d): by_netns[d.host.netns] for d in daemons}
        to_route: dict[int, list[float]] = {key: [] for key in hosts}
        to_gone: dict[int, list[float]] = {key: [] for key in hosts}
        for sample in range(NEW_NODE_SAMPLES):
            index = self.fakes + 10 + sample
            node = fake_node(index, f"new-{sample}")
            cidr = fake_cidr(index)
            posted = time.monotonic()
            self.pool.create(node)
            for key, watch in hosts.items():
                to_route[key].append(self.wait_subnet(watch, cidr, True) - posted)
            deleted = time.monotonic()
            self.pool.delete(node["metadata"]["name"])
            for key, watch in hosts.items():
                to_gone[key].append(self.wait_subnet(watch, cidr, False) - deleted)
            time.sleep(0.5)

        def summary(values: dict[int, list[float]], kind: type) -> str:
            return " / ".join(f"{statistics.median(values[id(d)]):.3f} "
                              f"({max(values[id(d)]):.3f})" for d in daemons
                              if isinstance(d, kind))

        added = {"pyflanneld": summary(to_route, Flanneld),
                 "flanneld": summary(to_route, KubeFlanneld)}
        removed = {"pyflanneld": summary(to_gone, Flanneld),
                   "flanneld": summary(to_gone, KubeFlanneld)}
        self.step(f"new Nodes: {added}, deleted: {removed}")
        return added, removed

    @staticmethod
    def wait_subnet(watch: RouteWatch, cidr: str, present: bool, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with watch.lock:
                if present and cidr in watch.present:
                    return watch.added[cidr]
                if not present and cidr not in watch.present and cidr in watch.removed:
                    return watch.removed[cidr]
            time.sleep(0.005)
        raise RuntimeError(f"{watch.host.netns}: {cidr} "
                           f"{'not routed' if present else 'still routed'} after {timeout} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--flanneld", default=REFERENCE_FLANNELD if os.path.exists(
        REFERENCE_FLANNELD) else "", help="flanneld v0.20.2 ('' leaves it out)")
    parser.add_argument("--churn-seconds", type=float, default=CHURN_SECONDS)
    parser.add_argument("--deadlock-wait", type=float, default=DEADLOCK_WAIT)
    args = parser.parse_args()
    if args.nodes < len(REAL_HOSTS) + 1:
        parser.error(f"--nodes must be at least {len(REAL_HOSTS) + 1}")
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()
    with Testbed() as bed:
        run = Run(bed, args)
        try:
            status = run.main()
        finally:
            run.close()
    m = machine()
    print(f"\n- command: `python -m perf.kubescale --nodes {args.nodes}"
          f"{' --flanneld ' + args.flanneld if args.flanneld else ''}`\n- date: {started_at}\n"
          f"- machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python "
          f"{m['python']}; load average at the start {load[0]:.1f}\n"
          f"- net-conf: `{json.dumps(NET_CONF)}`; kube-apiserver and kube-controller-manager "
          f"v1.19.0 (`--cluster-cidr={CLUSTER_CIDR} --node-cidr-mask-size={NODE_CIDR_MASK}`), "
          "etcd 3.4\n")
    for note in run.notes:
        print(f"- {note}")
    print("\n| measure | pyflanneld | flanneld v0.20.2 |\n| --- | --- | --- |")
    for measure, pyflanneld, flanneld in run.rows:
        print(f"| {measure} | {pyflanneld} | {flanneld} |")
    print("\nsteps: " + "; ".join(f"{text}: {took:.1f} s" for text, took in run.steps))
    return status


if __name__ == "__main__":
    sys.exit(main())
