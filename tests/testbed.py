"""Test hosts in network namespaces: the one testbed the tests and perf/ build on.

An underlay namespace holds a bridge; each host namespace joins it by a veth pair and gets an
address from 198.18.0.0/15, and with `ipv6` one from 2001:db8::/32 too. A host may carry a
container namespace, added by pyflannel's `flannel` CNI plugin, which delegates to the real
`bridge` plugin with `host-local` IPAM on the host's subnet, as flannel's does. Every name starts
with a per-run prefix, and Testbed.close() deletes exactly the namespaces it made.
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Self

CLONE_NEWNET = 0x40000000
UNDERLAY = ipaddress.IPv4Network("198.18.0.0/24")
UNDERLAY6 = ipaddress.IPv6Network("2001:db8:0:1::/64")  # the hosts' IPv6 addresses, with ipv6
# Room for `make scale`'s 500 hosts (the tests' fake peers are 198.18.0.250 and up, or off the
# /24: a testbed this large is only scale's).
LARGE_UNDERLAY = ipaddress.IPv4Network("198.18.0.0/22")
CNI_PATH = "/usr/lib/cni"
# pyflannel's CNI plugin, installed beside the interpreter (the venv's bin/).
FLANNEL_CNI = os.path.join(os.path.dirname(sys.executable), "flannel")
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its stderr, so a broken setup says what broke."""
    result = subprocess.run(args, capture_output=True, text=True)
    if check and result.returncode != 0:
        command = " ".join(args)
        raise RuntimeError(f"{command} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def inside(netns: str) -> Iterator[None]:
    """Run the body with the calling thread in network namespace `netns`.

    Sockets and TUN devices opened in the body belong to that namespace for life, so they can be
    used afterwards from any thread.
    """
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{netns}") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


@dataclass
class Host:
    netns: str
    underlay_ip: str
    container_netns: str | None = None
    container_ip: str | None = None
    underlay_ipv6: str | None = None
    container_ipv6: str | None = None

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "-n", self.netns, *args, check=check)

    def link(self, device: str) -> dict:
        """`ip -d -j link show` of one device (its address, ifindex, linkinfo...)."""
        return json.loads(self.ip("-d", "-j", "link", "show", device).stdout)[0]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.netns, *args, check=check)

    def in_container(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.container_netns, "this host has no container"
        return sh("ip", "netns", "exec", self.container_netns, *args, check=check)


class ClosedOnSigterm:
    """A `with` whose close() also runs when the run is ended by SIGTERM (a CI timeout, `kill`):
    the signal unwinds as ^C does, through every fixture and `with`, so that what was made is
    deleted."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._sigterm = None
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Testbed(ClosedOnSigterm):
    """Namespaces joined by a veth underlay through a bridge. Use as a context manager."""

    __test__ = False  # a fixture, not a test class

    def __init__(self, prefix: str | None = None,
                 underlay: ipaddress.IPv4Network = UNDERLAY) -> None:
        self.prefix = prefix or f"pf{os.getpid() % 100000}{os.urandom(2).hex()}"
        self.underlay_network = underlay
        self.namespaces: list[str] = []
        self.hosts: list[Host] = []
        self.workdir = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        self.underlay = self._netns("ul")
        sh("ip", "-n", self.underlay, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.underlay, "link", "set", "br0", "up")

    def _netns(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        self.namespaces.append(name)  # first: an interrupt may come while `ip` makes it
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def add_host(self, name: str | None = None, ipv6: bool = False, ipv4: bool = True) -> Host:
        """A host on the underlay: its N-th address on eth0 (MTU 1500), forwarding on; with
        `ipv6` also the N-th address of UNDERLAY6 (no duplicate address detection, so that it
        is usable at once, as on every device made in the host later). Without `ipv4` (which
        implies `ipv6`) eth0 has only the IPv6 address: an IPv6-only underlay
        (host.underlay_ip is then "")."""
        ipv6 = ipv6 or not ipv4
        index = len(self.hosts) + 1
        if index >= self.underlay_network.num_addresses - 1:
            raise RuntimeError(f"the underlay {self.underlay_network} has no room for host {index}")
        host = Host(self._netns(name or f"h{index}"),
                    str(self.underlay_network.network_address + index))
        if ipv6:
            host.underlay_ipv6 = str(UNDERLAY6.network_address + index)
            for scope in ("all", "default"):
                host.run("sysctl", "-qw", f"net.ipv6.conf.{scope}.accept_dad=0",
                         f"net.ipv6.conf.{scope}.forwarding=1")
        port = f"u{index}"
        sh("ip", "-n", self.underlay, "link", "add", port, "type", "veth",
           "peer", "name", "eth0", "netns", host.netns)
        sh("ip", "-n", self.underlay, "link", "set", port, "master", "br0", "up")
        if ipv4:
            host.ip("addr", "add", f"{host.underlay_ip}/{self.underlay_network.prefixlen}",
                    "dev", "eth0")
        else:
            host.underlay_ip = ""
        if host.underlay_ipv6 is not None:
            host.ip("addr", "add", f"{host.underlay_ipv6}/{UNDERLAY6.prefixlen}", "dev", "eth0")
        host.ip("link", "set", "eth0", "up")
        host.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.hosts.append(host)
        return host

    def add_container(self, host: Host, subnet: str | None, mtu: int,
                      network: str = "10.0.0.0/8", ipv6_subnet: str | None = None,
                      ipv6_network: str | None = None) -> str:
        """A container namespace on `host`, added as a runtime adds one: the `flannel` CNI
        plugin reads a subnet.env for the host's subnet, MTU and Network (FLANNEL_IPMASQ=true,
        as flannel's manifest runs flanneld with --ip-masq, so the bridge does not masquerade)
        and delegates to `bridge` (cni0 as gateway) with host-local IPAM. A default route is
        added to the plugin's Network route. With `ipv6_subnet` and `ipv6_network` the container
        gets an IPv6 address of that subnet too (host.container_ipv6), and an IPv6 default
        route; without `subnet` only that one. Returns the container's first address."""
        host.container_netns = self._netns(host.netns.removeprefix(self.prefix + "-") + "c")
        lines, routes = [], []
        if subnet is not None:
            lease = ipaddress.IPv4Network(subnet, strict=False)
            lines += [f"FLANNEL_NETWORK={network}",
                      f"FLANNEL_SUBNET={lease.network_address + 1}/{lease.prefixlen}"]
            routes.append({"dst": "0.0.0.0/0"})
        if ipv6_subnet is not None:
            lease6 = ipaddress.IPv6Network(ipv6_subnet, strict=False)
            lines += [f"FLANNEL_IPV6_NETWORK={ipv6_network}",
                      f"FLANNEL_IPV6_SUBNET={lease6.network_address + 1}/{lease6.prefixlen}"]
            routes.append({"dst": "::/0"})
        subnet_env = os.path.join(self.workdir, f"{host.netns}-cni-subnet.env")
        with open(subnet_env, "w") as f:
            f.write("\n".join([*lines, f"FLANNEL_MTU={mtu}", "FLANNEL_IPMASQ=true", ""]))
        conf = {
            "cniVersion": "1.0.0", "name": "pyflannel", "type": "flannel",
            "subnetFile": subnet_env, "dataDir": os.path.join(self.workdir, "cni-flannel"),
            "ipam": {"routes": routes,
                     "dataDir": os.path.join(self.workdir, "cni", host.netns)},
        }
        env = {**os.environ, "CNI_COMMAND": "ADD", "CNI_CONTAINERID": host.container_netns,
               "CNI_NETNS": f"/run/netns/{host.container_netns}", "CNI_IFNAME": "eth0",
               "CNI_PATH": CNI_PATH}
        result = subprocess.run(["ip", "netns", "exec", host.netns, FLANNEL_CNI],
                                input=json.dumps(conf), env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"CNI flannel ADD on {host.netns} failed: {result.stdout}"
                               f"{result.stderr}")
        addresses = [ip["address"].split("/")[0] for ip in json.loads(result.stdout)["ips"]]
        host.container_ip = next((a for a in addresses if ":" not in a), None)
        host.container_ipv6 = next((a for a in addresses if ":" in a), None)
        return addresses[0]

    def close(self) -> None:
        for name in reversed(self.namespaces):
            sh("ip", "netns", "del", name, check=False)
        self.namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)



