"""pyflanneld on Debian 12's Linux 6.1: two emulated guests (tests/guests.py) on the testbed's
bridge, each a host of a udp cluster against an etcd on the bridge, with a container in each.

The guests boot once for the module (12-16 s, two at once, under TCG) and the cluster starts once
for the module's tests (docs/guests.md lists them and what 6.1 gave). Figures measured here are
the emulator's, never the kernel's: these tests are for what runs, not for how fast.
"""

from __future__ import annotations

import itertools
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from fastpath.udp_tc import RX_VXLAN_DEVICE, RX_VXLAN_PORT
from tests.cluster import Flanneld, put_config, scrape, stop_all, value, wait_for
from tests.conftest import require_host_network_tools
from tests.guests import (
    SLOW,
    Guest,
    GuestBed,
    GuestFlanneld,
    guest_testbed,
    ping,
    read,
    tcp_transfer,
)
from tests.test_dataplane import inner_udp
from tests.testbed import inside

UDP_CONFIG = {"Network": "10.0.0.0/8", "SubnetLen": 24, "SubnetMin": "10.10.0.0",
              "SubnetMax": "10.99.0.0", "Backend": {"Type": "udp"}}
MTU = 1472  # flanneld's udp backend on a 1500 underlay


@pytest.fixture(scope="module")
def guest_bed() -> Iterator[GuestBed]:
    """Two guests on a fresh testbed with a real etcd, booted once for the module."""
    require_host_network_tools()
    with guest_testbed(2) as bed:
        yield bed


def test_guests_run_debian_12_s_kernel_and_reach_etcd(guest_bed: GuestBed) -> None:
    etcd = guest_bed.etcd
    for guest in guest_bed.guests:
        assert guest.uname.startswith("6.1."), guest.uname
        assert f"inet {guest.underlay_ip}/24" in guest.ip("-4", "addr", "show", "eth0").stdout
        # The host's root, read-only; /tmp and /var private and writable.
        assert guest.run("touch", "/etc/pf-probe", check=False).returncode != 0
        guest.run("touch", f"/tmp/{guest.netns}", f"/var/{guest.netns}")
        health = guest.run("etcdctl", "--endpoints", etcd.endpoint, "endpoint", "health",
                           env={"ETCDCTL_API": "3"})
        assert "is healthy" in health.stdout + health.stderr
    # Each guest's /tmp and /var are its own.
    first, second = guest_bed.guests
    assert second.run("test", "-e", f"/tmp/{first.netns}", check=False).returncode == 1
    assert second.run("test", "-e", f"/var/{first.netns}", check=False).returncode == 1


@dataclass
class UdpCluster:
    prefix: str
    daemons: list[Flanneld]
    guests: list[Guest]


METRICS_PORT = 9126


@pytest.fixture(scope="module")
def udp_cluster(guest_bed: GuestBed) -> Iterator[UdpCluster]:
    """pyflanneld with the udp backend (flanneld's defaults otherwise, --ip-masq as flannel's
    manifest runs it) in both guests, with a container in each; the daemons serve metrics on
    the guests' loopback."""
    bed, etcd = guest_bed.bed, guest_bed.etcd
    prefix = "/guest-udp/network"
    put_config(etcd, "v3", UDP_CONFIG, prefix)
    daemons: list[Flanneld] = [
        GuestFlanneld(bed, guest, etcd, "v3", "--etcd-prefix", prefix, "--ip-masq",
                      "--metrics-port", str(METRICS_PORT), "--metrics-ip", "127.0.0.1")
        for guest in guest_bed.guests]
    try:
        started = time.monotonic()
        for daemon in daemons:
            daemon.start()
        subnets = [daemon.wait_subnet(timeout=SLOW) for daemon in daemons]
        for daemon in daemons:
            daemon.wait_log("subnet added", timeout=SLOW)
        print(f"\nudp cluster: leases and routes in {time.monotonic() - started:.1f} s")
        assert len(set(subnets)) == 2
        for daemon, subnet, guest in zip(daemons, subnets, guest_bed.guests, strict=True):
            assert daemon.subnet_env()["FLANNEL_MTU"] == str(MTU)
            guest.add_container(str(subnet), MTU)
        yield UdpCluster(prefix, daemons, guest_bed.guests)
    finally:
        stop_all(daemons)
    for daemon in daemons:
        assert "Traceback" not in daemon.log(), daemon.log()[-3000:]


