"""The kernel path (fastpath/udp_tc.bpf.c): tc programs beside the loops, between test hosts in
namespaces on a veth underlay. What they carry must be what the loops would have carried, on the
same wire format; what they pass on must still reach the loops; and a host running them must work
with any peer, one whose own loops take everything included."""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from fastpath import FastPath, udp_tc
from fastpath.dataplane import KEPT
from fastpath.device import UDP_SEGMENT
from fastpath.hello import (
    HELLO_MAGIC,
    HELLO_PROTOCOL,
    KERNEL_MAGIC,
    boot_id,
    hello_packet,
    kernel_hello_packet,
)
from fastpath.udp_tc import FILTER_PRIORITY, RX_VXLAN_DEVICE
from tests.cluster import wait_for
from tests.test_dataplane import (
    MTU,
    NETWORK,
    PORT,
    SUBNET_LEN,
    Node,
    capture,
    container_udp,
    find,
    inner_udp,
    inner_udp6,
    link,
    settled_stats,
    start_node,
    tcp6_transfer,
)
from tests.test_packet import reference_checksum
from tests.testbed import Testbed, inside, sh, tcp_transfer


def linked(*nodes: Node) -> Iterator[tuple[Node, ...]]:
    """A fixture's nodes, each routing the others' subnets, stopped when it ends."""
    link(*nodes)
    try:
        yield nodes
    finally:
        for node in nodes:
            node.fastpath.stop()


@pytest.fixture(scope="module")
def trio(testbed: Testbed) -> Iterator[tuple[Node, Node, Node, Node]]:
    # a and b run both programs; c has no kernel path, nor offloads, nor batching: a peer as
    # plain as flanneld's proxy; d has no kernel path, but offloads.
    a = start_node(testbed, "10.244.1.0/24", kernel="on", underlay="eth0")
    b = start_node(testbed, "10.244.2.0/24", kernel="on", underlay="eth0")
    c = start_node(testbed, "10.244.3.0/24", batch=1, offload=False, kernel="off",
                   underlay="eth0")
    d = start_node(testbed, "10.244.4.0/24")
    yield from linked(a, b, c, d)


def kernel(node: Node) -> dict[str, int]:
    return node.fastpath.stats()["kernel"]


def tc_filters(node: Node, *where: str) -> str:
    return node.host.run("tc", "filter", "show", "dev", *where).stdout


def link_fdinfo(fd: int) -> dict[str, str]:
    """The kernel's own account of a descriptor (a tcx link: link_id, prog_id, ifindex...)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def link_ids(kept: dict[str, int]) -> list[str]:
    """The ids of the kernel path's links among kept descriptors: FastPath.kept()'s, or the fd
    store's (named udp-kernel-...)."""
    return [link_fdinfo(fd)["link_id"] for name, fd in kept.items()
            if name.endswith(("kernel-ingress", "kernel-egress"))]


def program_name(prog_id: str) -> str:
    return json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", prog_id],
                                     capture_output=True, text=True, check=True).stdout)["name"]


def attached(fastpath: FastPath) -> dict[str, tuple[int, str]]:
    """Program name -> (interface index, direction) of the fast path's tcx links, as the kernel
    and bpftool tell."""
    found = {}
    for name, fd in fastpath.kept().items():
        info = link_fdinfo(fd) if name.startswith("kernel-") else {}
        if info.get("link_type") == "tcx":
            found[program_name(info["prog_id"])] = (int(info["ifindex"]),
                                                    info["attach_type"].split()[1][1:-1])
    return found


def link_exists(link_id: str) -> bool:
    return subprocess.run(["bpftool", "link", "show", "id", link_id],
                          capture_output=True).returncode == 0


def test_the_programs_are_attached_where_the_mode_says(trio: tuple[Node, Node, Node, Node]) -> None:
    a, _, c, _ = trio
    assert a.fastpath.kernel_missing == ""
    with inside(a.host.netns):
        eth0, tun = (socket.if_nametoindex(n) for n in ("eth0", a.fastpath.tun_name))
    assert attached(a.fastpath) == {"udp_ingress": (eth0, "ingress"),
                                    "tun_egress": (tun, "egress")}
    assert c.fastpath.kernel == "off" and attached(c.fastpath) == {}
    # tcx links: nothing hangs on the interfaces as a classic tc filter.
    for node in (a, c):
        assert tc_filters(node, "eth0", "ingress") == ""