def end_process(process: subprocess.Popen, sig: int = signal.SIGTERM,
                timeout: float = 10.0) -> None:
    """Send `sig` to a process we started (by PID), wait, and SIGKILL it if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def configure_tun(host: Host, tun: str, subnet: str, network: str, mtu: int) -> None:
    """Address and route a fast path's TUN as flanneld does: the subnet's address as a /32,
    the MTU, and a route for the whole Network through it."""
    address = ipaddress.IPv4Network(subnet).network_address
    host.ip("addr", "add", f"{address}/32", "dev", tun)
    host.ip("link", "set", tun, "mtu", str(mtu), "up")
    host.ip("route", "add", network, "dev", tun)


def tcp_transfer(server_ns: str, server_ip: str, client_ns: str, *, nbytes: int | None = None,
                 seconds: float | None = None, timeout: float = 60.0) -> int:
    """Send a stream of pseudo-random bytes from client_ns to server_ns over TCP, for nbytes or
    for `seconds`, and check that exactly what was sent arrived. Returns the byte count."""
    family = socket.AF_INET6 if ":" in server_ip else socket.AF_INET
    with inside(server_ns):
        listener = socket.create_server((server_ip, 0), family=family)
    with inside(client_ns):
        client = socket.socket(family)
    listener.settimeout(timeout)
    client.settimeout(timeout)
    received = hashlib.sha256()
    received_bytes = 0

    def serve() -> None:
        nonlocal received_bytes
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(timeout)
            while chunk := conn.recv(1 << 16):
                received.update(chunk)
                received_bytes += len(chunk)

    server = threading.Thread(target=serve)
    server.start()
    sent = hashlib.sha256()
    sent_bytes = 0
    block = os.urandom(1 << 16)
    try:
        client.connect((server_ip, listener.getsockname()[1]))
        deadline = time.monotonic() + (seconds or timeout)
        while (nbytes is None or sent_bytes < nbytes) and time.monotonic() < deadline:
            chunk = block if nbytes is None else block[: nbytes - sent_bytes]
            client.sendall(chunk)
            sent.update(chunk)
            sent_bytes += len(chunk)
            block = block[1:] + block[:1]
        client.shutdown(socket.SHUT_WR)
        server.join(timeout)
    finally:
        client.close()
        listener.close()
    assert not server.is_alive(), "the receiver did not see the end of the stream"
    assert nbytes is None or sent_bytes == nbytes, f"sent only {sent_bytes} of {nbytes} bytes"
    assert received_bytes == sent_bytes, f"sent {sent_bytes} bytes, {received_bytes} arrived"
    assert received.digest() == sent.digest(), "the bytes that arrived differ from those sent"
    return sent_bytes
