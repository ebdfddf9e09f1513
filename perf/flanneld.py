"""flanneld itself (a binary the user gives, e.g. ../shared/reference/flanneld-v0.20.2) on a
testbed host, for the rows that measure flanneld's own backends beside pyflannel.

Quirks of flanneld v0.20.2 this works around: it can miss the lease events of a host that joins
at the same moment (so the caller starts one host at a time and checks the routes), it panics on
SIGTERM (so its exit status means nothing) and leaves its iptables rules and its VXLAN device
behind (so clean() removes them)."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import time

from tests.cluster import PREFIX
from tests.etcd import EtcdServer
from tests.testbed import Host, Testbed

FORWARD_CHAIN, FORWARD_COMMENT = "FLANNEL-FWD", "flanneld forward"


class RealFlanneld:
    """One flanneld process in a host's namespace, on etcd's v3 API, with its own subnet file
    and log in the testbed's workdir."""

    def __init__(self, binary: str, bed: Testbed, host: Host, etcd: EtcdServer) -> None:
        self.host = host
        self.subnet_file = os.path.join(bed.workdir, f"{host.netns}-flanneld.env")
        self.log_path = os.path.join(bed.workdir, f"{host.netns}-flanneld.log")
        self.command = ["ip", "netns", "exec", host.netns, binary,
                        f"--etcd-endpoints={etcd.endpoint}", f"--etcd-prefix={PREFIX}",
                        "--iface=eth0", f"--subnet-file={self.subnet_file}",
                        *etcd.client_flags()]
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self) -> RealFlanneld:
        if os.path.exists(self.subnet_file):
            os.unlink(self.subnet_file)  # so wait_subnet() reads this run's
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            # `ip netns exec` execs the command, so this PID is flanneld's own.
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        """What the current (or last) run has logged."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def wait_subnet(self, timeout: float = 20.0) -> ipaddress.IPv4Network:
        """The subnet flanneld wrote to its subnet file."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.subnet_file):
                with open(self.subnet_file) as f:
                    env = dict(line.split("=", 1) for line in f.read().splitlines() if "=" in line)
                if "FLANNEL_SUBNET" in env:
                    return ipaddress.IPv4Network(env["FLANNEL_SUBNET"], strict=False)
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.host.netns}: flanneld wrote no subnet file in {timeout}s; "
                           f"{self.log_path}:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it hangs; its exit status is ignored (it panics)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def clean(self, device: str | None) -> None:
        """Remove what flanneld leaves behind: its FORWARD rules and chain, and `device`."""
        self.host.run("iptables", "-D", "FORWARD", "-m", "comment", "--comment",
                      FORWARD_COMMENT, "-j", FORWARD_CHAIN, check=False)
        self.host.run("iptables", "-F", FORWARD_CHAIN, check=False)
        self.host.run("iptables", "-X", FORWARD_CHAIN, check=False)
        if device:
            self.host.ip("link", "del", device, check=False)
