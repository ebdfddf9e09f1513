"""Test hosts that are emulated guests on another kernel (default: Debian 12's 6.1), on the
testbed's bridge beside its namespace hosts.

Each guest is QEMU under TCG (this machine's /dev/kvm is PVM, which cannot run Debian's kernels),
booted by virtme-ng's `virtme-run` with the kernel of Debian's generic `linux-image-6.1.0-*-amd64`
package, unpacked (never installed) under /var/cache/pyflannel by `make deb`. The guest's root is
this machine's, shared read-only over 9p, so it runs the same .venv, CNI plugins and tools. /tmp
is a tmpfs of its own, /var an overlay of this machine's with a tmpfs on top, /run virtme's tmpfs;
the testbed's workdir is shared read-write at its own path, so a daemon's log and subnet.env are
files the tests read as they read a namespace host's. Its virtio NIC (eth0) is on a tap on the
underlay bridge, with the address the testbed would have given the next host.

Commands run inside through a small agent (this module, run as `python -m tests.guests agent` by
the guest's init) over a virtio-serial port of its own: one JSON line a request, each answered by
id, so commands run concurrently, independent of the guest's network (a test may cut or flood the
underlay) and of its console (kernel messages). When the host side of the port goes away the agent
exits and the guest powers off, so a guest does not outlive the test process that booted it.
"""

from __future__ import annotations

import glob
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Self

from tests.cluster import Flanneld, LoggedDaemon, wait_for
from tests.etcd import EtcdServer
from tests.flanneld import RealFlanneld
from tests.testbed import FLANNEL_CNI, ClosedOnSigterm, Testbed, sh

# Where `make deb` unpacks kernel packages: <KERNEL_CACHE>/<package>/{boot,lib/modules}.
KERNEL_CACHE = "/var/cache/pyflannel"
# A kernel image to boot instead of the newest unpacked one (its modules beside it, as a package
# lays them out: <root>/boot/vmlinuz-<version> and <root>/lib/modules/<version>).
KERNEL_VARIABLE = "PYFLANNEL_GUEST_KERNEL"
AGENT_PORT = "pyflannel.agent"
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Under TCG a guest is slow to boot (about 10 s alone) and slower with two booting on two cores;
# past this, something is wrong and the console says what.
BOOT_TIMEOUT = 240.0
# Per guest: one vCPU each (TCG runs one thread a vCPU; this machine has two cores), and memory
# enough for pyflanneld, a container and the tests' tools.
GUEST_MEMORY = "1G"
GUEST_CPUS = 1
CONSOLE_TAIL = 60  # lines of console kept to say why a guest failed


class GuestError(RuntimeError):
    """A guest that did not boot, or whose agent went away; says why, with its console's tail."""


def find_kernel() -> str:
    """The guest kernel image: $PYFLANNEL_GUEST_KERNEL, or the newest 6.1 unpacked by make deb."""
    chosen = os.environ.get(KERNEL_VARIABLE)
    if chosen:
        if not os.path.isfile(chosen):
            raise GuestError(f"{KERNEL_VARIABLE}={chosen}: no such kernel image")
        return chosen
    images = glob.glob(os.path.join(KERNEL_CACHE, "linux-image-6.1.*", "boot", "vmlinuz-6.1.*"))
    if not images:
        raise GuestError(f"no guest kernel under {KERNEL_CACHE} (make deb unpacks Debian 12's "
                         f"linux-image-6.1.0-*-amd64 there), nor {KERNEL_VARIABLE} set")

    def version(path: str) -> list[int]:
        return [int(n) for n in re.findall(r"\d+", os.path.basename(path))]

    return max(images, key=version)


def virtme_run() -> str:
    """virtme-ng's virtme-run, installed beside the interpreter with the test extras."""
    return os.path.join(os.path.dirname(sys.executable), "virtme-run")