def test_containers_ping_each_other_and_tcp_runs(udp_cluster: UdpCluster) -> None:
    a, b = udp_cluster.guests
    assert a.container_ip and b.container_ip
    ping(a, b.container_ip)
    ping(b, a.container_ip)
    seconds = tcp_transfer(b, a, 8 << 20, f"{a.bed.workdir}/{b.netns}-tcp.log")
    print(f"\n8 MiB of TCP from {a.netns}'s container to {b.netns}'s in {seconds:.1f} s "
          "(the emulator's figure, not the kernel's)")


def test_the_kernel_path_runs_on_6_1_and_carries_the_pings(udp_cluster: UdpCluster) -> None:
    a, b = udp_cluster.guests
    assert b.container_ip
    daemon = udp_cluster.daemons[0]
    # What 6.1 gives the fast path: the daemon's own account and python -m fastpath's.
    said = [line.split(" ", 3)[-1] for line in daemon.log().splitlines()
            if "udp backend:" in line]
    features = a.run(sys.executable, "-m", "fastpath", check=False)
    print(f"\n{a.netns} ({a.uname}): pyflanneld said\n" + "\n".join(said)
          + f"\npython -m fastpath (exit {features.returncode}):\n{features.stdout}"
          f"{features.stderr}")
    assert features.returncode in (0, 1), features.stderr
    # Linux 6.1 lacks USO for TUN (6.2) and tcx links (6.6): the fast path says so and goes
    # without them; everything else it asks for, 6.1 has.
    lacking = {line[5:] for line in features.stdout.splitlines() if line.startswith("no ")}
    assert lacking == {"UDP segmentation for TUN (USO, Linux 6.2)",
                       "tcx links (the kernel path forwards across a restart, Linux 6.6+)"}
    log = daemon.log()
    assert "this kernel lacks UDP segmentation for TUN (USO, Linux 6.2)" in log
    assert "kernel path on" in log, log[-3000:]
    # Without tcx links (6.6), the programs are attached as classic tc filters.
    assert "direct-action" in a.run("tc", "filter", "show", "dev", "eth0", "ingress").stdout
    assert "direct-action" in a.run("tc", "filter", "show", "dev", "flannel0", "egress").stdout
    # ... and the kernel path carries the cluster: a's pings go out and their answers come in
    # through the tc programs, none through the loops.
    count = 10
    ping(a, b.container_ip)
    before = scrape(daemon, METRICS_PORT)
    result = a.in_container("ping", "-c", str(count), "-i", "0.2", "-W", "2", b.container_ip,
                            check=False)
    assert f"{count} received" in result.stdout, result.stdout
    after = scrape(daemon, METRICS_PORT)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("pyflannel_kernelpath_packets_total", direction="tx") == count
    assert moved("pyflannel_kernelpath_packets_total", direction="rx") == count
    assert moved("pyflannel_fastpath_packets_total", direction="tx") == 0
    assert moved("pyflannel_fastpath_packets_total", direction="rx") == 0


def test_a_host_between_machines_makes_no_receive_device_and_opens_no_port_8473(
        udp_cluster: UdpCluster) -> None:
    """A guest's interface is a virtio NIC, as a machine's is: peers' super-packets arrive cut,
    so there is no pyflannel-rx and UDP 8473 stays closed; only the udp port is open."""
    for guest in udp_cluster.guests:
        assert guest.run("ip", "link", "show", RX_VXLAN_DEVICE, check=False).returncode != 0
        listening = guest.run("ss", "-Hulnp").stdout
        assert f":{RX_VXLAN_PORT} " not in listening, listening
        assert ":8285 " in listening, listening