def udp_burst(src: Node, dst: Node, count: int = 300, size: int = 1000) -> list[bytes]:
    """count datagrams from src's container to dst's; returns what dst's container got."""
    sender, receiver = container_udp(src.host, dst.host)
    got = []
    with sender, receiver:
        for i in range(count):
            sender.sendto(i.to_bytes(4, "big") * (size // 4), receiver.getsockname())
            if i % 50 == 49:
                time.sleep(0.01)
        try:
            while len(got) < count:
                got.append(receiver.recv(65536))
        except TimeoutError:
            pass
    return got


def test_small_packets_go_in_the_kernel_and_bulk_tcp_through_the_loops(
        trio: tuple[Node, Node, Node, Node]) -> None:
    a, b, _, _ = trio
    before_a, before_b = settled_stats(a, b)
    got = udp_burst(a, b)
    after_a, after_b = settled_stats(a, b)
    assert got == [i.to_bytes(4, "big") * 250 for i in range(300)]
    assert after_a["kernel"]["tx_packets"] - before_a["kernel"]["tx_packets"] == 300
    assert after_a["kernel"]["tx_bytes"] - before_a["kernel"]["tx_bytes"] == 300 * 1028
    assert after_b["kernel"]["rx_packets"] - before_b["kernel"]["rx_packets"] == 300
    assert after_a["tx"]["packets"] == before_a["tx"]["packets"]
    assert after_b["rx"]["packets"] == before_b["rx"]["packets"]
    # A veth hands frames to the peer's stack as they are: TCP's super-packets go to the
    # loops (which cut them), and the rest of their flow with them, so none overtakes another.
    for src, dst in ((a, b), (b, a)):
        before_src = settled_stats(src)[0]
        moved = tcp_transfer(dst.host.container_netns, dst.host.container_ip,
                             src.host.container_netns, nbytes=20 << 20)
        after_src = src.fastpath.stats()
        assert after_src["tx"]["bytes"] - before_src["tx"]["bytes"] > moved
        assert after_src["tx"]["tso_superpackets"] > before_src["tx"]["tso_superpackets"]
        assert after_src["kernel"]["tx_passed"] > before_src["kernel"]["tx_passed"]


@contextmanager
def merged_then_single(a: Node, receivers_netns: str, sender_netns: str, bind_to: str,
                       inner_header: int, packet: Callable[[int, int], bytes]
                       ) -> Iterator[tuple[socket.socket, socket.socket, dict[str, int]]]:
    """From sender_netns, one UDP_SEGMENT send of three packets for a socket `held` on a (UDP
    GRO merges them: to the loops), then a fourth for it and one for another socket, each in a
    datagram of its own: all arrive, in order, the fourth held behind the loops, the other
    flow's on the kernel path. packet(port, i) is the i-th inner packet (100 bytes of payload)
    for the socket at port. Yields held, the sending socket of single datagrams and a's kernel
    path counters after."""
    family = socket.AF_INET6 if ":" in bind_to else socket.AF_INET
    with inside(receivers_netns):
        held, other = (socket.socket(family, socket.SOCK_DGRAM) for _ in range(2))
    with inside(sender_netns):
        merged, single = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    merged.setsockopt(socket.SOL_UDP, UDP_SEGMENT, inner_header + 100)  # one inner packet each
    with held, other, merged, single:
        for receiver in (held, other):
            receiver.bind((bind_to, 0))
            receiver.settimeout(5)
        port = held.getsockname()[1]
        before = settled_stats(a)[0]["kernel"]
        merged.sendto(b"".join(packet(port, i) for i in range(3)), (a.host.underlay_ip, PORT))
        single.sendto(packet(port, 3), (a.host.underlay_ip, PORT))
        single.sendto(packet(other.getsockname()[1], 0), (a.host.underlay_ip, PORT))
        assert [held.recv(1024) for _ in range(4)] == [
            i.to_bytes(4, "big") * 25 for i in range(4)]
        assert other.recv(1024) == bytes(100)
        after = settled_stats(a)[0]["kernel"]
        moved = {name: after[name] - before[name]
                 for name in ("rx_passed", "rx_in_order", "rx_packets")}
        assert moved == {"rx_passed": 2, "rx_in_order": 1, "rx_packets": 1}
        yield held, single, after


def test_a_flow_that_went_to_the_loops_merged_keeps_its_order(
        trio: tuple[Node, Node, Node, Node]) -> None:
    """A datagram that UDP GRO merged from many goes to the loops (one UDP_SEGMENT send from b's
    host arrives as such); the next one of a flow it carried follows it there for 100 ms
    (udp_tc.bpf.c's BULK_HOLD_NS) instead of overtaking it on the kernel path, while another
    flow's takes the kernel path at once."""
    a, b, _, _ = trio
    assert a.host.container_netns and a.host.container_ip
    container_ip = a.host.container_ip

    def packet(port: int, i: int) -> bytes:
        """The i-th packet for the port, from b's subnet (as the source check asks)."""
        return inner_udp("10.244.2.9", container_ip, port, i.to_bytes(4, "big") * 25)
    with merged_then_single(a, a.host.container_netns, b.host.netns, container_ip, 28,
                            packet) as (held, single, after):
        time.sleep(0.2)  # the hold is over: the flow takes the kernel path again
        single.sendto(packet(held.getsockname()[1], 4), (a.host.underlay_ip, PORT))
        assert held.recv(1024) == (4).to_bytes(4, "big") * 25
        final = settled_stats(a)[0]["kernel"]
        assert final["rx_packets"] - after["rx_packets"] == 1
        assert final["rx_in_order"] == after["rx_in_order"]


def test_a_host_without_the_kernel_path_gets_finished_checksums_and_no_super_packets(
        trio: tuple[Node, Node, Node, Node]) -> None:
    a, _, _, d = trio
    before_a = settled_stats(a)[0]
    # The container's sockets leave their checksums to the veth: the kernel path finishes them,
    # or d's container would drop every datagram and segment.
    assert udp_burst(a, d) == [i.to_bytes(4, "big") * 250 for i in range(300)]
    assert a.fastpath.stats()["kernel"]["tx_packets"] - before_a["kernel"]["tx_packets"] == 300
    for src, dst in ((a, d), (d, a)):
        assert tcp_transfer(dst.host.container_netns, dst.host.container_ip,
                            src.host.container_netns, nbytes=8 << 20) == 8 << 20


def test_the_kernel_path_works_with_a_peer_as_plain_as_flanneld_s_proxy(
        trio: tuple[Node, Node, Node, Node]) -> None:
    a, _, c, _ = trio
    for src, dst in ((a, c), (c, a)):
        result = src.host.in_container("ping", "-c", "2", "-i", "0.2", "-W", "2",
                                       dst.host.container_ip, check=False)
        assert "2 received" in result.stdout, result.stdout + result.stderr
    before_a, before_c = settled_stats(a, c)
    moved = tcp_transfer(c.host.container_netns, c.host.container_ip, a.host.container_netns,
                         nbytes=8 << 20)
    moved += tcp_transfer(a.host.container_netns, a.host.container_ip, c.host.container_netns,
                          nbytes=8 << 20)
    after_a, after_c = a.fastpath.stats(), c.fastpath.stats()
    # c's loops carried both ways, one datagram per packet; a received those in the kernel
    # and sent its small packets (ACKs) from there, its super-packets from its loops.
    assert after_c["tx"]["bytes"] - before_c["tx"]["bytes"] > 8 << 20
    assert after_c["rx"]["bytes"] - before_c["rx"]["bytes"] > 8 << 20
    assert after_a["kernel"]["rx_packets"] - before_a["kernel"]["rx_packets"] > 1000
    assert after_a["kernel"]["tx_packets"] > before_a["kernel"]["tx_packets"]
    assert moved == 16 << 20


def test_wire_format_is_flanneld_s_with_the_inner_ttl_one_lower(
        trio: tuple[Node, Node, Node, Node]) -> None:
    a, b, _, _ = trio
    marker = b"kernel-path-" + str(time.monotonic_ns()).encode()
    wire_tap = capture(b.host.netns, "eth0")
    with wire_tap:
        with inside(a.host.container_netns):
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sender.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 30)
        with sender:
            sender.sendto(marker, (b.host.container_ip, 9))
        outer = find(wire_tap, marker, socket.PACKET_HOST, time.monotonic() + 5)
    version_ihl, _, total, ident, frag, ttl, proto, _ = struct.unpack("!BBHHHBBH", outer[:12])
    src_port, dst_port, udp_len, udp_sum = struct.unpack("!HHHH", outer[20:28])
    inner = outer[28:]
    # What flanneld's socket sends: no options, DF, TTL 64, UDP from our port to the peer's.
    assert (version_ihl, frag, ttl, proto) == (0x45, 0x4000, 64, socket.IPPROTO_UDP)
    assert outer[12:16] == socket.inet_aton(a.host.underlay_ip)
    assert outer[16:20] == socket.inet_aton(b.host.underlay_ip)
    assert (src_port, dst_port) == (PORT, PORT)
    assert total == len(outer) and udp_len == len(outer) - 20
    assert udp_sum == 0  # optional for UDP over IPv4; the inner packet has its own
    # The payload is the inner packet: the container's TTL 30, less one for each host's
    # forwarding into flannel0 and one for the sending side of the backend, as flanneld does.
    assert inner[9] == socket.IPPROTO_UDP and inner[8] == 30 - 2
    assert inner[12:16] == socket.inet_aton(a.host.container_ip)
    assert inner[16:20] == socket.inet_aton(b.host.container_ip)
    assert inner.endswith(marker)
    # Finished here, though the container's socket left it to the veth.
    pseudo = inner[12:20] + struct.pack("!BBH", 0, socket.IPPROTO_UDP, len(inner) - 20)
    assert reference_checksum(pseudo + inner[20:]) == 0


def test_what_the_programs_pass_on_still_gets_the_loops_answer(
        trio: tuple[Node, Node, Node, Node]) -> None:
    a, b, _, _ = trio
    before = settled_stats(a)[0]
    result = a.host.in_container("ping", "-c", "1", "-W", "2", "10.244.99.5", check=False)
    assert "Destination Net Unreachable" in result.stdout, result.stdout
    # TTL 2: one left after a's forwarding, which the backend may not spend.
    a.host.in_container("ping", "-c", "1", "-W", "1", "-t", "2", b.host.container_ip,
                        check=False)
    after = a.fastpath.stats()
    assert after["kernel"]["tx_passed"] - before["kernel"]["tx_passed"] == 2
    assert after["tx"]["icmp_unreachable"] - before["tx"]["icmp_unreachable"] == 1
    assert after["tx"]["drop_ttl"] - before["tx"]["drop_ttl"] == 1


def test_a_route_removed_and_set_again_takes_effect_in_the_kernel(
        trio: tuple[Node, Node, Node, Node]) -> None:
    a, b, _, _ = trio
    a.fastpath.del_route(b.subnet)
    try:
        result = a.host.in_container("ping", "-c", "1", "-W", "2", b.host.container_ip,
                                     check=False)
        assert "Destination Net Unreachable" in result.stdout, result.stdout
    finally:
        a.fastpath.set_route(b.subnet, b.host.underlay_ip, PORT)
    result = a.host.in_container("ping", "-c", "1", "-W", "2", b.host.container_ip,
                                 check=False)
    assert "1 received" in result.stdout, result.stdout


def next_hops(node: Node, table: str = "next_hops") -> dict[str, str]:
    """tun_egress's next-hop cache (udp_tc.bpf.c's next_hops, or next_hops6 of the IPv6 routes)
    as bpftool reads it: peer PublicIP -> the destination MAC in the entry looked up last, of all
    CPUs' entries that name a neighbour."""
    egress = link_fdinfo(node.fastpath.kept()["kernel-egress"])["prog_id"]
    program = json.loads(sh("bpftool", "-j", "prog", "show", "id", egress).stdout)
    for map_id in program["map_ids"]:
        if json.loads(sh("bpftool", "-j", "map", "show", "id", str(map_id)).stdout)[
                "name"] == table:
            dump = json.loads(sh("bpftool", "-j", "map", "dump", "id", str(map_id)).stdout)
            break
    else:
        raise AssertionError(f"tun_egress (program {egress}) has no map {table}")
    latest: dict[str, tuple[int, str]] = {}
    for entry in dump:
        for per_cpu in entry["formatted"]["values"]:
            hop = per_cpu["value"]
            peer = str(ipaddress.IPv4Address(struct.pack("=I", hop["peer"])))
            if hop["resolved"] and hop["checked"] > latest.get(peer, (0, ""))[0]:
                latest[peer] = (hop["checked"], ":".join(
                    f"{byte:02x}" for byte in hop["eth"]["h_dest"]))
    return {peer: found for peer, (_, found) in latest.items()}


def a_new_mac_is_followed(a: Node, b: Node, table: str, new: str,
                          send: Callable[[bytes], None]) -> None:
    """b's underlay gets the MAC `new` (one no other test gives: the bridge would still send it
    to that test's host), and a's neighbour entry what ARP (or ND) would learn. Once
    every CPU's entry in a's `table` is due (NEXT_HOP_CHECK_NS, 100 ms), the next packet looks
    again and the following ones carry the new MAC, not the cached one, else b's interface sees
    them as another host's (PACKET_OTHERHOST). send(payload) sends a packet from a to b."""
    old = b.host.link("eth0")["address"]
    tap = capture(b.host.netns, "eth0")
    try:
        b.host.run("ip", "link", "set", "eth0", "address", new)
        a.host.run("ip", "neigh", "replace", b.host.underlay_ip, "lladdr", new, "dev", "eth0",
                   "nud", "reachable")
        time.sleep(0.3)
        for _ in range(5):
            send(b"look again")
        assert next_hops(a, table)[b.host.underlay_ip] == new
        marker = b"new-mac-" + str(time.monotonic_ns()).encode()
        send(marker)
        find(tap, marker, socket.PACKET_HOST, time.monotonic() + 5)
    finally:
        tap.close()
        b.host.run("ip", "link", "set", "eth0", "address", old)
        a.host.run("ip", "neigh", "replace", b.host.underlay_ip, "lladdr", old, "dev", "eth0",
                   "nud", "reachable")


def test_the_next_hop_is_cached_and_a_neighbour_s_new_mac_is_followed(
        trio: tuple[Node, Node, Node, Node]) -> None:
    a, b, _, _ = trio
    assert a.host.container_netns and b.host.container_ip
    # The first packets find no neighbour yet (bpf_redirect_neigh resolves it); a look 100 ms
    # later finds it.
    wait_for(lambda: udp_burst(a, b, count=5) and b.host.underlay_ip in next_hops(a), 5,
             "a's next hop to b to be cached")
    assert next_hops(a)[b.host.underlay_ip] == b.host.link("eth0")["address"]
    with inside(a.host.container_netns):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sender:
        a_new_mac_is_followed(a, b, "next_hops", "02:00:5e:10:00:01",
                              lambda payload: sender.sendto(payload, (b.host.container_ip, 9)))


def test_a_killed_daemon_leaves_nothing_attached_and_stop_leaves_nothing(
        testbed: Testbed) -> None:
    host = testbed.add_host()
    killed = host.run(sys.executable, "-c", (
        "import os, signal; from fastpath import FastPath; "
        "from tests.test_kernel_path import link_ids; "
        f"fp = FastPath({NETWORK!r}, {SUBNET_LEN}, {host.underlay_ip!r}, {PORT}, "
        "kernel='on', underlay='eth0'); fp.start(); "
        "print(*link_ids(fp.kept()), flush=True); os.kill(os.getpid(), signal.SIGKILL)"),
        check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    links = killed.stdout.split()
    assert len(links) == 2
    assert not any(link_exists(link_id) for link_id in links)
    fp = FastPath(NETWORK, SUBNET_LEN, host.underlay_ip, PORT, kernel="on", underlay="eth0")
    with inside(host.netns):
        fp.start()
    links = link_ids(fp.kept())
    assert len(links) == 2 and all(link_exists(link_id) for link_id in links)
    fp.stop()
    assert not any(link_exists(link_id) for link_id in links)


class WithoutTcx:
    """libbpf as on a kernel older than 6.6, which has no tcx links."""

    def __init__(self, lib: object) -> None:
        self._lib = lib

    def __getattr__(self, name: str) -> object:
        return getattr(self._lib, name)

    @staticmethod
    def bpf_link_create(*args: object) -> int:
        return -errno.EINVAL


def test_without_tcx_classic_filters_carry_it_and_one_a_killed_daemon_left_goes(
        testbed: Testbed, monkeypatch: pytest.MonkeyPatch) -> None:
    node = start_node(testbed, "10.244.9.0/24")
    host = node.host
    try:
        # What a SIGKILLed daemon on an older kernel leaves: its ingress filter, pointing at a
        # TUN that is gone.
        killed = host.run(sys.executable, "-c", (
            "import os, signal; from fastpath import FastPath, udp_tc; "
            "from tests.test_kernel_path import WithoutTcx; "
            "lib = udp_tc._lib(); udp_tc._lib = lambda: WithoutTcx(lib); "
            f"FastPath({NETWORK!r}, {SUBNET_LEN}, {host.underlay_ip!r}, {PORT + 1}, "
            "kernel='on', underlay='eth0').start(); os.kill(os.getpid(), signal.SIGKILL)"),
            check=False)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert f"pref {FILTER_PRIORITY}" in tc_filters(node, "eth0", "ingress")
        # A later run with tcx links removes it.
        restarted = FastPath(NETWORK, SUBNET_LEN, host.underlay_ip, PORT + 1, kernel="on",
                             underlay="eth0")
        with inside(host.netns):
            restarted.start()
        assert f"pref {FILTER_PRIORITY}" not in tc_filters(node, "eth0", "ingress")
        assert "udp_ingress" in attached(restarted)
        restarted.stop()
        # Without tcx the filters carry the kernel path, keep nothing for a restart, and stop
        # takes the underlay's away.
        lib = udp_tc._lib()
        monkeypatch.setattr(udp_tc, "_lib", lambda: WithoutTcx(lib))
        assert udp_tc.probe() == ("", False)  # as `python -m fastpath` would say
        classic = FastPath(NETWORK, SUBNET_LEN, host.underlay_ip, PORT + 1, kernel="on",
                           underlay="eth0")
        with inside(host.netns):
            classic.start()
        assert classic.kernel == "on"
        assert "udp_ingress" in tc_filters(node, "eth0", "ingress")
        assert "tun_egress" in tc_filters(node, classic.tun_name, "egress")
        assert set(classic.kept()) == set(KEPT)
        classic.stop()
        assert f"pref {FILTER_PRIORITY}" not in tc_filters(node, "eth0", "ingress")
        # And a fast path with the kernel path off removes one a killed daemon left.
        host.run(sys.executable, "-c", killed.args[-1], check=False)
        assert f"pref {FILTER_PRIORITY}" in tc_filters(node, "eth0", "ingress")
        off = FastPath(NETWORK, SUBNET_LEN, host.underlay_ip, PORT + 1, underlay="eth0")
        with inside(host.netns):
            off.start()
        off.stop()
        assert f"pref {FILTER_PRIORITY}" not in tc_filters(node, "eth0", "ingress")
    finally:
        node.fastpath.stop()


@contextmanager
def kept_pair(testbed: Testbed, first: str, second: str, first6: str | None = None,
              second6: str | None = None
              ) -> Iterator[tuple[Node, Node, dict[str, int], list[FastPath]]]:
    """Two linked nodes with the kernel path (dual-stack with IPv6 subnets), and what systemd's
    fd store would hold of the first's fast path across a restart (its kept descriptors,
    duplicated). The fast paths resumed from them go in the list: all are stopped at the end."""
    a = start_node(testbed, first, kernel="on", underlay="eth0", subnet6=first6)
    b = start_node(testbed, second, kernel="on", underlay="eth0", subnet6=second6)
    link(a, b)
    resumed: list[FastPath] = []
    try:
        yield a, b, {name: os.dup(fd) for name, fd in a.fastpath.kept().items()}, resumed
    finally:
        for fp in (*resumed, a.fastpath, b.fastpath):
            fp.stop()


def resume(node: Node, store: dict[str, int], resumed: list[FastPath]) -> FastPath:
    """The next run's fast path on node's host, from the fd store."""
    with inside(node.host.netns):
        fp = FastPath.resume(store, kernel="on")
    assert fp is not None and store == {}
    resumed.append(fp)
    return fp


def test_kept_links_forward_while_no_process_runs_and_a_resume_goes_on_with_them(
        testbed: Testbed) -> None:
    """What systemd's fd store does across a restart: it holds the kept descriptors while no
    daemon runs. The kernel path keeps forwarding, and the next run takes the same links and
    maps back without loading the programs again."""
    with kept_pair(testbed, "10.244.11.0/24", "10.244.12.0/24") as (a, b, store, resumed):
        links = attached(a.fastpath)
        before = kernel(a)
        a.fastpath.stop()
        assert b.host.container_ip
        # No loops run on a now: the pings go and come back through its kept programs.
        result = a.host.in_container("ping", "-c", "3", "-i", "0.2", "-W", "1",
                                     b.host.container_ip, check=False)
        assert "3 received" in result.stdout, result.stdout
        fp = resume(a, store, resumed)
        assert attached(fp) == links  # the same programs, still where they were
        assert fp.table.routes() == [(b.subnet, (b.host.underlay_ip, PORT))]
        after = kernel(Node(a.host, a.subnet, fp))
        assert after["tx_packets"] >= before["tx_packets"] + 3
        assert after["rx_packets"] >= before["rx_packets"] + 3
        fp.del_route(b.subnet)  # one map, written through the resumed fast path
        result = a.host.in_container("ping", "-c", "1", "-W", "2", b.host.container_ip,
                                     check=False)
        assert "Destination Net Unreachable" in result.stdout, result.stdout


def test_kept_ipv6_routes_forward_while_no_process_runs_and_a_resume_goes_on_with_them(
        testbed: Testbed) -> None:
    """As above, dual-stack: the IPv6 route map is kept with the rest, and the resumed fast
    path writes it."""
    with kept_pair(testbed, "10.244.17.0/24", "10.244.18.0/24", "fd00:0:0:17::/64",
                   "fd00:0:0:18::/64") as (a, b, store, resumed):
        assert "kernel-routes6" in store
        before = kernel(a)
        a.fastpath.stop()
        result = a.host.run("ping", "-6", "-c", "3", "-i", "0.2", "-W", "1", b.address6,
                            check=False)
        assert "3 received" in result.stdout, result.stdout
        fp = resume(a, store, resumed)
        assert fp.table6 is not None
        assert fp.table6.routes() == [(b.subnet6, (b.host.underlay_ip, PORT))]
        after = kernel(Node(a.host, a.subnet, fp))
        assert after["tx_packets"] >= before["tx_packets"] + 3
        assert after["rx_packets"] >= before["rx_packets"] + 3
        fp.del_route(b.subnet6)
        result = a.host.run("ping", "-6", "-c", "1", "-W", "2", b.address6, check=False)
        assert "Destination unreachable: No route" in result.stdout, result.stdout
        assert kernel(Node(a.host, a.subnet, fp))["tx_passed"] > after["tx_passed"]


def test_kept_maps_of_another_ipv6_network_are_loaded_afresh(testbed: Testbed) -> None:
    """A restart whose levers name another IPv6 Network than the kept one: the kept route maps
    do not fit it, so the next run loads its own programs and maps, and carries IPv6."""
    with kept_pair(testbed, "10.244.19.0/24", "10.244.20.0/24", "fd00:0:0:19::/64",
                   "fd00:0:0:20::/64") as (a, b, store, resumed):
        ids = link_ids(store)
        a.fastpath.stop()
        with inside(a.host.netns):
            fp = FastPath.resume(store, kernel="on", ipv6_network="fd00::/56")
        assert fp is not None
        resumed.append(fp)
        assert not set(link_ids(fp.kept())) & set(ids)
        fp.set_route(b.subnet6, b.host.underlay_ip, PORT)
        before = kernel(Node(a.host, a.subnet, fp))
        result = a.host.run("ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", b.address6,
                            check=False)
        assert "2 received" in result.stdout, result.stdout
        assert kernel(Node(a.host, a.subnet, fp))["tx_packets"] - before["tx_packets"] == 2


def another_builds_config(fd: int) -> None:
    """Make a kept config map say that another build's loader wrote it."""
    lib, key = udp_tc._lib(), ctypes.c_uint32(0)
    value = ctypes.create_string_buffer(udp_tc.CONFIG.size)
    assert lib.bpf_map_lookup_elem(fd, ctypes.byref(key), value) == 0
    value.raw = value.raw[:-udp_tc.BUILD_LEN] + bytes(udp_tc.BUILD_LEN)
    assert lib.bpf_map_update_elem(fd, ctypes.byref(key), value, udp_tc.BPF_ANY) == 0


def test_kept_programs_of_another_build_are_loaded_afresh(testbed: Testbed) -> None:
    """An upgrade's restart: what the kept descriptors hold is not this build's kernel path
    (its config map names another build; then an older build's, whose config has another
    layout), so the next run loads its own and forwards."""
    with kept_pair(testbed, "10.244.15.0/24", "10.244.16.0/24") as (a, b, store, resumed):
        links = attached(a.fastpath)

        def resume_afresh(stopped: FastPath, store: dict[str, int]) -> FastPath:
            """The next run, from store: the same attachments, none of the kept links."""
            ids = link_ids(store)
            stopped.stop()
            fp = resume(a, store, resumed)
            assert attached(fp) == links and not set(link_ids(fp.kept())) & set(ids)
            return fp
        another_builds_config(store["kernel-config"])
        fp = resume_afresh(a.fastpath, store)
        older = {name: os.dup(fd) for name, fd in fp.kept().items()}
        os.close(older["kernel-config"])
        older["kernel-config"] = os.dup(older["kernel-counters"])
        fp = resume_afresh(fp, older)
        assert b.host.container_ip
        result = a.host.in_container("ping", "-c", "2", "-i", "0.2", "-W", "2",
                                     b.host.container_ip, check=False)
        assert "2 received" in result.stdout, result.stdout
        assert kernel(Node(a.host, a.subnet, fp))["tx_packets"] >= 2


def test_the_receive_device_takes_whole_super_packets_while_no_process_runs_and_after(
        testbed: Testbed) -> None:
    """Across a restart through the fd store, as above: the device's filter stays on it (a
    classic filter) while no process runs, and the next run goes on with the kept program."""
    e = start_node(testbed, "10.244.13.0/24", kernel="on", underlay="eth0",
                   whole_superpackets=True)
    h = start_node(testbed, "10.244.14.0/24", kernel="on", underlay="eth0",
                   whole_superpackets=True, vxlan_receiver=RX_VXLAN_DEVICE)
    link(e, h)
    resumed = None

    def whole_sent() -> int:
        """Super-packets e sent h whole during one TCP transfer, h's hello fresh."""
        wait_for(lambda: e.fastpath.whole_peers().get(h.host.underlay_ip, 99) < 1, 5,
                 "e noted h's hello")
        before = e.fastpath.stats()["kernel"]["tx_superpackets"]
        tcp(e, h)
        return settled_stats(e)[0]["kernel"]["tx_superpackets"] - before
    try:
        assert h.fastpath.through_vxlan and say_hello(h, e) == 1
        store = {name: os.dup(fd) for name, fd in h.fastpath.kept().items()}
        assert "kernel-vxlan_ingress" in store
        h.fastpath.stop()
        sent = whole_sent()  # while no process runs on h: its hello lasts 7 s
        assert sent > 0
        with inside(h.host.netns):
            resumed = FastPath.resume(store, kernel="on", whole_superpackets=True,
                                      vxlan_receiver=RX_VXLAN_DEVICE)
        assert resumed is not None and store == {} and resumed.through_vxlan
        arrived = resumed.stats()["kernel"]["rx_vxlan_arrived"]
        assert arrived == sent
        assert say_hello(Node(h.host, h.subnet, resumed), e) == 1
        sent = whole_sent()
        assert sent > 0
        assert settled_stats(Node(h.host, h.subnet, resumed))[0]["kernel"][
            "rx_vxlan_arrived"] == arrived + sent
    finally:
        for fp in (resumed, e.fastpath, h.fastpath):
            if fp is not None:
                fp.stop()


def test_a_network_too_big_for_the_kernel_path_keeps_the_loops(testbed: Testbed) -> None:
    host = testbed.add_host()
    # 10.0.0.0/8 in /30s: 4 M subnets, more than the kernel path's route array takes.
    fp = FastPath("10.0.0.0/8", 30, host.underlay_ip, PORT, kernel="on", underlay="eth0")
    with inside(host.netns):
        fp.start()
    try:
        assert fp.kernel == "off" and "more than the kernel path" in fp.kernel_missing
        assert fp.running and "kernel" not in fp.stats()
    finally:
        fp.stop()


def test_the_kernel_path_needs_the_underlay_and_a_known_mode() -> None:
    with pytest.raises(ValueError, match="underlay"):
        FastPath(NETWORK, SUBNET_LEN, "198.18.0.1", PORT, kernel="on")
    for mode in ("yes", "rx"):
        with pytest.raises(ValueError, match="is not one of off, on"):
            FastPath(NETWORK, SUBNET_LEN, "198.18.0.1", PORT, kernel=mode, underlay="eth0")


@pytest.fixture(scope="module")
def whole(testbed: Testbed) -> Iterator[tuple[Node, Node, Node, Node]]:
    # e sends TCP super-packets whole to the peers that said hello; f takes them (its loops
    # write them into its TUN whole); g has neither offloads nor batching, as flanneld: it
    # cannot take them and never says hello; h takes them through its receive device.
    e = start_node(testbed, "10.244.5.0/24", kernel="on", underlay="eth0",
                   whole_superpackets=True)
    f = start_node(testbed, "10.244.6.0/24", kernel="on", underlay="eth0",
                   whole_superpackets=True)
    g = start_node(testbed, "10.244.7.0/24", batch=1, offload=False)
    h = start_node(testbed, "10.244.8.0/24", kernel="on", underlay="eth0",
                   whole_superpackets=True, vxlan_receiver=RX_VXLAN_DEVICE)
    yield from linked(e, f, g, h)


def say_hello(src: Node, dst: Node) -> int:
    """src's hello to dst, as the daemon says it every HELLO_SECONDS."""
    return src.fastpath.greet(
        ipaddress.IPv4Network(src.subnet).network_address,
        {(dst.host.underlay_ip, PORT): ipaddress.IPv4Network(dst.subnet).network_address})


def tcp(src: Node, dst: Node) -> None:
    assert dst.host.container_netns and dst.host.container_ip and src.host.container_netns
    assert tcp_transfer(dst.host.container_netns, dst.host.container_ip,
                        src.host.container_netns, nbytes=8 << 20) == 8 << 20


def test_super_packets_cross_whole_only_to_a_peer_that_said_hello(
        whole: tuple[Node, Node, Node, Node]) -> None:
    e, f, g, _ = whole
    assert e.fastpath.sends_whole and f.fastpath.sends_whole
    assert not f.fastpath.through_vxlan and f.fastpath.vxlan_missing == "not asked for"
    # No hello yet: e's loops cut its super-packets, as for any peer.
    before_e, before_f = settled_stats(e, f)
    tcp(e, f)
    after_e, after_f = settled_stats(e, f)
    assert after_e["tx"]["tso_superpackets"] > before_e["tx"]["tso_superpackets"]
    assert after_e["kernel"]["tx_superpackets"] == before_e["kernel"]["tx_superpackets"]
    assert after_f["rx"]["whole_superpackets"] == before_f["rx"]["whole_superpackets"]
    # f says hello: e's kernel path notes it, and sends it super-packets whole from then on,
    # which f's loops write into its TUN as they came.
    assert say_hello(f, e) == 1
    wait_for(lambda: f.host.underlay_ip in e.fastpath.whole_peers(), 5, "e noted f's hello")
    assert e.fastpath.stats()["kernel"]["rx_hellos"] == after_e["kernel"]["rx_hellos"] + 1
    tcp(e, f)
    whole_e, whole_f = settled_stats(e, f)
    sent_whole = whole_e["kernel"]["tx_superpackets"] - after_e["kernel"]["tx_superpackets"]
    assert sent_whole > 0
    assert whole_e["tx"]["tso_superpackets"] == after_e["tx"]["tso_superpackets"]
    assert whole_f["rx"]["whole_superpackets"] - after_f["rx"]["whole_superpackets"] == sent_whole
    # and the datagrams of their flows that followed them to the loops (kept in order)
    passed = {name: whole_f["kernel"][name] - after_f["kernel"][name]
              for name in ("rx_passed", "rx_in_order")}
    assert passed["rx_passed"] - passed["rx_in_order"] == sent_whole
    # g never said hello (it cannot take them): e cuts what it sends g, and g reads every
    # datagram whole.
    assert say_hello(g, e) == 0
    before_g = settled_stats(g)[0]
    tcp(e, g)
    assert g.fastpath.stats()["rx"]["drop_too_big"] == before_g["rx"]["drop_too_big"]
    assert g.host.underlay_ip not in e.fastpath.whole_peers()


def test_a_hello_lasts_seven_seconds_and_a_foreign_one_is_not_noted(
        whole: tuple[Node, Node, Node, Node]) -> None:
    e, f, g, _ = whole
    say_hello(f, e)
    wait_for(lambda: e.fastpath.whole_peers().get(f.host.underlay_ip, 99) < 1, 5,
             "e noted f's hello")
    # A hello whose inner source is not in the sender's subnet (here f's, sent by g's host).
    hello = hello_packet(ipaddress.IPv4Network(f.subnet).network_address,
                         ipaddress.IPv4Network(e.subnet).network_address)
    before_e = e.fastpath.stats()["kernel"]
    with inside(g.host.netns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(hello, (e.host.underlay_ip, PORT))
    wait_for(lambda: e.fastpath.stats()["kernel"]["rx_hellos"] > before_e["rx_hellos"], 5,
             "e saw the foreign hello")
    assert g.host.underlay_ip not in e.fastpath.whole_peers()
    # Once f's hello is 7 s old, e cuts again what it sends f.
    time.sleep(7.5)
    before_e = settled_stats(e)[0]
    tcp(e, f)
    after_e = settled_stats(e)[0]
    assert after_e["kernel"]["tx_superpackets"] == before_e["kernel"]["tx_superpackets"]
    assert after_e["tx"]["tso_superpackets"] > before_e["tx"]["tso_superpackets"]


def test_with_tso_off_on_the_underlay_super_packets_are_cut_again(
        whole: tuple[Node, Node, Node, Node]) -> None:
    """A veth with TSO off would cut a whole super-packet in software into datagrams the peer
    cannot merge: the fast path follows the setting (the daemon refreshes every 2 s)."""
    e, f, _, _ = whole
    say_hello(f, e)
    wait_for(lambda: e.fastpath.whole_peers().get(f.host.underlay_ip, 99) < 1, 5,
             "e noted f's hello")
    e.host.run("ethtool", "-K", "eth0", "tso", "off")
    try:
        with inside(e.host.netns):  # where the daemon runs, as the fast path started
            e.fastpath.refresh()
        assert not e.fastpath.sends_whole
        before_e = settled_stats(e)[0]
        tcp(e, f)
        after_e = settled_stats(e)[0]
        assert after_e["kernel"]["tx_superpackets"] == before_e["kernel"]["tx_superpackets"]
        assert after_e["tx"]["tso_superpackets"] > before_e["tx"]["tso_superpackets"]
    finally:
        e.host.run("ethtool", "-K", "eth0", "tso", "on")
    with inside(e.host.netns):
        e.fastpath.refresh()
    assert e.fastpath.sends_whole


def vxlan_packet(src: Node, dst: Node) -> bytes:
    """A VXLAN packet for dst's receive device (VNI 1) holding a UDP packet from src's subnet
    to dst's container: what anyone could send to the device's port."""
    assert dst.host.container_ip
    udp = struct.pack("!HHHH", 5000, 5000, 8 + 4, 0) + b"evil"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
                     ipaddress.IPv4Network(src.subnet).network_address.packed,
                     ipaddress.IPv4Address(dst.host.container_ip).packed)
    ip = ip[:10] + struct.pack("!H", reference_checksum(ip)) + ip[12:]
    vxlan = bytes([0x08, 0, 0, 0]) + udp_tc.RX_VXLAN_VNI.to_bytes(3, "big") + b"\0"
    return vxlan + bytes(12) + struct.pack("!H", 0x0800) + ip + udp


def test_whole_super_packets_go_in_through_the_vxlan_device_and_nothing_else_does(
        whole: tuple[Node, Node, Node, Node]) -> None:
    e, _, g, h = whole
    assert h.fastpath.through_vxlan and h.fastpath.vxlan_missing == ""
    assert f"{RX_VXLAN_DEVICE}:" in h.host.run("ip", "link", "show", "up").stdout
    assert say_hello(h, e) == 1
    wait_for(lambda: h.host.underlay_ip in e.fastpath.whole_peers(), 5, "e noted h's hello")
    before_e, before_h = settled_stats(e, h)
    tcp(e, h)
    after_e, after_h = settled_stats(e, h)

    def moved(name: str) -> int:
        return after_h["kernel"][name] - before_h["kernel"][name]
    sent_whole = after_e["kernel"]["tx_superpackets"] - before_e["kernel"]["tx_superpackets"]
    assert sent_whole > 0
    # All of them through the device, counted as received by the kernel path; none by the loops.
    assert moved("rx_vxlan_handed") == moved("rx_vxlan_arrived") == sent_whole
    assert moved("rx_superpackets") == sent_whole and moved("rx_vxlan_foreign") == 0
    assert after_h["rx"]["whole_superpackets"] == before_h["rx"]["whole_superpackets"]
    # A VXLAN packet to the device's port from another host, and one from a process on h, go
    # no further than the device.
    packet = vxlan_packet(e, h)
    for sender in (g, h):
        with inside(sender.host.netns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(packet, (h.host.underlay_ip, udp_tc.RX_VXLAN_PORT))
    wait_for(lambda: h.fastpath.stats()["kernel"]["rx_vxlan_foreign"] == 2 + (
        after_h["kernel"]["rx_vxlan_foreign"]), 5, "h's device dropped both")
    assert h.fastpath.stats()["kernel"]["rx_vxlan_arrived"] == after_h["kernel"][
        "rx_vxlan_arrived"]


def test_a_firewall_on_the_device_s_port_sends_whole_super_packets_back_to_the_loops(
        whole: tuple[Node, Node, Node, Node]) -> None:
    """The last of h's tests: h gives its device up for good."""
    e, _, _, h = whole
    assert h.fastpath.through_vxlan
    h.host.run("iptables", "-I", "INPUT", "-p", "udp", "--dport", str(udp_tc.RX_VXLAN_PORT),
               "-j", "DROP")
    try:
        with inside(h.host.netns):
            h.fastpath.refresh()  # what arrived so far is behind us
        assert say_hello(h, e) == 1
        wait_for(lambda: h.host.underlay_ip in e.fastpath.whole_peers(), 5, "e noted h's hello")
        before_h = h.fastpath.stats()["kernel"]
        pool = ThreadPoolExecutor(1)
        moving = pool.submit(tcp, e, h)
        wait_for(lambda: h.fastpath.stats()["kernel"]["rx_vxlan_handed"] >= (
            before_h["rx_vxlan_handed"] + udp_tc.RX_VXLAN_LOST), 10, "super-packets handed")
        with inside(h.host.netns):
            h.fastpath.refresh()  # as the daemon does every 2 s
        assert not h.fastpath.through_vxlan
        assert "firewall on UDP port 8473" in h.fastpath.vxlan_missing
        moving.result(60)  # the transfer completes (tcp() checks every byte arrived)
        pool.shutdown()
        assert h.fastpath.stats()["rx"]["whole_superpackets"] > 0
        assert h.fastpath.stats()["kernel"]["rx_vxlan_arrived"] == before_h["rx_vxlan_arrived"]
    finally:
        h.host.run("iptables", "-D", "INPUT", "-p", "udp", "--dport",
                   str(udp_tc.RX_VXLAN_PORT), "-j", "DROP")


@pytest.fixture(scope="module")
def plain(testbed: Testbed) -> Iterator[tuple[Node, Node, Node, Node]]:
    # p sends whole super-packets, plain to peers on this kernel (all of the testbed's); q, r and
    # t take them, marked ones through their receive devices.
    p = start_node(testbed, "10.244.41.0/24", kernel="on", underlay="eth0",
                   whole_superpackets=True, plain_superpackets=True)
    q, r, t = (start_node(testbed, f"10.244.{n}.0/24", kernel="on", underlay="eth0",
                          whole_superpackets=True, plain_superpackets=True,
                          vxlan_receiver=RX_VXLAN_DEVICE) for n in (42, 43, 44))
    yield from linked(p, q, r, t)


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after}


def test_super_packets_go_plain_to_a_peer_on_this_kernel(
        plain: tuple[Node, Node, Node, Node]) -> None:
    """q's kernel hello says its kernel is p's: p sends it a first TCP super-packet plain, q
    says at once (on what it sends back) that it arrived, and then all go plain; q's kernel path
    takes each straight in (not through its receive device, nor its loops), and q's next kernel
    hello tells p they all arrived."""
    p, q, _, _ = plain
    assert say_hello(q, p) == 1  # the hello, and the kernel hello beside it
    wait_for(lambda: q.host.underlay_ip in p.fastpath.plain_peers(), 5, "p noted q's kernel")
    assert not p.fastpath.plain_peers()[q.host.underlay_ip].confirmed
    before_p, before_q = settled_stats(p, q)
    tcp(p, q)
    after_p, after_q = settled_stats(p, q)
    assert p.fastpath.plain_peers()[q.host.underlay_ip].confirmed
    sent, taken = moved(before_p["kernel"], after_p["kernel"]), moved(before_q["kernel"],
                                                                       after_q["kernel"])
    # All but a few: those before the confirmation, and those that looked the next hop up again
    # (ten times a second), went as to any peer, through q's receive device.
    assert sent["tx_plain"] > sent["tx_superpackets"] * 3 / 4
    assert taken["rx_plain"] == sent["tx_plain"]
    assert taken["rx_vxlan_handed"] == sent["tx_superpackets"] - sent["tx_plain"]
    assert after_q["rx"]["whole_superpackets"] == before_q["rx"]["whole_superpackets"]
    assert after_q["rx"]["packets"] == before_q["rx"]["packets"]  # none reached the loops
    received = q.fastpath.plain_peers()[p.host.underlay_ip].received
    say_hello(q, p)
    wait_for(lambda: p.fastpath.plain_peers()[q.host.underlay_ip].taken == received, 5,
             "p heard how many arrived")
    assert p.fastpath.plain_peers()[q.host.underlay_ip].sent == received
    with inside(p.host.netns):
        assert p.fastpath.refresh() == {}


def inner_tcp(source: str, destination: str, ports: tuple[int, int], payload: bytes) -> bytes:
    """An IPv4/TCP segment of the flow (source, ports[0]) to (destination, ports[1]), far out of
    its window and with no checksum: the receiving TCP drops it, but its flow is the flow's."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0x4000, 64,
                         socket.IPPROTO_TCP, 0, socket.inet_aton(source),
                         socket.inet_aton(destination))
    header = header[:10] + struct.pack("!H", reference_checksum(header)) + header[12:]
    return header + struct.pack("!HHIIBBHHH", *ports, 1, 1, 5 << 4, 0x10, 1024, 0, 0) + payload


def test_plain_super_packets_of_a_flow_held_behind_the_loops_follow_it_there_whole(
        plain: tuple[Node, Node, Node, Node]) -> None:
    """A TCP flow whose datagrams UDP GRO merged went to q's loops (UDP_SEGMENT sends from p's
    host of three segments of it, every 20 ms) is held there: p's plain super-packets of it go
    the loops' way too, where the socket takes each whole (UDP_GRO) and the loops write it into
    the TUN as a whole super-packet from a peer. Every byte arrives, in order."""
    p, q, _, _ = plain
    assert p.host.container_netns and q.host.container_netns and q.host.container_ip
    assert p.host.container_ip
    say_hello(q, p)
    wait_for(lambda: q.host.underlay_ip in p.fastpath.plain_peers(), 5, "p noted q's kernel")
    with inside(q.host.container_netns):
        listener = socket.create_server((q.host.container_ip, 0))
    with inside(p.host.container_netns):
        client = socket.socket()
    with inside(p.host.netns):
        merged = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    merged.setsockopt(socket.SOL_UDP, UDP_SEGMENT, 140)  # one segment each
    with listener, client, merged:
        listener.settimeout(30)
        client.settimeout(30)
        client.connect(listener.getsockname())
        conn, _ = listener.accept()
        ports = (client.getsockname()[1], listener.getsockname()[1])
        segments = b"".join(inner_tcp(p.host.container_ip, q.host.container_ip, ports,
                                      bytes(100)) for _ in range(3))
        received = bytearray()
        sent_all = False

        def serve() -> None:
            with conn:
                conn.settimeout(30)
                while chunk := conn.recv(1 << 16):
                    received.extend(chunk)

        def hold() -> None:
            while not sent_all:
                merged.sendto(segments, (q.host.underlay_ip, PORT))
                time.sleep(0.02)
        before_p, before_q = settled_stats(p, q)
        data = os.urandom(16 << 20)
        with ThreadPoolExecutor(2) as pool:
            served, held = pool.submit(serve), pool.submit(hold)
            time.sleep(0.05)
            try:
                client.sendall(data)
                client.shutdown(socket.SHUT_WR)
            finally:
                sent_all = True
            served.result(30)
            held.result(5)
        assert received == data
    after_p, after_q = settled_stats(p, q)
    sent, taken = moved(before_p["kernel"], after_p["kernel"]), moved(before_q["kernel"],
                                                                       after_q["kernel"])
    loops_whole = after_q["rx"]["whole_superpackets"] - before_q["rx"]["whole_superpackets"]
    assert sent["tx_plain"] > 0
    assert taken["rx_plain"] == sent["tx_plain"]
    assert 0 < loops_whole <= min(taken["rx_in_order"], sent["tx_plain"])
    assert after_q["rx"]["gro_superdatagrams"] > before_q["rx"]["gro_superdatagrams"]


@pytest.fixture(scope="module")
def plain6(testbed: Testbed) -> Iterator[tuple[Node, Node]]:
    """Dual-stack nodes that send and take plain super-packets (u without a receive device)."""
    u, v = (start_node(testbed, f"10.244.{n}.0/24", subnet6=f"fd00:0:0:{n}::/64", kernel="on",
                       underlay="eth0", whole_superpackets=True, plain_superpackets=True)
            for n in (45, 46))
    yield from linked(u, v)


def test_ipv6_super_packets_go_plain_to_a_peer_on_this_kernel(
        plain6: tuple[Node, Node]) -> None:
    """TCP/IPv6 super-packets as IPv4 ones: v's kernel hello says its kernel is u's, u sends it
    a first one plain (the probe), v says at once on its IPv6 ACKs that it arrived, and then
    they all go plain, taken straight in by v's kernel path; none reaches either's loops."""
    u, v = plain6
    assert say_hello(v, u) == 1
    wait_for(lambda: v.host.underlay_ip in u.fastpath.plain_peers(), 5, "u noted v's kernel")
    before_u, before_v = settled_stats(u, v)
    tcp6_transfer(v, u, 16 << 20)
    after_u, after_v = settled_stats(u, v)
    assert u.fastpath.plain_peers()[v.host.underlay_ip].confirmed
    sent, taken = moved(before_u["kernel"], after_u["kernel"]), moved(before_v["kernel"],
                                                                       after_v["kernel"])
    # All but those sent between the probe and its confirmation, which the loops cut.
    assert sent["tx_plain"] > sent["tx_superpackets"] * 3 / 4 > 0
    assert taken["rx_plain"] == sent["tx_plain"]
    assert taken["rx_packets"] >= sent["tx_packets"] > sent["tx_plain"] * 2
    assert after_v["rx"]["whole_superpackets"] == before_v["rx"]["whole_superpackets"]
    received = v.fastpath.plain_peers()[u.host.underlay_ip].received
    assert received == sent["tx_plain"] + before_u["kernel"]["tx_plain"]


def test_ipv6_routes_take_the_next_hop_cache_too(plain6: tuple[Node, Node]) -> None:
    """IPv6 packets to a peer go by the next hop cached for it (next_hops6, keyed by its
    PublicIP: an IPv6 route gives no IPv4 subnet to index by), and follow a new MAC of its as
    IPv4 ones do."""
    u, v = plain6
    with inside(u.host.netns):
        sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)

    def send(payload: bytes) -> None:
        sender.sendto(payload, (v.address6, 9))

    def burst() -> bool:
        for _ in range(5):
            send(b"burst")
        return True
    with sender:
        before = kernel(u)["tx_packets"]
        wait_for(lambda: burst() and v.host.underlay_ip in next_hops(u, "next_hops6"), 5,
                 "u's next hop to v to be cached")
        assert kernel(u)["tx_packets"] > before  # the kernel path carried them
        assert next_hops(u, "next_hops6")[v.host.underlay_ip] == v.host.link("eth0")["address"]
        a_new_mac_is_followed(u, v, "next_hops6", "02:00:5e:10:00:02", send)


def test_a_kernel_hello_counts_only_from_this_kernel(
        plain: tuple[Node, Node, Node, Node]) -> None:
    """A kernel hello with another boot ID (a peer on another machine, whose super-packets a
    NIC on the way would cut) is dropped unnoted: p sends that peer marked ones."""
    p, _, r, _ = plain
    source = ipaddress.IPv4Network(r.subnet).network_address
    destination = ipaddress.IPv4Network(p.subnet).network_address
    before = kernel(p)["rx_hellos"]
    with inside(r.host.netns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(kernel_hello_packet(source, destination, bytes(16), 0),
                    (p.host.underlay_ip, PORT))
        wait_for(lambda: kernel(p)["rx_hellos"] == before + 1, 5, "p saw the hello")
        assert r.host.underlay_ip not in p.fastpath.plain_peers()
        sock.sendto(kernel_hello_packet(source, destination, boot_id(), 0),
                    (p.host.underlay_ip, PORT))
        wait_for(lambda: r.host.underlay_ip in p.fastpath.plain_peers(), 5, "p noted r's kernel")


def test_no_plain_super_packets_where_a_queueing_discipline_could_cut_them(
        plain: tuple[Node, Node, Node, Node]) -> None:
    """tbf on p's underlay cuts a super-packet longer than its burst in software: p sends
    marked ones while it is there (the daemon refreshes every 2 s), plain ones again after."""
    p, q, _, _ = plain
    say_hello(q, p)
    wait_for(lambda: q.host.underlay_ip in p.fastpath.plain_peers(), 5, "p noted q's kernel")
    assert p.fastpath.sends_plain
    p.host.run("tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "1gbit", "burst",
               "64kb", "latency", "50ms")
    try:
        with inside(p.host.netns):
            p.fastpath.refresh()
        assert not p.fastpath.sends_plain
        before = settled_stats(p)[0]["kernel"]
        tcp(p, q)
        after = settled_stats(p)[0]["kernel"]
        assert after["tx_superpackets"] > before["tx_superpackets"]
        assert after["tx_plain"] == before["tx_plain"]
    finally:
        p.host.run("tc", "qdisc", "del", "dev", "eth0", "root")
    with inside(p.host.netns):
        p.fastpath.refresh()
    assert p.fastpath.sends_plain


@contextmanager
def cutting(testbed: Testbed, node: Node) -> Iterator[None]:
    """The bridge's port to the node with TSO and GSO off: it cuts what it sends the node in
    software, and the kernel's GSO drops a plain super-packet, which it cannot cut."""
    port = f"u{testbed.hosts.index(node.host) + 1}"
    sh("ip", "netns", "exec", testbed.underlay, "ethtool", "-K", port, "tso", "off", "gso", "off")
    try:
        yield
    finally:
        sh("ip", "netns", "exec", testbed.underlay, "ethtool", "-K", port, "tso", "on", "gso",
           "on")


def refused_while_sending(src: Node, dst: Node) -> str:
    """A TCP transfer from src to dst, during which each says hello and src refreshes, as the
    daemons do every 2 s (faster here); why src refused dst plain super-packets. The transfer
    completes (tcp() checks every byte arrived)."""
    with inside(src.host.netns):
        assert src.fastpath.refresh() == {}  # the daemon's run so far: nothing was sent
    with ThreadPoolExecutor(1) as pool:
        moving = pool.submit(tcp, src, dst)
        refused: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while dst.host.underlay_ip not in refused and time.monotonic() < deadline:
            say_hello(dst, src)
            time.sleep(0.3)
            with inside(src.host.netns):
                refused = src.fastpath.refresh()
        moving.result(60)
    assert src.fastpath.plain_peers()[dst.host.underlay_ip].refused
    return refused.get(dst.host.underlay_ip, "")


def test_plain_super_packets_that_stop_arriving_are_refused_for_good(
        testbed: Testbed, plain: tuple[Node, Node, Node, Node]) -> None:
    """Once the path to r cuts super-packets, r's kernel hellos count none arriving: p's
    refresh refuses r plain ones and sends it marked ones, which the port cuts into datagrams.
    The transfer under way completes."""
    p, _, r, _ = plain
    say_hello(r, p)
    wait_for(lambda: r.host.underlay_ip in p.fastpath.plain_peers(), 5, "p noted r's kernel")
    tcp(p, r)
    assert p.fastpath.plain_peers()[r.host.underlay_ip].confirmed
    with cutting(testbed, r):
        before = kernel(p)
        assert "none of" in refused_while_sending(p, r)
        assert kernel(p)["tx_plain"] > before["tx_plain"]  # those that got lost
        before_p, before_r = settled_stats(p, r)
        say_hello(r, p)  # settling may have taken longer than a hello lasts (7 s)
        wait_for(lambda: p.fastpath.whole_peers().get(r.host.underlay_ip, 99) < 1, 5,
                 "p noted r's hello")
        tcp(p, r)
        after_p, after_r = settled_stats(p, r)
        assert after_p["kernel"]["tx_plain"] == before_p["kernel"]["tx_plain"]
        assert after_p["kernel"]["tx_superpackets"] > before_p["kernel"]["tx_superpackets"]
        assert after_r["kernel"]["rx_plain"] == before_r["kernel"]["rx_plain"]
        say_hello(r, p)  # a later kernel hello leaves the refusal as it is
        time.sleep(0.3)
        assert p.fastpath.plain_peers()[r.host.underlay_ip].refused


def test_a_path_that_cuts_them_from_the_start_costs_one_super_packet(
        testbed: Testbed, plain: tuple[Node, Node, Node, Node]) -> None:
    """To t, whose path cuts super-packets from the start, p sends one plain (the probe), which
    is lost; the rest go marked, and p refuses t plain ones when t's hellos count none."""
    p, _, _, t = plain
    say_hello(t, p)
    wait_for(lambda: t.host.underlay_ip in p.fastpath.plain_peers(), 5, "p noted t's kernel")
    with cutting(testbed, t):
        before = kernel(p)
        refused_while_sending(p, t)
        probes = kernel(p)["tx_plain"] - before["tx_plain"]
        assert 1 <= probes <= os.cpu_count()  # one per CPU at most, if they raced
        assert kernel(p)["tx_superpackets"] - before["tx_superpackets"] > probes
        assert not p.fastpath.plain_peers()[t.host.underlay_ip].confirmed


def test_hellos_that_reach_the_loops_are_counted_not_dropped(
        trio: tuple[Node, Node, Node, Node]) -> None:
    a, _, _, d = trio  # d has no kernel path: a's hellos reach its loops
    before_d = settled_stats(d)[0]
    assert say_hello(a, d) == 1
    with inside(a.host.netns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(kernel_hello_packet(ipaddress.IPv4Network(a.subnet).network_address,
                                        ipaddress.IPv4Network(d.subnet).network_address,
                                        boot_id(), 0), (d.host.underlay_ip, PORT))
    wait_for(lambda: d.fastpath.stats()["rx"]["hellos"] == before_d["rx"]["hellos"] + 2, 5,
             "d counted a's hello and kernel hello")
    after_d = d.fastpath.stats()
    assert after_d["rx"]["drop_ttl"] == before_d["rx"]["drop_ttl"]
    assert after_d["rx"]["packets"] == before_d["rx"]["packets"]


def test_the_hello_is_one_the_programs_and_the_loops_know() -> None:
    """fastpath/hello.py's hello, as udp_tc.bpf.c and loops.pyx spell it."""
    packet = hello_packet(ipaddress.IPv4Address("10.244.1.0"), ipaddress.IPv4Address("10.244.2.0"))
    assert len(packet) == 36 and packet[0] == 0x45 and packet[8] == 1
    assert packet[9] == HELLO_PROTOCOL and packet[20:] == HELLO_MAGIC
    assert reference_checksum(packet[:20]) == 0
    source = os.path.join(os.path.dirname(udp_tc.__file__), "udp_tc.bpf.c")
    with open(source) as f:
        program = f.read()
    words = [int(value, 16) for value in
             re.findall(r"#define HELLO_MAGIC_\d (0x[0-9a-f]+)ULL", program)]
    assert b"".join(word.to_bytes(8, "big") for word in words) == HELLO_MAGIC
    assert f"#define HELLO_PROTOCOL {HELLO_PROTOCOL}\n" in program
    assert f"#define HELLO_LEN {len(HELLO_MAGIC)}\n" in program
    with open(os.path.join(os.path.dirname(udp_tc.__file__), "loops.pyx")) as f:
        loops = f.read()
    assert f'HELLO_MAGIC = b"{HELLO_MAGIC.decode()}"' in loops
    assert f"HELLO_PROTOCOL = {HELLO_PROTOCOL}\n" in loops
    # The kernel hello: the same magic's first word, then its own; the boot ID; the count.
    kernel_hello = kernel_hello_packet(ipaddress.IPv4Address("10.244.1.0"),
                                       ipaddress.IPv4Address("10.244.2.0"), boot_id(), 7)
    assert kernel_hello[:2] == packet[:2] and kernel_hello[4:10] == packet[4:10]
    assert reference_checksum(kernel_hello[:20]) == 0
    payload = kernel_hello[20:]
    assert payload[:16] == KERNEL_MAGIC and payload[32:] == (7).to_bytes(8, "big")
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert payload[16:32] == bytes.fromhex(f.read().strip().replace("-", ""))
    word = int(re.search(r"#define KERNEL_MAGIC_1 (0x[0-9a-f]+)ULL", program)[1], 16)
    assert words[0].to_bytes(8, "big") + word.to_bytes(8, "big") == KERNEL_MAGIC
    assert f"#define KERNEL_HELLO_LEN {len(payload)} " in program
    assert f'KERNEL_MAGIC = b"{KERNEL_MAGIC.decode()}"' in loops
    assert f"KERNEL_HELLO_LEN = {len(payload)}\n" in loops


def test_a_build_without_the_object_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without clang at build time there is no udp_tc.bpf.o: the kernel path is unavailable,
    and says why, from the first thing that needs the object (the build hash of its config)."""
    monkeypatch.setattr(udp_tc, "OBJECT_NAME", "missing.bpf.o")
    udp_tc._build.cache_clear()
    try:
        with pytest.raises(udp_tc.UdpTcUnavailable, match="missing.bpf.o was not built"):
            udp_tc._build()
    finally:
        udp_tc._build.cache_clear()


@pytest.fixture(scope="module")
def dual(testbed: Testbed) -> Iterator[tuple[Node, Node]]:
    """Dual-stack nodes with the kernel path: a offloads (its TUN takes TSO6 super-packets),
    b does not (its TUN gets its checksums complete)."""
    a = start_node(testbed, "10.244.31.0/24", subnet6="fd00:0:0:31::/64", kernel="on",
                   underlay="eth0")
    b = start_node(testbed, "10.244.32.0/24", subnet6="fd00:0:0:32::/64", kernel="on",
                   underlay="eth0", offload=False)
    yield from linked(a, b)


def tcp6_exchange(server: Node, client: Node, rounds: int) -> None:
    """`rounds` small requests over one TCP/IPv6 connection from client's TUN address to
    server's, each echoed back: segments of one MSS or less, never a super-packet."""
    with inside(server.host.netns):
        listener = socket.create_server((server.address6, 0), family=socket.AF_INET6)
    with inside(client.host.netns):
        conn = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.settimeout(10)
    with listener, conn:
        conn.settimeout(10)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.connect((server.address6, listener.getsockname()[1]))
        accepted, _ = listener.accept()
        with accepted:
            accepted.settimeout(10)
            accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(rounds):
                request = i.to_bytes(4, "big") * 64
                conn.sendall(request)
                echoed = b""
                while len(echoed) < len(request):
                    echoed += accepted.recv(len(request) - len(echoed))
                accepted.sendall(echoed)
                answer = b""
                while len(answer) < len(request):
                    answer += conn.recv(len(request) - len(answer))
                assert answer == request


def test_ipv6_pings_and_tcp_take_the_kernel_path(dual: tuple[Node, Node]) -> None:
    """IPv6 goes the way IPv4 goes: pings both ways in the kernel, TCP segments too, super-packets
    (TCP builds them whatever the device, for the kernel to cut after the tc programs) through
    the loops; and IPv4 as before, beside it."""
    a, b = dual
    assert not a.fastpath.kernel_missing and not b.fastpath.kernel_missing
    for src, dst in ((a, b), (b, a)):
        before_src, before_dst = settled_stats(src, dst)
        result = src.host.run("ping", "-6", "-c", "5", "-i", "0.2", "-W", "2", dst.address6,
                              check=False)
        assert "5 received" in result.stdout, result.stdout + result.stderr
        after_src, after_dst = settled_stats(src, dst)
        for node, before, after in ((src, before_src, after_src), (dst, before_dst, after_dst)):
            assert moved(before["kernel"], after["kernel"])["tx_packets"] == 5, node.subnet
            assert moved(before["kernel"], after["kernel"])["rx_packets"] == 5, node.subnet
            assert after["kernel"]["rx_passed"] == before["kernel"]["rx_passed"]
            assert after["kernel"]["tx_passed"] == before["kernel"]["tx_passed"]
            assert after["tx"]["packets"] == before["tx"]["packets"]
            assert after["rx"]["packets"] == before["rx"]["packets"]
    # A TCP connection's segments that are no super-packets, handshake and close included,
    # cross in the kernel both ways.
    for server, client in ((a, b), (b, a)):
        before_server, before_client = settled_stats(server, client)
        tcp6_exchange(server, client, 200)
        after_server, after_client = settled_stats(server, client)
        for before, after in ((before_server, after_server), (before_client, after_client)):
            assert moved(before["kernel"], after["kernel"])["tx_packets"] >= 200
            assert moved(before["kernel"], after["kernel"])["rx_packets"] >= 200
            assert after["kernel"]["tx_passed"] == before["kernel"]["tx_passed"]
            assert after["kernel"]["rx_passed"] == before["kernel"]["rx_passed"]
            assert after["tx"]["packets"] == before["tx"]["packets"]
            assert after["rx"]["packets"] == before["rx"]["packets"]
    # Bulk TCP: the sender's super-packets go to its loops, which cut them (received as merged
    # datagrams, by the loops too); the receiver's ACKs cross in the kernel.
    for server, client in ((a, b), (b, a)):
        before_server, before_client = settled_stats(server, client)
        tcp6_transfer(server, client, 4 << 20)
        after_server, after_client = settled_stats(server, client)
        assert after_client["tx"]["bytes"] - before_client["tx"]["bytes"] > 4 << 20
        assert moved(before_client["kernel"], after_client["kernel"])["tx_passed"] > 0
        assert moved(before_server["kernel"], after_server["kernel"])["tx_packets"] > 100
        assert moved(before_client["kernel"], after_client["kernel"])["rx_packets"] > 100
        if client is a:  # TSO6 on its TUN
            assert after_client["tx"]["tso_superpackets"] > before_client["tx"][
                "tso_superpackets"]
    # IPv4 beside it, unchanged.
    assert b.host.container_ip
    before = kernel(a)["tx_packets"]
    a.host.in_container("ping", "-c", "2", "-i", "0.2", "-W", "2", b.host.container_ip)
    assert kernel(a)["tx_packets"] - before == 2


def test_ipv6_wire_format_from_the_kernel_path_is_the_loops(dual: tuple[Node, Node]) -> None:
    """flanneld's outer headers (DF, TTL 64, our port to the peer's, UDP checksum 0) around the
    IPv6 packet, its hop limit one lower and its UDP checksum (left to the device by a's
    offloading TUN) finished."""
    a, b = dual
    marker = b"kernel-path-6-" + str(time.monotonic_ns()).encode()
    before = settled_stats(a)[0]
    wire_tap = capture(b.host.netns, "eth0")
    with wire_tap:
        with inside(a.host.netns):
            sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sender.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 30)
        with sender:
            sender.sendto(marker, (b.address6, 9))
        outer = find(wire_tap, marker, socket.PACKET_HOST, time.monotonic() + 5)
    version_ihl, _, total, _, frag, ttl, proto, _ = struct.unpack("!BBHHHBBH", outer[:12])
    src_port, dst_port, udp_len, udp_sum = struct.unpack("!HHHH", outer[20:28])
    inner = outer[28:]
    assert (version_ihl, frag, ttl, proto) == (0x45, 0x4000, 64, socket.IPPROTO_UDP)
    assert outer[12:20] == socket.inet_aton(a.host.underlay_ip) + socket.inet_aton(
        b.host.underlay_ip)
    assert (src_port, dst_port, udp_sum) == (PORT, PORT, 0)
    assert total == len(outer) and udp_len == len(outer) - 20
    assert inner[0] >> 4 == 6 and inner[6] == socket.IPPROTO_UDP and inner[7] == 30 - 1
    assert inner[8:40] == ipaddress.IPv6Address(a.address6).packed + ipaddress.IPv6Address(
        b.address6).packed
    assert inner.endswith(marker)
    pseudo = inner[8:40] + struct.pack("!I3xB", len(inner) - 40, socket.IPPROTO_UDP)
    assert reference_checksum(pseudo + inner[40:]) == 0
    after = a.fastpath.stats()
    assert after["kernel"]["tx_packets"] > before["kernel"]["tx_packets"]
    assert after["tx"]["packets"] == before["tx"]["packets"]


def test_ipv6_the_kernel_path_passes_on_still_gets_the_loops_icmpv6(
        dual: tuple[Node, Node]) -> None:
    """Hop limit 1 runs out in a's send loop, 2 in b's receive loop (answered back over the
    underlay to a), and a subnet with no route gets ICMPv6 no route: the programs pass each on."""
    a, b = dual
    for hops, node, direction, passed in ((1, a, "tx", "tx_passed"), (2, b, "rx", "rx_passed")):
        before = settled_stats(node)[0]
        result = a.host.run("ping", "-6", "-c", "1", "-W", "2", "-t", str(hops), b.address6,
                            check=False)
        after = node.fastpath.stats()
        assert "Time exceeded" in result.stdout, result.stdout
        assert after["kernel"][passed] - before["kernel"][passed] == 1
        assert after[direction]["drop_ttl"] - before[direction]["drop_ttl"] == 1
        assert after[direction]["icmp_time_exceeded"] - before[direction][
            "icmp_time_exceeded"] == 1
    before = settled_stats(a)[0]
    result = a.host.run("ping", "-6", "-c", "1", "-W", "2", "fd00:0:0:99::5", check=False)
    after = a.fastpath.stats()
    assert "Destination unreachable: No route" in result.stdout, result.stdout
    assert after["kernel"]["tx_passed"] - before["kernel"]["tx_passed"] == 1
    assert after["tx"]["icmp_unreachable"] - before["tx"]["icmp_unreachable"] == 1


def test_ipv6_sources_are_checked_in_the_kernel_and_spoofed_ones_dropped_by_the_loops(
        dual: tuple[Node, Node]) -> None:
    """From b's address: a packet from b's IPv6 subnet is received in the kernel; one from no
    host's subnet (a's own included) or from another host's, or one over the MTU, is passed to
    the loops, which drop and count it."""
    a, b = dual
    a.fastpath.set_route("fd00:0:0:3::/64", "198.18.0.250", PORT)  # a third host's subnet
    with inside(a.host.netns):
        receiver = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    receiver.bind((a.address6, 0))
    receiver.settimeout(5)
    port = receiver.getsockname()[1]
    crafted = {
        "drop_spoof_unrouted_source": [inner_udp6("fd00:0:0:77::1", a.address6, b"x", port),
                                       inner_udp6(a.address6, a.address6, b"x", port)],
        "drop_spoof_wrong_sender": [inner_udp6("fd00:0:0:3::1", a.address6, b"x", port)],
        "drop_too_big": [inner_udp6(b.address6, a.address6, bytes(MTU), port)],
    }
    good = inner_udp6(str(ipaddress.IPv6Address(b.address6) + 7), a.address6, b"ok", port)
    try:
        with receiver:
            (before,) = settled_stats(a)
            with inside(b.host.netns):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock:
                sock.bind((b.host.underlay_ip, 0))
                for datagram in [*(d for ds in crafted.values() for d in ds), good]:
                    sock.sendto(datagram, (a.host.underlay_ip, PORT))
            assert receiver.recv(1024) == b"ok"
            (after,) = settled_stats(a)
    finally:
        a.fastpath.del_route("fd00:0:0:3::/64")
    assert moved(before["kernel"], after["kernel"])["rx_packets"] == 1
    assert moved(before["kernel"], after["kernel"])["rx_passed"] == 4
    for name, datagrams in crafted.items():
        assert after["rx"][name] - before["rx"][name] == len(datagrams), name
    assert after["rx"]["packets"] == before["rx"]["packets"]


def test_an_ipv6_flow_that_went_to_the_loops_merged_keeps_its_order(
        dual: tuple[Node, Node]) -> None:
    """As over IPv4: a datagram that UDP GRO merged from many goes to the loops, the next one of
    a flow it carried follows it there for 100 ms, another flow's takes the kernel path."""
    a, b = dual
    source = str(ipaddress.IPv6Address(b.address6) + 9)

    def packet(port: int, i: int) -> bytes:
        return inner_udp6(source, a.address6, i.to_bytes(4, "big") * 25, port)
    with merged_then_single(a, a.host.netns, b.host.netns, a.address6, 48, packet):
        pass


def test_without_tcx_the_programs_carry_ipv6_too(
        testbed: Testbed, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a kernel without tcx links (classic filters) the dual-stack programs load and carry
    IPv6 as well."""
    lib = udp_tc._lib()
    monkeypatch.setattr(udp_tc, "_lib", lambda: WithoutTcx(lib))
    a = start_node(testbed, "10.244.33.0/24", subnet6="fd00:0:0:33::/64", kernel="on",
                   underlay="eth0")
    b = start_node(testbed, "10.244.34.0/24", subnet6="fd00:0:0:34::/64", kernel="on",
                   underlay="eth0")
    link(a, b)
    try:
        assert a.fastpath.kernel == "on" and not a.fastpath.kernel_missing
        assert "udp_ingress" in tc_filters(a, "eth0", "ingress")
        result = a.host.run("ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", b.address6,
                            check=False)
        assert "2 received" in result.stdout, result.stdout
        assert kernel(a)["tx_packets"] >= 2 and kernel(b)["rx_packets"] >= 2
    finally:
        a.fastpath.stop()
        b.fastpath.stop()
