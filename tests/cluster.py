"""pyflanneld daemons on testbed hosts: start, read their subnet.env and log, fetch their pages
and metrics, stop by PID. Used by the tests, `make demo` and perf/."""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Self

from control.host.subnetenv import read_variables
from tests.etcd import EtcdServer
from tests.testbed import Host, Testbed

PREFIX = "/coreos.com/network"
# The paper's Figure 2 config, with the udp backend on a non-default port.
FIGURE_2_CONFIG = {"Network": "10.0.0.0/8", "SubnetLen": 20, "SubnetMin": "10.10.0.0",
                   "SubnetMax": "10.99.0.0", "Backend": {"Type": "udp", "Port": 7890}}


class LoggedDaemon:
    """A daemon process in a host's namespace that logs to a file of the testbed and writes a
    subnet.env: what pyflanneld and flanneld have in common here."""

    def __init__(self, host: Host, subnet_file: str, log_path: str, command: list[str],
                 environ: dict[str, str] | None = None) -> None:
        """environ: variables added to this process's environment for the daemon."""
        self.host = host
        self.subnet_file = subnet_file
        self.log_path = log_path
        self.command = command
        self.environ = {**os.environ, **(environ or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self, handed: Mapping[str, int] | None = None) -> Self:
        """handed: descriptors by name, passed as systemd passes its fd store's to a restarted
        service (tests/fdstore.py)."""
        command, environ, preexec = self.command, self.environ, None
        if handed:
            names, fds = list(handed), list(handed.values())
            environ = {**environ, "LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": ":".join(names)}
            command = ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *command]

            def preexec() -> None:  # in the child: the fds at 3, 4, ... as systemd puts them
                high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64) for fd in fds]
                for target, fd in enumerate(high, start=3):
                    os.dup2(fd, target)
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            # `ip netns exec` (and sh's exec) execs the command, so this PID is the daemon's own.
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=environ, preexec_fn=preexec,
                                            close_fds=not handed)
        return self

    def log(self) -> str:
        """What the current (or last) run has logged."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def subnet_env(self) -> dict[str, str]:
        return read_variables(self.subnet_file)

    def wait_subnet(self, timeout: float = 20.0) -> ipaddress.IPv4Network:
        """The subnet this daemon leased, once its subnet.env is written."""
        subnet = self.wait_env_subnet("FLANNEL_SUBNET", timeout)
        assert isinstance(subnet, ipaddress.IPv4Network)
        return subnet

    def wait_ipv6_subnet(self, timeout: float = 20.0) -> ipaddress.IPv6Network:
        """The IPv6 subnet this daemon leased, once its subnet.env is written."""
        subnet = self.wait_env_subnet("FLANNEL_IPV6_SUBNET", timeout)
        assert isinstance(subnet, ipaddress.IPv6Network)
        return subnet

    def wait_env_subnet(self, key: str, timeout: float
                        ) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.subnet_file) and key in self.subnet_env():
                return ipaddress.ip_network(self.subnet_env()[key], strict=False)
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.host.netns}: no subnet.env after {timeout}s; "
                             f"{self.log_path}:\n{self.log()[-3000:]}")


class Flanneld(LoggedDaemon):
    """One pyflanneld process."""

    def __init__(self, bed: Testbed, host: Host, etcd: EtcdServer | None, api: str,
                 *extra: str, iface: str | None = "eth0",
                 python_args: tuple[str, ...] = ("-m", "control"),
                 program: list[str] | None = None,
                 environ: dict[str, str] | None = None) -> None:
        """python_args: how Python runs pyflanneld (a test may wrap the entry point); program:
        another pyflanneld command altogether (an installed one); environ: variables for it
        (FLANNELD_*, NOTIFY_SOCKET...). Without etcd, the Kubernetes flags are in `extra`."""
        subnet_file = os.path.join(bed.workdir, f"{host.netns}.env")
        store = [] if etcd is None else ["--etcd-endpoints", etcd.endpoint, "--etcd-api", api,
                                         *etcd.client_flags()]
        super().__init__(host, subnet_file, os.path.join(bed.workdir, f"{host.netns}.log"),
                         ["ip", "netns", "exec", host.netns,
                          *(program or [sys.executable, *python_args]),
                          *store, "--subnet-file", subnet_file,
                          *(["--iface", iface] if iface else []), *extra], environ)

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.host.netns}: {text!r} not logged {count} time(s) in "
                             f"{timeout}s; log:\n{self.log()[-3000:]}")

    def terminate(self) -> None:
        """Send SIGTERM by PID; stop() then waits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by PID and wait; the exit status (None if it was not running)."""
        if self.process is None:
            return None
        self.terminate()
        process, self.process = self.process, None
        if process.poll() is None:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGUSR1)  # its threads' stacks, into the log
                time.sleep(1)
                process.kill()
                process.wait()
                raise AssertionError(f"{self.host.netns}: pyflanneld ignored SIGTERM; log:\n"
                                     f"{self.log()[-6000:]}") from None
        return process.returncode


def stop_all(daemons: list[Flanneld]) -> None:
    """Stop them together: each may take a moment to let go of etcd."""
    for daemon in daemons:
        daemon.terminate()
    for daemon in daemons:
        daemon.stop()


def put_config(etcd: EtcdServer, api: str, config: dict[str, object] | str,
               prefix: str = PREFIX) -> None:
    text = config if isinstance(config, str) else json.dumps(config)
    etcd.put(f"{prefix}/config", text, api)


class Cluster:
    """A test's view of the shared testbed and etcd: its own prefix, its own daemons."""

    def __init__(self, bed: Testbed, etcd: EtcdServer, api: str, prefix: str) -> None:
        self.bed, self.etcd, self.api, self.prefix = bed, etcd, api, prefix
        self.daemons: list[Flanneld] = []

    def put(self, key: str, value: str) -> None:
        self.etcd.put(self.prefix + key, value, self.api)

    def config(self, config: dict[str, object] | str) -> None:
        self.put("/config", config if isinstance(config, str) else json.dumps(config))

    def leases(self) -> dict[str, str]:
        return self.etcd.get_prefix(self.prefix + "/subnets/", self.api)

    def daemon(self, *extra: str, start: bool = True, iface: str | None = "eth0") -> Flanneld:
        daemon = Flanneld(self.bed, self.bed.add_host(), self.etcd, self.api,
                          "--etcd-prefix", self.prefix, *extra, iface=iface)
        self.daemons.append(daemon)
        return daemon.start() if start else daemon


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout}s")


def key_of(subnet: ipaddress.IPv4Network, prefix: str) -> str:
    return f"{prefix}/subnets/{subnet.network_address}-{subnet.prefixlen}"


# Fetches each URL inside a host's namespace; prints [status, body] per URL as JSON.
FETCH = """import json, sys, urllib.request, urllib.error
out = []
for url in sys.argv[1:]:
    try:
        with urllib.request.urlopen(url) as r:
            out.append([r.status, r.read().decode()])
    except urllib.error.HTTPError as e:
        out.append([e.code, e.read().decode()])
print(json.dumps(out))
"""


def fetch(daemon: Flanneld, *urls: str) -> list[tuple[int, str]]:
    result = daemon.host.run(sys.executable, "-c", FETCH, *urls)
    return [(status, body) for status, body in json.loads(result.stdout)]


# Scraped metrics: (sample name, sorted labels) -> value.
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(daemon: Flanneld, port: int) -> Metrics:
    """The daemon's metrics, served on 127.0.0.1:port of its host."""
    from prometheus_client.parser import text_string_to_metric_families

    (status, body), = fetch(daemon, f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """One sample of scraped metrics."""
    return metrics[(name, tuple(sorted(labels.items())))]