RECEIVER = """import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
got = 0
try:
    while True:
        s.recv(100)
        got += 1
except TimeoutError:
    pass
print("got", got, flush=True)
"""


def test_a_crafted_datagram_from_outside_the_cluster_is_dropped(
        guest_bed: GuestBed, udp_cluster: UdpCluster) -> None:
    """A namespace host on the underlay that is no member sends datagrams to b's udp port, each
    carrying a packet from a's subnet for a socket in b's container: none gets in, each is
    counted as a wrong sender's."""
    a, b = udp_cluster.guests
    assert b.container_netns and b.container_ip and a.container_ip
    outsider = guest_bed.bed.add_host()
    daemon = udp_cluster.daemons[1]
    log = f"{b.bed.workdir}/{b.netns}-receiver.log"
    receiver = b.spawn("ip", "netns", "exec", b.container_netns, "python3", "-c", RECEIVER,
                       b.container_ip, "4000", "5", log=log)
    wait_for(lambda: "ready" in read(log) or receiver.poll() is not None, SLOW,
             f"{b.netns}'s receiver ready")
    before = scrape(daemon, METRICS_PORT)
    count = 50
    with inside(outsider.netns):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        for i in range(count):
            udp.sendto(inner_udp(a.container_ip, b.container_ip, 4000, i.to_bytes(4, "big")),
                       (b.underlay_ip, 8285))
    assert receiver.wait(SLOW) == 0, read(log)
    assert "got 0" in read(log), read(log)
    after = scrape(daemon, METRICS_PORT)
    dropped = (value(after, "pyflannel_fastpath_drops_total", direction="rx",
                     reason="spoof_wrong_sender")
               - value(before, "pyflannel_fastpath_drops_total", direction="rx",
                       reason="spoof_wrong_sender"))
    assert dropped == count


def test_a_third_host_joining_is_routed(guest_bed: GuestBed, udp_cluster: UdpCluster) -> None:
    """A namespace host on this machine's kernel joins the guests' cluster: each side routes
    the other's subnet and the containers ping both ways."""
    bed, etcd = guest_bed.bed, guest_bed.etcd
    third = Flanneld(bed, bed.add_host(), etcd, "v3", "--etcd-prefix", udp_cluster.prefix,
                     "--ip-masq")
    third.start()
    try:
        subnet = third.wait_subnet()
        bed.add_container(third.host, str(subnet), MTU)
        started = time.monotonic()
        for daemon in udp_cluster.daemons:
            daemon.wait_log(f"subnet added: {subnet}", timeout=SLOW)
        print(f"\na third host's lease routed in the guests {time.monotonic() - started:.1f} s "
              "after its container was added")
        assert third.host.container_ip
        for guest in udp_cluster.guests:
            assert guest.container_ip
            ping(guest, third.host.container_ip)
            result = third.host.in_container("ping", "-c", "1", "-W", "5", guest.container_ip,
                                             check=False)
            assert result.returncode == 0, result.stdout
    finally:
        assert third.stop() == 0


@contextmanager
def pinging(src: Guest, address: str, log: str) -> Iterator[None]:
    """A ping every 0.1 s from src's container to `address` while the body runs, its replies
    timestamped into `log`."""
    assert src.container_netns
    pinger = src.spawn("ip", "netns", "exec", src.container_netns, "ping", "-D", "-i", "0.1",
                       "-W", "1", address, log=log)
    try:
        wait_for(lambda: read(log).count("bytes from") >= 5, SLOW, "the pings answered")
        yield
        # Until answers come again after what the body did.
        answered = read(log).count("bytes from")
        wait_for(lambda: read(log).count("bytes from") >= answered + 5, SLOW,
                 "the pings answered again")
    finally:
        pinger.send_signal(signal.SIGINT)
        pinger.wait(SLOW)


def longest_gap(log: str) -> float:
    """The longest time between two answers in a `ping -D` log."""
    times = [float(stamp) for stamp in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", read(log),
                                                  re.MULTILINE)]
    return max(later - earlier for earlier, later in itertools.pairwise(times))


