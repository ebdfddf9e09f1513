"""A real Kubernetes control plane for tests: the reference builds of kube-apiserver and
kube-controller-manager v1.19.0 (../shared/reference/) on a host of the testbed, storing in etcd.

    api = KubeApi(bed, etcd)          # etcd: the tests' EtcdServer, or None for one of its own
    try:
        api.register_node("n1", bed.hosts[0].underlay_ip)   # as a kubelet does
        api.wait_pod_cidr("n1")                             # "10.244.0.0/24"
    finally:
        api.stop()                    # before the caller stops etcd

The API server runs in the network namespace of a host of its own (`api.host`) and listens on
that host's underlay address, so the test hosts reach it over the testbed's bridge, as nodes reach
a control plane; nothing listens outside the testbed. The test process talks to it from that
namespace (`request`, `kubectl`), and so can a helper command (`api.host.run(...)`).

It has its own CA (openssl), a serving certificate for its address, the service IP and the
`kubernetes.default.svc` names; client certificates for an admin (O=system:masters) and for each
registered node (CN=system:node:<name>, O=system:nodes), with a kubeconfig file for each;
`--authorization-mode=Node,RBAC` with the NodeRestriction admission plugin, as kubeadm's control
planes run; service-account signing keys. Its keys in etcd are under a prefix of its own
(`--etcd-prefix=/kubeapi-<random>`) and it never compacts etcd (`--etcd-compaction-interval=0`: its
periodic compaction would cut the whole keyspace, the tests' flannel keys included). The
controller manager runs only the `nodeipam` (spec.podCIDR for each Node) and
`serviceaccount-token` controllers. With an IPv6 CIDR in `cluster_cidr` (dual-stack, or IPv6
alone) both run with 1.19's alpha IPv6DualStack gate on, and each Node gets spec.podCIDRs of
the families given (tests/test_kube_dualstack.py).

Start-up, measured on this 2-core machine with other work beside it (load average 2.5-4): the
certificates take 0.3 s (P-256 keys), the API server answers /readyz 4-5 s after launch (7.7 s
at worst seen), so KubeApi() returns in about 5 s. The controller manager's node IPAM controller
sleeps 10 s before its first list of Nodes (a wait.Poll in 1.19's cidr_allocator.go, no flag
shortens it; started beside the API server it gains nothing, as it waits for the API server's
health first), so the first Node's podCIDR comes 10.5-11 s after KubeApi() returns, later ones
in 0.1-0.7 s. restart() takes about 7 s (STOP_GRACE, then 4-5 s), stop() about 1 s. Timeouts
are generous for a loaded machine: 120 s for /readyz, 90 s for a podCIDR or a token.

Where ../shared/reference/ is absent (a user's machine) KubeApi() raises ReferenceMissing, a
unittest.SkipTest that pytest reports as a skip with the reason; with the folder present, anything
missing or failing is an error.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import unittest
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tests.etcd import EtcdServer
from tests.testbed import Host, Testbed, end_process, inside, sh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(os.path.dirname(REPO), "shared", "reference")
KUBE_APISERVER = os.path.join(REFERENCE, "kube-apiserver-v1.19.0")
KUBE_CONTROLLER_MANAGER = os.path.join(REFERENCE, "kube-controller-manager-v1.19.0")

SERVICE_CIDR = "10.96.0.0/12"
# The annotations a kubelet puts on the Node it registers (pkg/kubelet/kubelet_node_status.go).
KUBELET_ANNOTATIONS: Mapping[str, str] = {
    "node.alpha.kubernetes.io/ttl": "0",
    "volumes.kubernetes.io/controller-managed-attach-detach": "true",
}
# kube-flannel.yml's ClusterRole (flannel v0.20.2).
FLANNEL_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
]
READY_TIMEOUT = 120.0
POD_CIDR_TIMEOUT = 90.0
STOP_GRACE = 2.0
# Certificates on P-256 keys: made in a few ms each, where RSA's take a loaded machine ~0.2 s.
EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


class ReferenceMissing(unittest.SkipTest):
    """The reference builds are not beside the repository: pytest skips the caller."""


class KubeError(RuntimeError):
    """An API request answered with an error status."""

    def __init__(self, method: str, path: str, status: int, body: object) -> None:
        super().__init__(f"{method} {path}: {status} {body}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Identity:
    """Who a request is made as: a client certificate (cert, key) or a bearer token."""

    name: str
    cert: str | None = None
    key: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class ServiceAccountFiles:
    """A ServiceAccount's credentials as a pod sees them: `directory` holds `token`, `ca.crt`
    and `namespace` (the layout of /var/run/secrets/kubernetes.io/serviceaccount; each field is
    the path of its file), and `kubeconfig` is a kubeconfig file with the same token."""

    directory: str
    token: str
    ca_crt: str
    namespace: str
    kubeconfig: str

    def token_value(self) -> str:
        with open(self.token) as f:
            return f.read()


def _free_port(netns: str, address: str) -> int:
    with inside(netns):
        s = socket.socket()
    with s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class KubeApi:
    """kube-apiserver and kube-controller-manager v1.19.0 on a new host of `bed`. Started at
    once (KubeApi() returns when /readyz answers ok); stop() ends them, by PID."""

    def __init__(self, bed: Testbed, etcd: EtcdServer | None = None, *,
                 cluster_cidr: str = "10.244.0.0/16", node_cidr_mask_size: int = 24,
                 node_cidr_mask_size_ipv6: int = 64, name: str = "kube") -> None:
        """etcd: the store (the tests' EtcdServer; the API server's keys go under a prefix of
        its own); None starts an etcd on a host of its own (`<name>-etcd`), stopped by stop().
        cluster_cidr: the Nodes' podCIDRs come from it; "<IPv4 CIDR>,<IPv6 CIDR>" gives each
        Node one of each family (spec.podCIDRs), an IPv6 CIDR alone IPv6 ones, each a
        /node_cidr_mask_size (IPv4) or /node_cidr_mask_size_ipv6.
        name: the API server's host (give another for a second KubeApi on one testbed)."""
        if not os.path.isdir(REFERENCE):
            raise ReferenceMissing(f"no reference Kubernetes builds at {REFERENCE}")
        for binary in (KUBE_APISERVER, KUBE_CONTROLLER_MANAGER):
            if not os.access(binary, os.X_OK):
                raise RuntimeError(f"{binary} is missing or not executable")
        self.bed = bed
        cidrs = [ipaddress.ip_network(cidr) for cidr in cluster_cidr.split(",")]
        self.cluster_cidr = ",".join(str(cidr) for cidr in cidrs)
        self.node_cidr_mask_size = node_cidr_mask_size
        self.node_cidr_mask_size_ipv6 = node_cidr_mask_size_ipv6
        # 1.19 hands out IPv6 podCIDRs (and a Node two of them) only with its alpha
        # IPv6DualStack gate on, in the controller manager (which then refuses the single-family
        # --node-cidr-mask-size) and in the API server (which validates spec.podCIDRs).
        self.ipv6 = any(cidr.version == 6 for cidr in cidrs)
        self.apiserver: subprocess.Popen[bytes] | None = None
        self.controller_manager: subprocess.Popen[bytes] | None = None
        self._own_etcd: EtcdServer | None = None
        self.controller_manager_started = time.monotonic()
        self.dir = tempfile.mkdtemp(prefix=f"{bed.prefix}-kube-")
        self.timings: dict[str, float] = {}
        try:
            self.etcd = etcd if etcd is not None else self._start_etcd(bed, name)
            self.etcd_prefix = f"/kubeapi-{os.urandom(4).hex()}"
            self.host: Host = bed.add_host(name)
            self.address = self.host.underlay_ip
            self.port = _free_port(self.host.netns, self.address)
            self.server = f"https://{self.address}:{self.port}"
            self.apiserver_log = os.path.join(bed.workdir, f"{self.host.netns}-apiserver.log")
            self.controller_manager_log = os.path.join(
                bed.workdir, f"{self.host.netns}-controller-manager.log")
            started = time.monotonic()
            self._make_pki()
            self.timings["certificates"] = time.monotonic() - started
            started = time.monotonic()
            self._launch_apiserver()
            self.wait_ready()
            self.timings["apiserver_ready"] = time.monotonic() - started
            # After: it exits if the API server is not healthy within its first 10 s. (Started
            # together they gain nothing: it waits for the API server's health first.)
            self._launch_controller_manager()
        except BaseException:
            self.stop()
            raise

    # ---- processes ----

    def _start_etcd(self, bed: Testbed, name: str) -> EtcdServer:
        self._own_etcd = EtcdServer(bed, host=bed.add_host(f"{name}-etcd"))
        return self._own_etcd

    def _launch_apiserver(self) -> None:
        p = self._path
        args = [
            KUBE_APISERVER,
            f"--etcd-servers={self.etcd.endpoint}", f"--etcd-prefix={self.etcd_prefix}",
            "--etcd-compaction-interval=0",
            *self._etcd_tls_flags(),
            f"--bind-address={self.address}", f"--advertise-address={self.address}",
            f"--secure-port={self.port}", "--insecure-port=0",
            f"--cert-dir={p('apiserver-certs')}",
            f"--tls-cert-file={p('apiserver.pem')}", f"--tls-private-key-file={p('apiserver.key')}",
            f"--client-ca-file={p('ca.pem')}",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            f"--service-account-key-file={p('sa.pub')}",
            f"--service-account-signing-key-file={p('sa.key')}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true", "--profiling=false", *self._feature_gates(),
        ]
        with open(self.apiserver_log, "ab") as log:
            self.apiserver = subprocess.Popen(["ip", "netns", "exec", self.host.netns, *args],
                                              stdout=log, stderr=subprocess.STDOUT)

    def _etcd_tls_flags(self) -> list[str]:
        c = self.etcd.certificates
        if c is None:
            return []
        return [f"--etcd-cafile={c.ca}", f"--etcd-certfile={c.client_cert}",
                f"--etcd-keyfile={c.client_key}"]

    def _launch_controller_manager(self) -> None:
        self.controller_manager_started = time.monotonic()
        p = self._path
        args = [
            KUBE_CONTROLLER_MANAGER,
            f"--kubeconfig={p('controller-manager.kubeconfig')}",
            "--controllers=nodeipam,serviceaccount-token",
            "--allocate-node-cidrs=true", f"--cluster-cidr={self.cluster_cidr}",
            *([f"--node-cidr-mask-size-ipv4={self.node_cidr_mask_size}",
               f"--node-cidr-mask-size-ipv6={self.node_cidr_mask_size_ipv6}"] if self.ipv6
              else [f"--node-cidr-mask-size={self.node_cidr_mask_size}"]),
            *self._feature_gates(),
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-private-key-file={p('sa.key')}",
            f"--root-ca-file={p('ca.pem')}",
            "--use-service-account-credentials=false", "--leader-elect=false",
            "--port=0", "--secure-port=0", "--profiling=false",
        ]
        with open(self.controller_manager_log, "ab") as log:
            self.controller_manager = subprocess.Popen(
                ["ip", "netns", "exec", self.host.netns, *args],
                stdout=log, stderr=subprocess.STDOUT)

    def _feature_gates(self) -> list[str]:
        return ["--feature-gates=IPv6DualStack=true"] if self.ipv6 else []

    def _check_controller_manager(self) -> None:
        if self.controller_manager is None or self.controller_manager.poll() is not None:
            raise RuntimeError("kube-controller-manager is not running; "
                               f"{self.controller_manager_log}:\n"
                               f"{self._tail(self.controller_manager_log)}")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until the API server's /readyz answers ok to the admin (its post-start hooks, the
        bootstrap RBAC roles among them, have run)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.apiserver is None or self.apiserver.poll() is not None:
                raise RuntimeError(f"kube-apiserver exited at start; {self.apiserver_log}:\n"
                                   f"{self._tail(self.apiserver_log)}")
            try:
                status, body = self._raw("GET", "/readyz", None, self.admin, "", timeout=5)
                if status == 200:
                    return
                last = f"{status} {body!r}"
            except (OSError, http.client.HTTPException) as e:
                last = repr(e)
            time.sleep(0.2)
        raise RuntimeError(f"kube-apiserver not ready after {timeout} s ({last}); "
                           f"{self.apiserver_log}:\n{self._tail(self.apiserver_log)}")

    def _end_apiserver(self) -> None:
        """SIGTERM by PID, SIGKILL after STOP_GRACE s: with watches open (the controller
        manager's, a flanneld's) the 1.19 API server, which stops listening at once, otherwise
        waits up to 60 s for them to end (it does not close them)."""
        if self.apiserver is not None:
            end_process(self.apiserver, timeout=STOP_GRACE)
        self.apiserver = None

    def restart(self, down: float = 0.0) -> None:
        """Stop the API server (SIGTERM, by PID; SIGKILL after STOP_GRACE s, so its clients'
        watches are cut then), leave it down `down` seconds more, and start it again on the
        same address and store; returns once it is ready. The controller manager stays up and
        reconnects."""
        self._end_apiserver()
        time.sleep(down)
        started = time.monotonic()
        self._launch_apiserver()
        self.wait_ready()
        self.timings["apiserver_restart"] = time.monotonic() - started

    @contextmanager
    def controller_manager_paused(self) -> Iterator[None]:
        """The controller manager stopped (SIGSTOP, by PID) for the block: Nodes registered
        meanwhile get no podCIDR until it goes on."""
        assert self.controller_manager is not None
        self.controller_manager.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.controller_manager.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """End the controller manager, then the API server (before etcd: with etcd gone first it
        hangs on SIGTERM), then an etcd of its own; each by its PID. Removes the temp dir."""
        if self.controller_manager is not None:
            end_process(self.controller_manager, timeout=STOP_GRACE)
        self.controller_manager = None
        self._end_apiserver()
        if self._own_etcd is not None:
            self._own_etcd.stop()
            self._own_etcd = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> KubeApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _tail(path: str, size: int = 4000) -> str:
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - size))
                return f.read().decode(errors="replace")
        except OSError as e:
            return repr(e)

    # ---- certificates and kubeconfigs ----

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _openssl(self, *args: str) -> None:
        sh("openssl", *args)

    def _client_cert(self, file: str, subject: str) -> Identity:
        """A client certificate of the CA; subject as openssl -subj (O= groups, CN= user)."""
        key, cert = self._path(f"{file}.key"), self._path(f"{file}.pem")
        self._sign(file, subject, "extendedKeyUsage=clientAuth\nkeyUsage=critical,"
                   "digitalSignature\n")
        return Identity(subject, cert=cert, key=key)

    def _sign(self, file: str, subject: str, extensions: str) -> None:
        p = self._path
        self._openssl("req", *EC_KEY, "-nodes", "-subj", subject,
                      "-keyout", p(f"{file}.key"), "-out", p(f"{file}.csr"))
        with open(p(f"{file}.ext"), "w") as f:
            f.write(extensions)
        self._openssl("x509", "-req", "-in", p(f"{file}.csr"), "-CA", p("ca.pem"),
                      "-CAkey", p("ca.key"), "-CAcreateserial", "-days", "2",
                      "-extfile", p(f"{file}.ext"), "-out", p(f"{file}.pem"))

    def _make_pki(self) -> None:
        p = self._path
        self._openssl("req", "-x509", *EC_KEY, "-nodes", "-days", "2",
                      "-subj", "/CN=kubernetes-test-ca", "-keyout", p("ca.key"),
                      "-out", p("ca.pem"))
        service_ip = ipaddress.IPv4Network(SERVICE_CIDR).network_address + 1
        names = ["kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"]
        self._sign("apiserver", "/CN=kube-apiserver",
                   "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n"
                   "subjectAltName=" + ",".join(
                       [f"IP:{self.address}", f"IP:{service_ip}"] + [f"DNS:{n}" for n in names])
                   + "\n")
        self.admin = self._client_cert("admin", "/O=system:masters/CN=kubernetes-admin")
        self.admin_kubeconfig = self.write_kubeconfig("admin.kubeconfig", self.admin)
        cm = self._client_cert("controller-manager",
                               "/O=system:masters/CN=system:kube-controller-manager")
        self.write_kubeconfig("controller-manager.kubeconfig", cm)
        self._openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                      "-out", p("sa.key"))
        self._openssl("pkey", "-in", p("sa.key"), "-pubout", "-out", p("sa.pub"))
        os.makedirs(p("apiserver-certs"))
        self.ca = p("ca.pem")
        self._node_identities: dict[str, Identity] = {}

    def write_kubeconfig(self, file: str, identity: Identity) -> str:
        """A kubeconfig file (JSON, which is YAML) in the temp dir for `identity` against this
        API server; returns its path."""
        user: dict[str, str] = {}
        if identity.token is not None:
            user["token"] = identity.token
        else:
            assert identity.cert and identity.key
            user = {"client-certificate": identity.cert, "client-key": identity.key}
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": self.server, "certificate-authority": self._path("ca.pem")}}],
            "users": [{"name": identity.name, "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": identity.name}}],
            "current-context": "test",
        }
        path = self._path(file)
        with open(path, "w") as f:
            json.dump(config, f, indent=1)
        return path

    def node_identity(self, name: str) -> Identity:
        """The kubelet's client certificate for node `name` (made on first use)."""
        if name not in self._node_identities:
            self._node_identities[name] = self._client_cert(
                f"node-{name}", f"/O=system:nodes/CN=system:node:{name}")
            self.write_kubeconfig(f"node-{name}.kubeconfig", self._node_identities[name])
        return self._node_identities[name]

    def node_kubeconfig(self, name: str) -> str:
        self.node_identity(name)
        return self._path(f"node-{name}.kubeconfig")

    # ---- requests ----

    def _raw(self, method: str, path: str, body: bytes | None, identity: Identity,
             content_type: str, timeout: float = 30) -> tuple[int, bytes]:
        response, connection = self._open(method, path, body, identity, content_type, timeout)
        try:
            return response.status, response.read()
        finally:
            connection.close()

    def _open(self, method: str, path: str, body: bytes | None, identity: Identity,
              content_type: str, timeout: float
              ) -> tuple[http.client.HTTPResponse, http.client.HTTPSConnection]:
        context = ssl.create_default_context(cafile=self._path("ca.pem"))
        if identity.cert is not None:
            assert identity.key is not None
            context.load_cert_chain(identity.cert, identity.key)
        headers = {"Accept": "application/json"}
        if identity.token is not None:
            headers["Authorization"] = f"Bearer {identity.token}"
        if body is not None:
            headers["Content-Type"] = content_type
        connection = http.client.HTTPSConnection(self.address, self.port, context=context,
                                                 timeout=timeout)
        try:
            with inside(self.host.netns):  # the socket lives in the API server's namespace
                connection.connect()
            connection.request(method, path, body=body, headers=headers)
            return connection.getresponse(), connection
        except BaseException:
            connection.close()
            raise

    def request(self, method: str, path: str, body: object = None, *,
                identity: Identity | None = None, content_type: str = "application/json",
                check: bool = True, timeout: float = 30) -> tuple[int, Any]:
        """One request (as the admin unless `identity`): (status, decoded JSON body, or the
        text when it is not JSON). With check, a status >= 400 raises KubeError."""
        data = None if body is None else json.dumps(body).encode()
        status, raw = self._raw(method, path, data, identity or self.admin, content_type,
                                timeout)
        try:
            decoded: Any = json.loads(raw) if raw else None
        except ValueError:
            decoded = raw.decode(errors="replace")
        if check and status >= 400:
            raise KubeError(method, path, status, decoded)
        return status, decoded

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)[1]

    @contextmanager
    def watch(self, path: str, *, identity: Identity | None = None, timeout: float = 30
              ) -> Iterator[Iterator[dict[str, Any]]]:
        """A watch (`path` with its ?watch=1&resourceVersion=...) as an iterator of its events;
        the connection closes when the block ends. A read that waits `timeout` raises."""
        response, connection = self._open("GET", path, None, identity or self.admin, "", timeout)
        try:
            if response.status != 200:
                raise KubeError("GET", path, response.status, response.read())

            def events() -> Iterator[dict[str, Any]]:
                while line := response.readline():
                    if line.strip():
                        yield json.loads(line)
            yield events()
        finally:
            connection.close()

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """kubectl as the admin, run in the API server's namespace. Whichever kubectl is on PATH
        (Debian's kubernetes-client, or the Cloud SDK's on these machines)."""
        if shutil.which("kubectl") is None:
            raise RuntimeError("'kubectl' is missing (Debian's kubernetes-client has it)")
        return self.host.run("kubectl", f"--kubeconfig={self.admin_kubeconfig}",
                             f"--cache-dir={self._path('kubectl-cache')}", *args, check=check)

    # ---- nodes ----

    def register_node(self, name: str, addresses: str | Sequence[str],
                      annotations: Mapping[str, str] | None = None,
                      labels: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Create Node `name` as a kubelet registers itself: with the node's own client
        certificate, the kubelet's annotations (KUBELET_ANNOTATIONS; `annotations` replaces them,
        {} makes a Node with no annotations at all), its usual labels and each address as an
        InternalIP (and its name as Hostname). Returns the created Node."""
        addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        metadata: dict[str, Any] = {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
                       "beta.kubernetes.io/arch": "amd64", **(labels or {})},
        }
        annotations = KUBELET_ANNOTATIONS if annotations is None else annotations
        if annotations:
            metadata["annotations"] = dict(annotations)
        node = {
            "apiVersion": "v1", "kind": "Node", "metadata": metadata, "spec": {},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]
                       + [{"type": "Hostname", "address": name}]},
        }
        return self.request("POST", "/api/v1/nodes", node, identity=self.node_identity(name))[1]

    def node(self, name: str) -> dict[str, Any]:
        return self.get(f"/api/v1/nodes/{name}")

    def nodes(self) -> list[dict[str, Any]]:
        return self.get("/api/v1/nodes")["items"]

    def wait_pod_cidr(self, name: str, timeout: float = POD_CIDR_TIMEOUT) -> str:
        """Node `name`'s spec.podCIDR, once the controller manager has set it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cidr = self.node(name).get("spec", {}).get("podCIDR")
            if cidr:
                self.timings.setdefault("first_pod_cidr",
                                        time.monotonic() - self.controller_manager_started)
                return str(cidr)
            self._check_controller_manager()
            time.sleep(0.1)
        raise AssertionError(f"node {name} got no podCIDR in {timeout} s; "
                             f"{self.controller_manager_log}:\n"
                             f"{self._tail(self.controller_manager_log)}")

    def delete_node(self, name: str) -> None:
        self.request("DELETE", f"/api/v1/nodes/{name}")

    # ---- service accounts and RBAC ----

    def ensure_namespace(self, namespace: str) -> None:
        status, _ = self.request("POST", "/api/v1/namespaces",
                                 {"apiVersion": "v1", "kind": "Namespace",
                                  "metadata": {"name": namespace}}, check=False)
        if status not in (201, 409):
            raise KubeError("POST", "/api/v1/namespaces", status, namespace)

    def service_account_files(self, namespace: str, name: str,
                              timeout: float = POD_CIDR_TIMEOUT) -> ServiceAccountFiles:
        """Create ServiceAccount namespace/name (and the namespace), wait for the controller
        manager to fill its token Secret, and write what a pod gets mounted."""
        self.ensure_namespace(namespace)
        self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts",
                     {"apiVersion": "v1", "kind": "ServiceAccount",
                      "metadata": {"name": name}})
        deadline = time.monotonic() + timeout
        data: dict[str, str] = {}
        while not data.get("token"):
            if time.monotonic() > deadline:
                raise AssertionError(f"no token for ServiceAccount {namespace}/{name} in "
                                     f"{timeout} s; {self.controller_manager_log}:\n"
                                     f"{self._tail(self.controller_manager_log)}")
            account = self.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")
            for ref in account.get("secrets") or []:
                secret = self.get(f"/api/v1/namespaces/{namespace}/secrets/{ref['name']}")
                if secret.get("type") == "kubernetes.io/service-account-token":
                    data = secret.get("data") or {}
            if not data.get("token"):
                self._check_controller_manager()
                time.sleep(0.1)
        directory = self._path(f"serviceaccount-{namespace}-{name}")
        os.makedirs(directory, exist_ok=True)
        for key in ("token", "ca.crt", "namespace"):
            with open(os.path.join(directory, key), "wb") as f:
                f.write(base64.b64decode(data[key]))
        token = base64.b64decode(data["token"]).decode()
        kubeconfig = self.write_kubeconfig(f"serviceaccount-{namespace}-{name}.kubeconfig",
                                           self.service_account_identity(namespace, name, token))
        return ServiceAccountFiles(directory, os.path.join(directory, "token"),
                                   os.path.join(directory, "ca.crt"),
                                   os.path.join(directory, "namespace"), kubeconfig)

    @staticmethod
    def service_account_identity(namespace: str, name: str, token: str) -> Identity:
        return Identity(f"system:serviceaccount:{namespace}:{name}", token=token)

    def bind_cluster_role(self, role: str, namespace: str, service_account: str,
                          rules: list[dict[str, list[str]]] = FLANNEL_RULES) -> None:
        """Create ClusterRole `role` with `rules` (kube-flannel.yml's by default) and bind it to
        the ServiceAccount, as kube-flannel.yml does for flannel."""
        self.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles",
                     {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                      "metadata": {"name": role}, "rules": rules})
        self.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
                     {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                      "metadata": {"name": role},
                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role},
                      "subjects": [{"kind": "ServiceAccount", "name": service_account,
                                    "namespace": namespace}]})