def missing_guest_tools() -> list[str]:
    """What booting a guest needs that this machine lacks, each with what installs it."""
    missing = []
    if not os.path.exists(virtme_run()):
        missing.append("virtme-ng's virtme-run (make install installs the test extras)")
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static"),
                          ("modprobe", "kmod"), ("depmod", "kmod")):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            missing.append(f"'{tool}' (make deb installs {package})")
    try:
        find_kernel()
    except GuestError as err:
        missing.append(str(err))
    return missing


class GuestProcess:
    """A process the agent started in a guest, as much like subprocess.Popen as the tests use:
    poll, wait, send_signal, terminate, kill. The agent says when it exits, so poll() asks
    nobody."""

    def __init__(self, guest: Guest, pid: int, args: Sequence[str]) -> None:
        self.guest = guest
        self.pid = pid
        self.args = list(args)
        self.returncode: int | None = None
        self._exited = threading.Event()

    def _ended(self, returncode: int) -> None:
        self.returncode = returncode
        self._exited.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self.guest.request("signal", pid=self.pid, sig=int(sig))

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Guest:
    """A testbed host that is a guest: the same face as tests.testbed.Host (underlay_ip, ip(),
    link(), run(), in_container()), plus spawn() for a process left running.

    `netns` is the guest's name, not a namespace on this machine: the tests name a host's files
    after it."""

    def __init__(self, bed: Testbed, index: int, kernel: str) -> None:
        self.bed = bed
        self.index = index
        self.kernel = kernel
        self.netns = f"{bed.prefix}-g{index}"
        self.underlay_ip = str(bed.underlay_network.network_address + index)
        self.container_netns: str | None = None
        self.container_ip: str | None = None
        self.container_ipv6: str | None = None
        self.tap = f"g{index}"  # in the testbed's underlay namespace, on br0
        self.files = os.path.join(bed.workdir, f"{self.netns}-guest")
        self.socket_path = os.path.join(self.files, "agent.sock")
        self.pid_file = os.path.join(self.files, "qemu.pid")
        self.console_path = os.path.join(self.files, "console.log")
        self.boot_seconds: float | None = None  # from starting virtme-run to the agent's hello
        self.uname = ""
        self.hello_uptime: float | None = None  # the guest's uptime when its agent spoke
        self._process: subprocess.Popen[bytes] | None = None
        self._console: deque[str] = deque(maxlen=CONSOLE_TAIL)
        self._console_thread: threading.Thread | None = None
        self._agent: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._pending: dict[int, tuple[threading.Event, dict[str, Any]]] = {}
        self._children: dict[int, GuestProcess] = {}
        self._early_exits: dict[int, int] = {}
        self._children_lock = threading.Lock()
        self._next_id = 1
        self._hello = threading.Event()
        self._gone: str | None = None  # why the agent cannot answer any more

    # --- booting and ending -------------------------------------------------------------------

    def boot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Boot and set up the guest; on failure end what was started and raise GuestError."""
        try:
            self._boot(timeout)
        except BaseException:
            self.close()
            raise

    def _boot(self, timeout: float) -> None:
        os.makedirs(self.files)
        underlay = self.bed.underlay
        # A persistent tap made here (not by QEMU) is on the bridge before the guest sends
        # anything, and close() deletes it by name whatever became of QEMU.
        sh("ip", "-n", underlay, "tuntap", "add", "dev", self.tap, "mode", "tap")
        sh("ip", "-n", underlay, "link", "set", self.tap, "master", "br0", "up")
        python = sys.executable
        # Where the kernel's package was unpacked: <root>/boot/vmlinuz-*, <root>/lib/modules.
        kernel_root = os.path.dirname(os.path.dirname(os.path.abspath(self.kernel)))
        command = [
            "ip", "netns", "exec", underlay, virtme_run(),  # QEMU opens the tap in that netns
            "--kimg", self.kernel, "--mods", "auto", "--disable-kvm",
            # 9p even where virtiofsd is installed: one way for every machine.
            "--force-9p", "--memory", GUEST_MEMORY, "--cpus", str(GUEST_CPUS),
            "--show-boot-console", "--kopt", "loglevel=4",
            "--script-sh", f"cd {REPOSITORY} && exec {python} -m tests.guests agent",
            "--qemu-opts",
            "-pidfile", self.pid_file,
            # wait=on: QEMU starts the guest only once this side is connected, so nothing the
            # agent writes is lost to an unconnected port.
            "-chardev", f"socket,id=pfagent,path={self.socket_path},server=on,wait=on",
            "-device", "virtio-serial-pci,id=pfserial",
            "-device", f"virtserialport,bus=pfserial.0,chardev=pfagent,name={AGENT_PORT}",
            "-fsdev", f"local,id=pfwork,path={self.bed.workdir},security_model=none",
            "-device", "virtio-9p-pci,fsdev=pfwork,mount_tag=pfwork",
            "-fsdev", f"local,id=pfkernel,path={kernel_root},security_model=none,readonly=on",
            "-device", "virtio-9p-pci,fsdev=pfkernel,mount_tag=pfkernel",
            "-netdev", f"tap,id=pfnet,ifname={self.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=pfnet,mac=52:54:00:12:00:{self.index:02x}",
        ]
        started = time.monotonic()
        # The console is piped, never sent straight into a file: QEMU reopens
        # /proc/self/fd/1 and 2, which for a file would start writing it over from the top.
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._console_thread = threading.Thread(target=self._read_console, daemon=True,
                                                name=f"{self.netns}-console")
        self._console_thread.start()
        self._connect(started + timeout)
        if not self._hello.wait(max(0.0, started + timeout - time.monotonic())):
            raise GuestError(self._failure(f"no word from the agent in {timeout:.0f} s"))
        if self._gone is not None:
            raise GuestError(self._failure("the guest ended before its agent spoke"))
        self.boot_seconds = time.monotonic() - started
        self._set_up()

    def _connect(self, deadline: float) -> None:
        assert self._process is not None
        while True:
            if self._process.poll() is not None:
                raise GuestError(self._failure(f"virtme-run exited ({self._process.returncode})"))
            if os.path.exists(self.socket_path):
                agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    agent.connect(self.socket_path)
                except OSError:
                    agent.close()
                else:
                    self._agent = agent
                    break
            if time.monotonic() > deadline:
                raise GuestError(self._failure("QEMU did not open the agent's socket"))
            time.sleep(0.05)
        threading.Thread(target=self._read_agent, daemon=True, name=f"{self.netns}-agent").start()

    def _set_up(self) -> None:
        """What makes the guest a testbed host: private writable /tmp and /var, the shared
        workdir at its own path, its address on eth0, forwarding on."""
        workdir = self.bed.workdir
        network = self.bed.underlay_network
        # The kernel's modules are where its package was unpacked, shared as pfkernel: virtme
        # links them from /lib/modules, which this machine may lack (and the read-only root
        # cannot get), at their path under /var/cache, which virtme hides under a tmpfs. The
        # kernel's module loader (and iptables, which asks it) use a modprobe told where.
        # A repository under /tmp (a clone there, as CI may make) would vanish under the
        # guest's own /tmp, and with it the .venv the guest runs pyflanneld from: it is kept
        # aside and put back at its path.
        keep_repository = (
            f"mkdir -p /run/pf-repo && mount --bind {REPOSITORY} /run/pf-repo",
            f"mkdir -p {REPOSITORY} && mount --bind /run/pf-repo {REPOSITORY}",
        ) if REPOSITORY.startswith("/tmp/") else ("", "")
        script = f"""
            mkdir -p /run/pf-kernel
            mount -t 9p -o trans=virtio,version=9p2000.L,ro pfkernel /run/pf-kernel
            printf '#!/bin/sh\\nexec /sbin/modprobe -d /run/pf-kernel "$@"\\n' > /run/pf-modprobe
            chmod 755 /run/pf-modprobe
            echo /run/pf-modprobe > /proc/sys/kernel/modprobe
            /run/pf-modprobe overlay
            # No udev here to load the NIC's driver, nor systemd to make /dev/net/tun's static
            # node (whose first open loads tun on a host with them).
            /run/pf-modprobe virtio_net
            /run/pf-modprobe tun
            for i in $(seq 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
            {keep_repository[0]}
            mount -t tmpfs -o mode=1777 tmpfs /tmp
            {keep_repository[1]}
            mkdir -p /run/pf-var/upper /run/pf-var/work
            mount -t overlay overlay -o lowerdir=/var,upperdir=/run/pf-var/upper,\
workdir=/run/pf-var/work /var
            mkdir -p {workdir}
            mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 pfwork {workdir}
            ip link set lo up
            ip addr add {self.underlay_ip}/{network.prefixlen} dev eth0
            ip link set eth0 up
            sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
                net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
            uname -r
        """
        result = self.run("sh", "-ec", script, timeout=60)
        self.uname = result.stdout.strip()

    def close(self) -> None:
        """Power the guest off (or end its QEMU, by PID), delete its tap and files."""
        try:
            # A guest whose agent spoke powers off when asked; one that never booted is ended.
            powering_off = False
            if self._hello.is_set() and self._gone is None:
                try:
                    self.request("exit", timeout=10)
                    powering_off = True
                except GuestError:
                    pass
            if self._process is not None:
                try:
                    self._process.wait(30 if powering_off else 0)
                except subprocess.TimeoutExpired:
                    self._end_qemu()
                    try:
                        self._process.wait(10)
                    except subprocess.TimeoutExpired:
                        self._process.kill()  # virtme-run itself, ours by PID
                        self._process.wait()
        finally:
            if self._agent is not None:
                self._agent.close()
            if self._console_thread is not None:
                self._console_thread.join(5)
            sh("ip", "-n", self.bed.underlay, "link", "del", self.tap, check=False)
            shutil.rmtree(self.files, ignore_errors=True)

    def _end_qemu(self) -> None:
        """SIGTERM, then SIGKILL, the QEMU this guest started: its PID from its own pidfile,
        checked against its command line (which names that pidfile) before any signal."""
        try:
            with open(self.pid_file) as f:
                pid = int(f.read())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if self.pid_file.encode() not in f.read():
                    return
        except (OSError, ValueError):
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if not os.path.exists(f"/proc/{pid}"):
                    return
                time.sleep(0.1)

    def console(self) -> str:
        """The console's last lines."""
        return "\n".join(self._console)

    def _failure(self, reason: str) -> str:
        if self._console_thread is not None and self._process is not None \
                and self._process.poll() is not None:
            self._console_thread.join(2)  # the last lines of a guest that died
        return (f"guest {self.netns} ({self.kernel}): {reason}; its console's last lines:\n"
                f"{self.console()}")

    def _read_console(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        with open(self.console_path, "ab") as log:
            for line in self._process.stdout:
                log.write(line)
                log.flush()
                self._console.append(line.decode(errors="replace").rstrip())

    # --- the agent's protocol -----------------------------------------------------------------

    def _read_agent(self) -> None:
        assert self._agent is not None
        buffer = b""
        try:
            while chunk := self._agent.recv(1 << 16):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    self._dispatch(json.loads(line))
        except OSError:
            pass
        self._gone = "the agent's connection closed"
        self._hello.set()  # a boot waiting for it fails now, not at its timeout
        for event, _ in list(self._pending.values()):
            event.set()
        for child in list(self._children.values()):
            if child.returncode is None:
                child._ended(-signal.SIGKILL)  # gone with the guest

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "hello" in message:
            self.hello_uptime = message["hello"]
            self._hello.set()
        elif "exited" in message:
            with self._children_lock:
                child = self._children.pop(message["exited"], None)
                if child is None:  # its spawn's answer is not entered yet
                    self._early_exits[message["exited"]] = message["returncode"]
            if child is not None:
                child._ended(message["returncode"])
        elif (waiting := self._pending.get(message.get("id", -1))) is not None:
            waiting[1].update(message)
            waiting[0].set()

    def request(self, op: str, timeout: float | None = 120.0, **fields: Any) -> dict[str, Any]:
        """One request to the agent and its answer; GuestError if it has none in `timeout`."""
        if self._gone is not None or self._agent is None:
            raise GuestError(self._failure(f"cannot {op}: {self._gone or 'not booted'}"))
        event, answer = threading.Event(), {}
        with self._send_lock:
            request_id, self._next_id = self._next_id, self._next_id + 1
            self._pending[request_id] = (event, answer)
            self._agent.sendall(json.dumps({"id": request_id, "op": op, **fields}).encode()
                                + b"\n")
        try:
            if not event.wait(timeout):
                raise GuestError(self._failure(f"no answer to {op} {fields} in {timeout} s"))
        finally:
            self._pending.pop(request_id, None)
        if not answer:
            raise GuestError(self._failure(f"{op} {fields}: {self._gone}"))
        if "error" in answer:
            raise GuestError(f"guest {self.netns}: {op} {fields}: {answer['error']}")
        return answer

    # --- the face of tests.testbed.Host -------------------------------------------------------

    def run(self, *args: str, check: bool = True, input: str | None = None,
            env: Mapping[str, str] | None = None, timeout: float = 120.0
            ) -> subprocess.CompletedProcess[str]:
        """Run a command in the guest; on failure raise with its stderr, as testbed.sh does.
        env: variables added to the agent's environment."""
        # The agent ends the command after `timeout`; the answer may take a little longer.
        answer = self.request("run", timeout + 30, argv=list(args), input=input,
                              env=dict(env or {}), limit=timeout)
        result = subprocess.CompletedProcess(list(args), answer["returncode"],
                                             answer["stdout"], answer["stderr"])
        if check and result.returncode != 0:
            raise RuntimeError(f"{self.netns}: {' '.join(args)} failed ({result.returncode}): "
                               f"{result.stderr.strip()}")
        return result

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("ip", *args, check=check)

    def link(self, device: str) -> dict:
        """`ip -d -j link show` of one device (its address, ifindex, linkinfo...)."""
        return json.loads(self.ip("-d", "-j", "link", "show", device).stdout)[0]

    def in_container(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.container_netns, "this guest has no container"
        return self.run("ip", "netns", "exec", self.container_netns, *args, check=check)

    def spawn(self, *args: str, log: str, env: Mapping[str, str] | None = None) -> GuestProcess:
        """Start a command left running, its stdout and stderr appended to `log` (a path in the
        guest: the shared workdir's files are read here at the same path)."""
        answer = self.request("spawn", argv=list(args), log=log, env=dict(env or {}))
        child = GuestProcess(self, answer["pid"], args)
        with self._children_lock:
            returncode = self._early_exits.pop(child.pid, None)
            if returncode is None:
                self._children[child.pid] = child
        if returncode is not None:
            child._ended(returncode)
        return child

    def add_container(self, subnet: str, mtu: int, network: str = "10.0.0.0/8",
                      ipv6_subnet: str | None = None, ipv6_network: str | None = None) -> str:
        """A container namespace in the guest, added as Testbed.add_container adds one on a
        namespace host: the `flannel` CNI plugin with a subnet.env of the host's subnet, MTU and
        Network, delegating to `bridge` with host-local IPAM; with `ipv6_subnet` and
        `ipv6_network` an IPv6 address of that subnet too (container_ipv6). Returns the
        container's IPv4 address."""
        self.container_netns = f"{self.netns}c"
        self.run("ip", "netns", "add", self.container_netns)
        self.in_container("ip", "link", "set", "lo", "up")
        lease = ipaddress.IPv4Network(subnet, strict=False)
        lines = [f"FLANNEL_NETWORK={network}",
                 f"FLANNEL_SUBNET={lease.network_address + 1}/{lease.prefixlen}"]
        routes = [{"dst": "0.0.0.0/0"}]
        if ipv6_subnet is not None:
            lease6 = ipaddress.IPv6Network(ipv6_subnet, strict=False)
            lines += [f"FLANNEL_IPV6_NETWORK={ipv6_network}",
                      f"FLANNEL_IPV6_SUBNET={lease6.network_address + 1}/{lease6.prefixlen}"]
            routes.append({"dst": "::/0"})
        subnet_env = os.path.join(self.bed.workdir, f"{self.netns}-cni-subnet.env")
        with open(subnet_env, "w") as f:
            f.write("\n".join([*lines, f"FLANNEL_MTU={mtu}", "FLANNEL_IPMASQ=true", ""]))
        conf = {
            "cniVersion": "1.0.0", "name": "pyflannel", "type": "flannel",
            "subnetFile": subnet_env, "dataDir": "/run/cni-flannel",
            "ipam": {"routes": routes, "dataDir": "/run/cni-ipam"},
        }
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": self.container_netns,
               "CNI_NETNS": f"/run/netns/{self.container_netns}", "CNI_IFNAME": "eth0",
               "CNI_PATH": "/usr/lib/cni"}
        result = self.run(FLANNEL_CNI, input=json.dumps(conf), env=env, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"CNI flannel ADD on {self.netns} failed: {result.stdout}"
                               f"{result.stderr}")
        addresses = [ip["address"].split("/")[0] for ip in json.loads(result.stdout)["ips"]]
        self.container_ip = next(a for a in addresses if ":" not in a)
        self.container_ipv6 = next((a for a in addresses if ":" in a), None)
        return self.container_ip

    def remove_container(self) -> None:
        """Delete the container as a runtime does (the `flannel` CNI plugin's DEL) and the
        bridge with it: the next container, on another lease, gets a cni0 with its own
        gateway (`bridge` refuses a cni0 that holds another subnet's address)."""
        assert self.container_netns, "this guest has no container"
        env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": self.container_netns,
               "CNI_NETNS": f"/run/netns/{self.container_netns}", "CNI_IFNAME": "eth0",
               "CNI_PATH": "/usr/lib/cni"}
        conf = {"cniVersion": "1.0.0", "name": "pyflannel", "type": "flannel",
                "dataDir": "/run/cni-flannel", "ipam": {"dataDir": "/run/cni-ipam"}}
        self.run(FLANNEL_CNI, input=json.dumps(conf), env=env)
        self.run("ip", "netns", "del", self.container_netns)
        self.ip("link", "del", "cni0")
        self.container_netns = self.container_ip = self.container_ipv6 = None


class Guests(ClosedOnSigterm):
    """The guests of one testbed. Use as a context manager: it powers them all off and deletes
    their taps and files, also when a test fails or the run is ended by SIGTERM."""

    def __init__(self, bed: Testbed, kernel: str | None = None) -> None:
        self.bed = bed
        self.kernel = kernel or find_kernel()
        self.guests: list[Guest] = []

    def boot(self, count: int = 1) -> list[Guest]:
        """Boot `count` guests at once; each takes the underlay address the testbed would have
        given its next host, so namespace hosts added later do not collide with them."""
        missing = missing_guest_tools()
        if missing:
            raise GuestError("cannot boot a guest, missing: " + "; ".join(missing))
        fresh = []
        for _ in range(count):
            guest = Guest(self.bed, len(self.bed.hosts) + 1, self.kernel)
            # Its place in the testbed's list is what reserves its address.
            self.bed.hosts.append(guest)  # type: ignore[arg-type]
            self.guests.append(guest)
            fresh.append(guest)
        with ThreadPoolExecutor(count) as pool:
            boots = [pool.submit(guest.boot) for guest in fresh]
            try:
                failures = [boot.exception() for boot in boots]
            except BaseException:
                # Interrupted (^C, SIGTERM): end the QEMUs, so that the boots end now and
                # clean up after themselves, not at their timeout.
                for guest in fresh:
                    guest._end_qemu()
                raise
        for failure in failures:
            if failure is not None:
                raise failure
        return fresh

    def close(self) -> None:
        with ThreadPoolExecutor(max(1, len(self.guests))) as pool:
            list(pool.map(Guest.close, self.guests))
        self.guests.clear()



class InGuest(LoggedDaemon):
    """A daemon of tests.cluster or tests.flanneld (its flags, log, subnet.env, stop) with the
    process started by the guest's agent. Its log and subnet file are in the shared workdir."""

    def start(self, handed: Mapping[str, int] | None = None) -> Self:
        if handed:
            raise NotImplementedError("descriptors cannot be handed into a guest from here")
        guest = self.host
        assert isinstance(guest, Guest)
        # The daemon's command runs it in a host's namespace; a guest runs it as it is.
        namespace = ["ip", "netns", "exec", guest.netns]
        assert self.command[:len(namespace)] == namespace, self.command
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
        # Only what the test added to this process's environment goes into the guest's.
        added = {name: value for name, value in self.environ.items()
                 if os.environ.get(name) != value}
        self.process = guest.spawn(  # type: ignore[assignment]
            *self.command[len(namespace):], log=self.log_path, env=added)
        return self


class GuestFlanneld(Flanneld, InGuest):
    """pyflanneld in a guest."""


class GuestRealFlanneld(RealFlanneld, InGuest):
    """flanneld (the reference build: the guest shares this machine's root) in a guest, on the
    etcd prefix given: the guests' clusters of each backend keep theirs apart."""

    def __init__(self, binary: str, bed: Testbed, guest: Guest, etcd: EtcdServer,
                 prefix: str) -> None:
        # The path the link leads to: a link under /tmp (a clone beside a linked shared/)
        # is hidden by the guest's own /tmp.
        super().__init__(os.path.realpath(binary), bed, guest, etcd)  # type: ignore[arg-type]
        self.command = [f"--etcd-prefix={prefix}" if arg.startswith("--etcd-prefix=") else arg
                        for arg in self.command]


@dataclass
class GuestBed:
    bed: Testbed
    etcd: EtcdServer
    guests: list[Guest]


@contextmanager
def guest_testbed(count: int) -> Iterator[GuestBed]:
    """`count` guests booted at once on a fresh testbed with a real etcd (both APIs), all
    powered off and deleted afterwards."""
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        try:
            with Guests(bed) as guests:
                started = time.monotonic()
                booted = guests.boot(count)
                print(f"\nguests booted in {time.monotonic() - started:.1f} s: " + ", ".join(
                    f"{g.netns} {g.uname} in {g.boot_seconds:.1f} s (its agent spoke at uptime "
                    f"{g.hello_uptime:.1f} s)" for g in booted))
                yield GuestBed(bed, etcd, booted)
        finally:
            etcd.stop()


# Under TCG a guest runs Python many times slower than this machine: a daemon's start, a lease,
# a route take seconds, not milliseconds.
SLOW = 120.0


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def ping(src: Guest, address: str, timeout: float = 30.0) -> None:
    """Ping from src's container until an answer comes (the first may wait for ARP, routes)."""
    deadline = time.monotonic() + timeout
    while True:
        result = src.in_container("ping", "-c", "1", "-W", "2", address, check=False)
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{src.netns}'s container cannot ping {address}: "
                                 f"{result.stdout}{result.stderr}")


