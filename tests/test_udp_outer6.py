"""The udp backend over an IPv6-only underlay (outer IPv6, issue 30 item 3): pyflanneld hosts
whose eth0 has only an IPv6 address (2001:db8:0:1::/64) send their datagrams over IPv6, to the
peer leases' PublicIPv6, carrying IPv4 and IPv6 inner packets (a dual-stack network) or IPv6
alone (an IPv6-only network). The loops carry everything (the kernel path is IPv4's); etcd is
reached over IPv6 too. The lease is flanneld's format: PublicIP "0.0.0.0", PublicIPv6 the
address."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from fastpath import FastPath
from tests.cluster import PREFIX, Flanneld, put_config, scrape, value
from tests.etcd import EtcdServer
from tests.fdstore import FdStore
from tests.test_dataplane import inner_udp, inner_udp6
from tests.test_dualstack import (
    NETWORK,
    NETWORK6,
    add_container,
    dual_config,
    pings,
    reach_each_other,
)
from tests.testbed import Host, Testbed, inside, tcp_transfer

METRICS_PORT = 9125
PORT = 8285
KERNEL_OFF = ("udp backend: the kernel path carries IPv4 underlays only: the loops carry "
              "everything")


@dataclass
class Outer6:
    bed: Testbed
    etcd: EtcdServer
    daemons: list[Flanneld]

    @property
    def hosts(self) -> list[Host]:
        return [daemon.host for daemon in self.daemons]


def start_hosts(bed: Testbed, etcd: EtcdServer, count: int, ipv4: bool = False,
                pins: bool = False) -> list[Flanneld]:
    """`count` pyflanneld hosts, on an IPv6-only underlay unless `ipv4`, a container each;
    with `pins`, each with --fastpath-pin-dir (a folder of its own under the workdir)."""
    daemons = []
    for _ in range(count):
        host = bed.add_host(ipv6=True, ipv4=ipv4)
        extra = ["--fastpath-pin-dir", os.path.join(bed.workdir, f"{host.netns}-pins")] \
            if pins else []
        daemon = Flanneld(bed, host, etcd, "v3", "--metrics-port", str(METRICS_PORT),
                          *extra).start()
        daemons.append(daemon)
        daemon.wait_ipv6_subnet()
    for daemon in daemons:
        daemon.wait_log("subnet added", count=count - 1)
        add_container(bed, daemon)
    return daemons


@pytest.fixture(scope="module")
def dual() -> Iterator[Outer6]:
    """Three hosts on an IPv6-only underlay in a dual-stack udp network, a container each."""
    with Testbed() as bed:
        etcd = EtcdServer(bed, ipv6=True)
        daemons: list[Flanneld] = []
        try:
            put_config(etcd, "v3", dual_config("udp"))
            daemons = start_hosts(bed, etcd, 3)
            yield Outer6(bed, etcd, daemons)
        finally:
            for daemon in daemons:
                daemon.stop()
            etcd.stop()


def moved(daemon: Flanneld, direction: str) -> float:
    return value(scrape(daemon, METRICS_PORT), "pyflannel_fastpath_packets_total",
                 direction=direction)


def test_containers_reach_each_other_over_both_families_and_tcp_runs_both_ways(
        dual: Outer6) -> None:
    before = [(moved(d, "tx"), moved(d, "rx")) for d in dual.daemons[:2]]
    reach_each_other(dual.hosts)
    a, b = dual.hosts[:2]
    for src, dst in ((a, b), (b, a)):
        assert dst.container_netns and src.container_netns
        for address in (dst.container_ip, dst.container_ipv6):
            assert address
            assert tcp_transfer(dst.container_netns, address, src.container_netns,
                                nbytes=4 << 20) == 4 << 20
    for daemon, (tx, rx) in zip(dual.daemons[:2], before, strict=True):
        assert moved(daemon, "tx") > tx + 1000  # the loops carried it, 8 MiB each way
        assert moved(daemon, "rx") > rx + 1000


def test_the_datagrams_go_over_ipv6_from_the_loops_alone(dual: Outer6) -> None:
    for daemon in dual.daemons:
        host = daemon.host
        assert host.underlay_ipv6 and not host.underlay_ip
        sockets = host.run("ss", "-u", "-a", "-n").stdout
        assert f"[{host.underlay_ipv6}]:{PORT}" in sockets, sockets
        assert f"0.0.0.0:{PORT}" not in sockets and f"*:{PORT}" not in sockets
        daemon.wait_log(KERNEL_OFF)
        assert "sends over IPv6" not in daemon.log()
        assert "no PublicIPv6" not in daemon.log()
        # the MTU: eth0's 1500 less IPv6 and UDP headers
        assert daemon.subnet_env()["FLANNEL_MTU"] == "1452"
        assert "1452" in host.ip("link", "show", "flannel0").stdout
        assert "pyflannel-rx" not in host.ip("link", "show").stdout
        assert "flannel0" not in host.run("tc", "filter", "show", "dev", "eth0",
                                          "ingress").stdout


def test_the_lease_is_flanneld_s_format_with_public_ip_0_0_0_0(dual: Outer6) -> None:
    found = dual.etcd.get_prefix(f"{PREFIX}/subnets/", "v3")
    for daemon in dual.daemons:
        subnet, subnet6 = daemon.wait_subnet(), daemon.wait_ipv6_subnet()
        key = (f"{PREFIX}/subnets/{subnet.network_address}-{subnet.prefixlen}&"
               f"{subnet6.network_address}-{subnet6.prefixlen}")
        assert found[key] == (f'{{"PublicIP":"0.0.0.0","PublicIPv6":'
                              f'"{daemon.host.underlay_ipv6}"}}')
    assert len({daemon.wait_subnet() for daemon in dual.daemons}) == 3


def test_a_lease_without_public_ipv6_is_logged_once_and_skipped(dual: Outer6) -> None:
    key = "10.244.250.0-24&fd00:10:244:fa::-64"
    lease = json.dumps({"PublicIP": "198.18.0.250", "PublicIPv6": None},
                       separators=(",", ":"))
    line = (f"udp backend: lease {key} has no PublicIPv6: this host sends over IPv6 and "
            "cannot reach it")
    try:
        dual.etcd.put(f"{PREFIX}/subnets/{key}", lease, "v3")
        for daemon in dual.daemons:
            daemon.wait_log(line)
        dual.etcd.put(f"{PREFIX}/subnets/{key}", lease, "v3")  # again: not logged again
        reach_each_other(dual.hosts)
        for daemon in dual.daemons:
            assert daemon.log().count(line) == 1
            assert daemon.process is not None and daemon.process.poll() is None
        a = dual.hosts[0]
        assert not pings(a, "10.244.250.1")
    finally:
        dual.etcd.ctl("del", f"{PREFIX}/subnets/{key}")


def test_an_icmpv6_time_exceeded_goes_back_to_the_sender_over_ipv6(dual: Outer6) -> None:
    """A hop limit that runs out in b's receive loop (3: a's kernel and send loop take two) is
    answered from the address it was for, sent back over IPv6 to the host that routes the
    source (deliver6's reply: peer_address)."""
    a, b = dual.hosts[:2]
    assert b.container_ipv6
    result = a.in_container("ping", "-6", "-c", "1", "-W", "2", "-t", "3", b.container_ipv6,
                            check=False)
    assert f"From {b.container_ipv6}" in result.stdout, result.stdout
    assert "Time exceeded" in result.stdout, result.stdout
    assert pings(a, b.container_ipv6)


def delivered(sender: Host, target: Host, source: str, count: int = 20) -> int:
    """Datagrams from `sender`'s IPv6 underlay address to target's fast path, each a packet
    from `source` to a socket in target's container: how many that socket got."""
    ipv6 = ":" in source
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    destination = target.container_ipv6 if ipv6 else target.container_ip
    assert destination and target.container_netns and target.underlay_ipv6
    with inside(target.container_netns):
        receiver = socket.socket(family, socket.SOCK_DGRAM)
        receiver.bind((destination, 0))
    receiver.settimeout(0.5)
    with inside(sender.netns):
        udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    got = 0
    with udp, receiver:
        port = receiver.getsockname()[1]
        for i in range(count):
            payload = i.to_bytes(4, "big")
            packet = (inner_udp6(source, destination, payload, port) if ipv6
                      else inner_udp(source, destination, port, payload))
            udp.sendto(packet, (target.underlay_ipv6, PORT))
        try:
            while got < count:
                receiver.recv(64)
                got += 1
        except TimeoutError:
            pass
    return got


def test_the_source_check_compares_the_sender_s_ipv6_address(dual: Outer6) -> None:
    """A packet is delivered only when its source lies in the subnet of the host whose IPv6
    address sent the datagram: not another member's, not an outsider's."""
    a, b, c = dual.hosts
    assert b.container_ip and b.container_ipv6 and c.container_ip and c.container_ipv6
    assert delivered(b, a, b.container_ip) == 20
    assert delivered(b, a, b.container_ipv6) == 20
    assert delivered(b, a, c.container_ip) == 0
    assert delivered(b, a, c.container_ipv6) == 0
    outsider = dual.bed.add_host(ipv4=False)
    assert delivered(outsider, a, b.container_ip) == 0
    assert delivered(outsider, a, b.container_ipv6) == 0


def test_a_restart_keeps_the_subnets_and_the_traffic_resumes(dual: Outer6) -> None:
    daemon = dual.daemons[1]
    subnets = daemon.wait_subnet(), daemon.wait_ipv6_subnet()
    assert daemon.stop() == 0
    daemon.start()
    daemon.wait_log("reusing it")
    assert (daemon.wait_subnet(), daemon.wait_ipv6_subnet()) == subnets
    daemon.wait_log("udp backend: datagrams go over IPv6")
    reach_each_other(dual.hosts)
    a, b = dual.hosts[0], daemon.host
    assert b.container_netns and b.container_ipv6 and a.container_netns
    assert tcp_transfer(b.container_netns, b.container_ipv6, a.container_netns,
                        nbytes=1 << 20) == 1 << 20


def test_under_an_fd_store_nothing_is_kept_and_a_restart_starts_a_new_fast_path(
        dual: Outer6) -> None:
    """The outer-IPv6 fast path is not handed over (its routes name peers by index into an
    array no memfd holds): the store stays empty, and the next run starts afresh."""
    daemon = dual.daemons[2]
    with FdStore(os.path.join(dual.bed.workdir, "outer6.notify")) as fdstore:
        daemon.stop()
        daemon.environ["NOTIFY_SOCKET"] = fdstore.path
        try:
            daemon.start()
            daemon.wait_log("udp backend: datagrams go over IPv6", count=1)
            reach_each_other(dual.hosts)
            assert daemon.stop() == 0
            assert fdstore.names() == []
            daemon.start(handed=fdstore.handed())
            daemon.wait_log("udp backend: flannel0")
            reach_each_other(dual.hosts)
            assert "resumed the fast path" not in daemon.log()
            assert fdstore.names() == []
        finally:
            daemon.stop()
            del daemon.environ["NOTIFY_SOCKET"]
            daemon.start()
    reach_each_other(dual.hosts)


def test_a_restart_in_place_after_sighup_starts_a_new_fast_path(dual: Outer6) -> None:
    daemon = dual.daemons[0]
    assert daemon.process is not None
    added = daemon.log().count("subnet added")
    started = daemon.log().count("udp backend: flannel0")
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_log("udp backend: flannel0", count=started + 1)
    daemon.wait_log("subnet added", count=added + 2)
    assert daemon.process.poll() is None
    assert "again with nothing" in daemon.log()
    reach_each_other(dual.hosts)


@pytest.mark.parametrize("underlay", ["ipv6", "dual"])
def test_an_ipv6_only_network_goes_over_ipv6(underlay: str) -> None:
    """On an IPv6-only underlay, and on a dual-stack one too: an IPv6-only network's hosts
    advertise PublicIP 0.0.0.0, so their datagrams go to the peers' PublicIPv6."""
    with Testbed() as bed:
        etcd = EtcdServer(bed, ipv6=True)
        daemons: list[Flanneld] = []
        try:
            put_config(etcd, "v3", {"EnableIPv4": False, "EnableIPv6": True,
                                    "IPv6Network": NETWORK6, "Backend": {"Type": "udp"}})
            daemons = start_hosts(bed, etcd, 2, ipv4=underlay == "dual", pins=True)
            hosts = [daemon.host for daemon in daemons]
            for daemon in daemons:
                assert "FLANNEL_SUBNET" not in daemon.subnet_env()
                assert daemon.host.container_ip is None
                daemon.wait_log(KERNEL_OFF)
            assert len({daemon.wait_ipv6_subnet() for daemon in daemons}) == 2
            reach_each_other(hosts, ("ipv6",))
            a, b = hosts
            for src, dst in ((a, b), (b, a)):
                assert dst.container_netns and dst.container_ipv6 and src.container_netns
                assert tcp_transfer(dst.container_netns, dst.container_ipv6,
                                    src.container_netns, nbytes=4 << 20) == 4 << 20
            for host in hosts:
                assert f"[{host.underlay_ipv6}]:{PORT}" in host.run("ss", "-u", "-a",
                                                                     "-n").stdout
            # --fastpath-pin-dir keeps nothing over IPv6: a restart starts a new fast path
            subnet6 = daemons[1].wait_ipv6_subnet()
            assert daemons[1].stop() == 0
            kept = [os.path.join(bed.workdir, f"{b.netns}-pins"), daemons[1].subnet_file + ".kept"]
            assert not any(os.path.exists(path) for path in kept)
            daemons[1].start()
            assert daemons[1].wait_ipv6_subnet() == subnet6
            daemons[1].wait_log("udp backend: flannel0")
            reach_each_other(hosts, ("ipv6",))
        finally:
            for daemon in daemons:
                daemon.stop()
            etcd.stop()


def test_an_ipv4_underlay_still_sends_over_ipv4() -> None:
    """A dual-stack network on a dual-stack underlay: nothing changes (outer IPv4)."""
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        daemon: Flanneld | None = None
        try:
            put_config(etcd, "v3", dual_config("udp"))
            daemon = Flanneld(bed, bed.add_host(ipv6=True), etcd, "v3").start()
            daemon.wait_ipv6_subnet()
            daemon.wait_log("udp backend: flannel0")
            sockets = daemon.host.run("ss", "-u", "-a", "-n").stdout
            assert f"{daemon.host.underlay_ip}:{PORT}" in sockets
            assert daemon.subnet_env()["FLANNEL_MTU"] == "1472"
            assert "datagrams go over IPv6" not in daemon.log()
            assert daemon.subnet_env()["FLANNEL_NETWORK"] == NETWORK
        finally:
            if daemon is not None:
                daemon.stop()
            etcd.stop()


def test_the_fast_path_s_outer_ipv6_levers_and_refusals() -> None:
    """FastPath with an IPv6 bind address: no kernel path, hellos, whole or plain
    super-packets; an IPv6-only overlay without a Network; nothing kept (not started here)."""
    fp = FastPath(None, 24, "2001:db8::1", PORT, mtu=1452, ipv6_network=NETWORK6,
                  kernel="on", underlay="eth0", whole_superpackets=True,
                  plain_superpackets=True, vxlan_receiver="pyflannel-rx")
    assert fp.outer6 and fp.table is None and fp.table6 is not None
    assert (fp.kernel, fp.kernel_missing) == ("off", "the kernel path carries IPv4 underlays only")
    assert not (fp.whole_superpackets or fp.plain_superpackets or fp.vxlan_receiver)
    fp.set_route("fd00:10:244:7::/64", "2001:db8::7", PORT)
    assert fp.table6.routes() == [("fd00:10:244:7::/64", ("2001:db8::7", PORT))]
    assert fp.peers6 is not None and fp.peers6.index("2001:db8::7") == 0
    with pytest.raises(ValueError, match="no Network"):
        fp.set_route("10.244.7.0/24", "2001:db8::7", PORT)
    with pytest.raises(ValueError, match="no Network"):
        FastPath(None, 24, "198.18.0.1", PORT, ipv6_network=NETWORK6)
    ipv4 = FastPath(NETWORK, 24, "198.18.0.1", PORT)
    assert not ipv4.outer6 and ipv4.peers6 is None
