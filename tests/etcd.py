"""A real etcd (Debian's etcd-server 3.4, v2 API enabled) on a host of the testbed.

The tests read and write it with Debian's etcdctl, run inside the etcd host's namespace: an
independent client, so what they see in etcd is what any flanneld would see.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from tests.testbed import Host, Testbed, end_process, sh

CLIENT_PORT = 2379


@dataclass(frozen=True)
class Certificates:
    """A CA, a server certificate for an IP address and a client certificate, as PEM files."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_certificates(directory: str, server_ip: str) -> Certificates:
    os.makedirs(directory, exist_ok=True)

    def path(name: str) -> str:
        return os.path.join(directory, name)

    def openssl(*args: str) -> None:
        sh("openssl", *args)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", path("ca.key"), "-out", path("ca.pem"))
    for name, extension in (("server", f"subjectAltName=IP:{server_ip}"),
                            ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", path(f"{name}.key"), "-out", path(f"{name}.csr"))
        with open(path(f"{name}.ext"), "w") as f:
            f.write(extension + "\n")
        openssl("x509", "-req", "-in", path(f"{name}.csr"), "-CA", path("ca.pem"),
                "-CAkey", path("ca.key"), "-CAcreateserial", "-days", "2",
                "-extfile", path(f"{name}.ext"), "-out", path(f"{name}.pem"))
    return Certificates(path("ca.pem"), path("server.pem"), path("server.key"),
                        path("client.pem"), path("client.key"))


PEER_PORT = 2380


class EtcdServer:
    def __init__(self, bed: Testbed, tls: bool = False, *, host: Host | None = None,
                 name: str = "test", initial_cluster: str | None = None,
                 ipv6: bool = False) -> None:
        """With tls, etcd serves https only and asks clients for a certificate from its CA.
        Alone, it runs on a new host and is started at once; as `name` in `initial_cluster`
        (EtcdCluster's, on `host`), launch() and wait_healthy() start it once its peers are
        launched too. With `ipv6` (alone, without TLS) its host has an IPv6 address too and
        clients reach it there, as hosts of an IPv6-only underlay do."""
        for tool in ("etcd", "etcdctl"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"'{tool}' is missing (make install installs etcd-server, "
                                   "etcd-client)")
        self.host: Host = host or bed.add_host("etcd-tls" if tls else "etcd", ipv6=ipv6)
        self.name = name
        self.peer_url = (f"http://{self.host.underlay_ip}:{PEER_PORT}" if initial_cluster
                         else f"http://127.0.0.1:{PEER_PORT}")
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        scheme = "https" if tls else "http"
        self.endpoint = f"{scheme}://{self.host.underlay_ip}:{CLIENT_PORT}"
        if ipv6:
            self.endpoint = f"{scheme}://[{self.host.underlay_ipv6}]:{CLIENT_PORT}"
        self.certificates = (make_certificates(os.path.join(bed.workdir, "pki"),
                                               self.host.underlay_ip) if tls else None)
        self.data_dir = os.path.join(bed.workdir, self.host.netns + "-data")
        self.log_path = os.path.join(bed.workdir, self.host.netns + ".log")
        self.process: subprocess.Popen[bytes] | None = None
        if initial_cluster is None:
            self.start()

    def _tls_flags(self, server: bool) -> list[str]:
        c = self.certificates
        if c is None:
            return []
        if server:
            return ["--cert-file", c.server_cert, "--key-file", c.server_key,
                    "--trusted-ca-file", c.ca, "--client-cert-auth"]
        return ["--cacert", c.ca, "--cert", c.client_cert, "--key", c.client_key]

    def client_flags(self) -> list[str]:
        """pyflanneld's flags for this etcd's certificates (none without TLS)."""
        c = self.certificates
        return [] if c is None else ["--etcd-cafile", c.ca, "--etcd-certfile", c.client_cert,
                                     "--etcd-keyfile", c.client_key]

    def start(self) -> None:
        self.launch()
        self.wait_healthy()

    def launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.host.netns, "etcd", "--name", self.name,
                 "--data-dir", self.data_dir, "--enable-v2=true",
                 "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                 "--listen-peer-urls", self.peer_url,
                 "--initial-advertise-peer-urls", self.peer_url,
                 "--initial-cluster", self.initial_cluster, *self._tls_flags(True)],
                stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited at start; see {self.log_path}")
            if self.ctl("endpoint", "health", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"etcd did not become healthy; see {self.log_path}")

    def stop(self) -> None:
        """End the etcd this fixture started, by its PID."""
        if self.process is not None:
            end_process(self.process)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def ctl(self, *args: str, api: str = "v3", check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        tls = self._tls_flags(False)
        if api == "v2":  # etcdctl's v2 spelling of the same flags
            tls = [flag.replace("--cacert", "--ca-file").replace("--cert", "--cert-file")
                   .replace("--key", "--key-file") if flag.startswith("--") else flag
                   for flag in tls]
        return sh("ip", "netns", "exec", self.host.netns, "env", f"ETCDCTL_API={api[1:]}",
                  "etcdctl", "--endpoints", self.endpoint, *tls, *args, check=check)

    def put(self, key: str, value: str, api: str) -> None:
        if api == "v3":
            self.ctl("put", key, "--", value)
        else:
            self.ctl("set", "--", key, value, api="v2")

    def delete(self, key: str, api: str) -> None:
        self.ctl("del" if api == "v3" else "rm", key, api=api)

    def get_prefix(self, prefix: str, api: str) -> dict[str, str]:
        """Every key under prefix with its value, byte for byte."""
        if api == "v3":
            lines = self.ctl("get", "--prefix", prefix).stdout.splitlines()
            return dict(zip(lines[::2], lines[1::2], strict=True))
        listing = self.ctl("ls", "--recursive", "-p", prefix, api="v2", check=False)
        keys = [k for k in listing.stdout.splitlines() if k and not k.endswith("/")]
        # v2 lists and reads in two steps: a key that expires in between is not there any more.
        found = {}
        for key in keys:
            got = self.ctl("get", key, api="v2", check=False)
            if got.returncode == 0:
                found[key] = got.stdout.rstrip("\n")
            elif "Key not found" not in got.stderr:
                raise RuntimeError(f"etcdctl get {key} failed: {got.stderr.strip()}")
        return found

    def ttl(self, key: str, api: str) -> int:
        """Seconds the key has left to live."""
        if api == "v3":
            lease = self.ctl("get", key, "-w", "fields").stdout
            lease_id = next(line.split(":")[1].strip() for line in lease.splitlines()
                            if line.startswith('"Lease"'))
            out = self.ctl("lease", "timetolive", format(int(lease_id), "x")).stdout
            return int(out.split("remaining(")[1].split("s")[0])
        out = self.ctl("-o", "extended", "get", key, api="v2").stdout
        return int(next(line.split(":")[1] for line in out.splitlines()
                        if line.startswith("TTL:")))

    def compact(self) -> None:
        status = self.ctl("endpoint", "status", "-w", "fields").stdout
        revision = next(line.split(":")[1].strip() for line in status.splitlines()
                        if line.startswith('"Revision"'))
        self.ctl("compaction", revision)

    def flood_v2(self, key: str, count: int) -> None:
        """`count` v2 writes to one key, from one process: more than v2's 1000-event history."""
        script = ("import sys, urllib.request\n"
                  "for i in range(int(sys.argv[2])):\n"
                  "    urllib.request.urlopen(urllib.request.Request(\n"
                  "        sys.argv[1], data=f'value={i}'.encode(), method='PUT')).read()\n")
        self.host.run(sys.executable, "-c", script, f"{self.endpoint}/v2/keys{key}", str(count))


class EtcdCluster:
    """`size` etcd members, each on its own host of the testbed; `members[0]` is the `etcd`
    the single-server helpers (put, get_prefix...) read and write through."""

    def __init__(self, bed: Testbed, size: int = 3) -> None:
        hosts = [bed.add_host(f"etcd{i}") for i in range(size)]
        initial = ",".join(f"m{i}=http://{host.underlay_ip}:{PEER_PORT}"
                           for i, host in enumerate(hosts))
        self.members = [EtcdServer(bed, host=host, name=f"m{i}", initial_cluster=initial)
                        for i, host in enumerate(hosts)]
        try:
            for member in self.members:
                member.launch()
            for member in self.members:
                member.wait_healthy()
        except BaseException:
            self.stop()
            raise

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    def start_stopped(self) -> None:
        """Start every stopped member: all launched before any is waited for, since a member
        alone has no quorum to be healthy with."""
        stopped = [member for member in self.members if member.process is None]
        for member in stopped:
            member.launch()
        for member in stopped:
            member.wait_healthy()

    def leader(self) -> EtcdServer:
        for member in self.members:
            if member.process is None:
                continue
            status = member.ctl("endpoint", "status", "-w", "fields", check=False).stdout
            fields = dict(line.split(" : ", 1) for line in status.splitlines() if " : " in line)
            if fields.get('"Leader"') == fields.get('"MemberID"'):
                return member
        raise RuntimeError("no etcd member is the leader")

    def stop(self) -> None:
        for member in self.members:
            member.stop()