SERVER = """import hashlib, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
listener = socket.create_server((sys.argv[1], 0), family=family)
print("listening", listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
digest, count = hashlib.sha256(), 0
while chunk := conn.recv(1 << 16):
    digest.update(chunk)
    count += len(chunk)
print("received", count, digest.hexdigest(), flush=True)
"""
CLIENT = """import hashlib, os, socket, sys
total, sent, digest = int(sys.argv[3]), 0, hashlib.sha256()
block = os.urandom(1 << 16)
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60) as s:
    while sent < total:
        chunk = block[: total - sent]
        s.sendall(chunk)
        digest.update(chunk)
        sent += len(chunk)
        block = block[1:] + block[:1]
print("sent", sent, digest.hexdigest())
"""


def tcp_transfer(server: Guest, client: Guest, nbytes: int, log: str, ipv6: bool = False
                 ) -> float:
    """Send nbytes of pseudo-random data from client's container to server's over TCP (over
    IPv6 with `ipv6`) and check that exactly those bytes arrived; returns the transfer's
    seconds. `log` is the server's, a new file for each transfer."""
    address = server.container_ipv6 if ipv6 else server.container_ip
    assert server.container_netns and address and client.container_netns
    listener = server.spawn("ip", "netns", "exec", server.container_netns, "python3", "-c",
                            SERVER, address, log=log)
    port = ""

    def listening() -> bool:
        nonlocal port
        found = re.search(r"listening (\d+)", read(log))
        port = found.group(1) if found else ""
        return bool(port) or listener.poll() is not None

    wait_for(listening, SLOW, f"{server.netns}'s container listening")
    assert port, read(log)
    started = time.monotonic()
    sent = client.in_container("python3", "-c", CLIENT, address, port, str(nbytes))
    assert listener.wait(SLOW) == 0, read(log)
    seconds = time.monotonic() - started
    received = re.search(r"received (\d+) (\w+)", read(log))
    assert received, read(log)
    assert sent.stdout.split() == ["sent", received.group(1), received.group(2)]
    assert int(received.group(1)) == nbytes
    return seconds