def test_a_restart_in_place_goes_on_with_what_the_last_run_kept(
        udp_cluster: UdpCluster) -> None:
    """SIGHUP: the daemon executes itself again in the same process, its TUN, socket, route
    table and kernel path kept, while a's container pings b's."""
    a, b = udp_cluster.guests
    daemon = udp_cluster.daemons[0]
    assert b.container_ip and daemon.process is not None
    log = f"{a.bed.workdir}/{a.netns}-ping-sighup.log"
    kept = daemon.log().count("went on with the fast path the previous run kept")
    added = daemon.log().count("subnet added")
    with pinging(a, b.container_ip, log):
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_log("went on with the fast path the previous run kept", count=kept + 1,
                        timeout=SLOW)
        daemon.wait_log("subnet added", count=added + 1, timeout=SLOW)
    assert daemon.process.poll() is None
    print(f"\nSIGHUP in place on {a.netns}: the pings' longest gap {longest_gap(log):.2f} s")


# systemd's part, in the guest: tests.fdstore.FdStore keeps what the daemon sends it, and the
# daemon is started again with the kept descriptors (tests.cluster.LoggedDaemon) when the test
# creates <control>.restart; <control>.stop ends it.
HOLDER = """import os, signal, sys, time
from tests.cluster import LoggedDaemon
from tests.fdstore import FdStore
notify, control, log, subnet_file, *command = sys.argv[1:]
with FdStore(notify) as store:
    daemon = LoggedDaemon(None, subnet_file, log, command, {"NOTIFY_SOCKET": notify}).start()
    while True:
        time.sleep(0.05)
        if os.path.exists(control + ".restart"):
            os.unlink(control + ".restart")
            daemon.process.send_signal(signal.SIGTERM)
            print("stopped", daemon.process.wait(), "kept", *store.names(), flush=True)
            daemon.start(handed=store.handed())
        if os.path.exists(control + ".stop"):
            daemon.process.send_signal(signal.SIGTERM)
            sys.exit(daemon.process.wait())
"""


def test_a_restart_through_the_fd_store_goes_on_forwarding(
        guest_bed: GuestBed, udp_cluster: UdpCluster) -> None:
    """b's daemon stopped by SIGTERM and started again with what it kept in the fd store (as
    systemd's FileDescriptorStoreMax does), while a's container pings b's."""
    a, b = udp_cluster.guests
    assert b.container_ip
    first = udp_cluster.daemons[1]
    assert first.stop() == 0
    held = GuestFlanneld(guest_bed.bed, b, guest_bed.etcd, "v3", "--etcd-prefix",
                         udp_cluster.prefix, "--ip-masq")
    control = f"{b.bed.workdir}/{b.netns}-holder"
    holder_log = control + ".log"
    with open(held.log_path, "ab") as log:
        held._log_offset = log.tell()
    holder = b.spawn(sys.executable, "-c", HOLDER, f"/run/{b.netns}.notify", control,
                     held.log_path, held.subnet_file, *held.command[4:], log=holder_log)
    held.process = holder  # type: ignore[assignment]
    try:
        held.wait_log("subnet added", timeout=SLOW)
        ping_log = f"{a.bed.workdir}/{a.netns}-ping-fdstore.log"
        with pinging(a, b.container_ip, ping_log):
            added = held.log().count("subnet added")
            open(control + ".restart", "w").close()
            held.wait_log("went on with the fast path the previous run kept", timeout=SLOW)
            held.wait_log("subnet added", count=added + 1, timeout=SLOW)
        kept = re.search(r"stopped (-?\d+) kept (.*)", read(holder_log))
        assert kept and kept.group(1) == "0", read(holder_log)
        print(f"\nfd store restart on {b.netns}: kept {kept.group(2)}; the pings' longest gap "
              f"{longest_gap(ping_log):.2f} s")
    finally:
        open(control + ".stop", "w").close()
        holder.wait(SLOW)
        first.start()  # the module's daemon again, for the tests after this one
    first.wait_log("subnet added", timeout=SLOW)