# --- the agent, inside the guest --------------------------------------------------------------

AGENT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _agent_port() -> str:
    """The device of the agent's virtio-serial port (no udev in the guest: found by name)."""
    for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
        with open(name_file) as f:
            if f.read().strip() == AGENT_PORT:
                return "/dev/" + os.path.basename(os.path.dirname(name_file))
    raise SystemExit(f"agent: no virtio-serial port named {AGENT_PORT}")


def agent() -> None:
    fd = os.open(_agent_port(), os.O_RDWR)
    send_lock = threading.Lock()
    children: dict[int, subprocess.Popen[bytes]] = {}
    base_env = {**os.environ, "PATH": AGENT_PATH}

    def send(message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\n"
        with send_lock:
            while data:
                data = data[os.write(fd, data):]

    def watch(child: subprocess.Popen[bytes]) -> None:
        send({"exited": child.pid, "returncode": child.wait()})
        children.pop(child.pid, None)

    def serve(request: dict[str, Any]) -> None:
        answer: dict[str, Any] = {"id": request["id"]}
        op = request["op"]
        try:
            env = {**base_env, **request.get("env", {})}
            if op == "run":
                try:
                    done = subprocess.run(request["argv"], input=request.get("input"),
                                          capture_output=True, text=True, errors="replace",
                                          env=env, timeout=request.get("limit"))
                    answer.update(returncode=done.returncode, stdout=done.stdout,
                                  stderr=done.stderr)
                except subprocess.TimeoutExpired as err:
                    answer["error"] = f"timed out after {err.timeout} s"
            elif op == "spawn":
                with open(request["log"], "ab") as log:
                    child = subprocess.Popen(request["argv"], stdout=log,
                                             stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env)
                children[child.pid] = child
                answer["pid"] = child.pid
                # Its exit is told after this answer, which names the pid first.
                send(answer)
                threading.Thread(target=watch, args=(child,), daemon=True).start()
                return
            elif op == "signal":
                child = children.get(request["pid"])
                if child is not None:
                    child.send_signal(request["sig"])
            elif op == "exit":
                for child in list(children.values()):
                    child.kill()
                send(answer)
                os._exit(0)  # the guest's init powers it off
            else:
                answer["error"] = f"unknown op {op!r}"
        except (OSError, ValueError, KeyError) as err:
            answer["error"] = f"{type(err).__name__}: {err}"
        send(answer)

    with open("/proc/uptime") as f:
        send({"hello": float(f.read().split()[0])})
    buffer = b""
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:  # the host's side went away: nobody to serve
            os._exit(0)
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            threading.Thread(target=serve, args=(json.loads(line),), daemon=True).start()


if __name__ == "__main__":
    if sys.argv[1:] == ["agent"]:
        agent()
    else:
        sys.exit("usage: python -m tests.guests agent (inside a guest)")
