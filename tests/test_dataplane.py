"""The fast path between two test hosts in namespaces: containers on each reach each other through
the TUN, the Cython loops and a veth underlay, with flanneld's semantics on the wire."""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from control.backend.udp_receiver import finish_receiver, prepare_receiver
from control.host.interface import ExternalInterface
from control.host.rtnl import RtNetlink
from fastpath import FastPath
from fastpath.device import SO_RCVBUFFORCE, UDP_SEGMENT, open_tun, open_udp
from tests.conftest import require_host_network_tools
from tests.test_packet import reference_checksum
from tests.testbed import Host, Testbed, configure_tun, inside, tcp_transfer

NETWORK = "10.244.0.0/16"
SUBNET_LEN = 24
NETWORK6 = "fd00:0:0::/48"
SUBNET6_LEN = 64
PORT = 7890  # not flanneld's default 8285, to show the configured port is the one used
MTU = 1472
ETH_P_ALL = 0x0003  # only "all protocols" taps see outgoing packets


@dataclass
class Node:
    host: Host
    subnet: str
    fastpath: FastPath
    subnet6: str | None = None  # its IPv6 subnet (of NETWORK6), where it has one

    @property
    def address6(self) -> str:
        """The address of its TUN in its IPv6 subnet."""
        assert self.subnet6
        return str(ipaddress.IPv6Network(self.subnet6).network_address + 1)


def start_node(bed: Testbed, subnet: str, batch: int = 64, offload: bool = True,
               subnet6: str | None = None, **levers: int | str) -> Node:
    """A host with a container and a fast path; with vxlan_receiver among the levers, its
    receive device made and put up around start() as the udp backend does it. With subnet6 the
    fast path has NETWORK6 and its TUN the subnet's first address and a route for NETWORK6."""
    host = bed.add_host()
    bed.add_container(host, subnet, MTU)
    if subnet6:
        levers.update(ipv6_network=NETWORK6, ipv6_subnet_len=SUBNET6_LEN)
    fp = FastPath(NETWORK, SUBNET_LEN, host.underlay_ip, PORT, mtu=MTU, batch=batch,
                  offload=offload, **levers)
    with inside(host.netns):
        rtnl = RtNetlink()
        try:
            if levers.get("vxlan_receiver"):
                index = socket.if_nametoindex("eth0")
                mtu = next(link.mtu for link in rtnl.links() if link.index == index)
                prepare_receiver(rtnl, ExternalInterface(
                    "eth0", index, ipaddress.IPv4Address(host.underlay_ip), mtu))
            fp.start()
            finish_receiver(rtnl, fp)
        finally:
            rtnl.close()
    configure_tun(host, fp.tun_name, subnet, NETWORK, MTU)
    node = Node(host, subnet, fp, subnet6)
    if subnet6:
        host.ip("-6", "addr", "add", f"{node.address6}/128", "dev", fp.tun_name, "nodad")
        host.ip("-6", "route", "add", NETWORK6, "dev", fp.tun_name)
    return node


def link(*nodes: Node) -> None:
    """Route every node's subnets on every other node, as the control plane will (an IPv6 one
    only between nodes that both have one: pyflannel peers)."""
    for node in nodes:
        for peer in nodes:
            if peer is not node:
                node.fastpath.set_route(peer.subnet, peer.host.underlay_ip, PORT)
                if node.subnet6 and peer.subnet6:
                    node.fastpath.set_route(peer.subnet6, peer.host.underlay_ip, PORT)


@pytest.fixture(scope="module")
def pair(testbed: Testbed) -> Iterator[tuple[Node, Node]]:
    # a offloads (TSO in, UDP GSO out, UDP GRO in, coalesced TUN writes); b is the per-packet
    # baseline (one read, one send; plain TUN), so each direction also crosses the two kinds.
    a = start_node(testbed, "10.244.1.0/24")
    b = start_node(testbed, "10.244.2.0/24", batch=1, offload=False)
    link(a, b)
    try:
        yield a, b
    finally:
        a.fastpath.stop()
        b.fastpath.stop()


def both_ways(pair: tuple[Node, Node]) -> list[tuple[Node, Node]]:
    a, b = pair
    return [(a, b), (b, a)]


def test_python_m_fastpath_reports_the_kernel_features_and_leaves_nothing(
        testbed: Testbed) -> None:
    host = testbed.add_host()
    result = host.run(sys.executable, "-m", "fastpath", check=False)
    # Every kernel this project is tested on has them all (Linux 6.2+).
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 6 and all(line.startswith("yes  ") for line in lines)
    assert "UDP_GRO" in result.stdout and "USO" in result.stdout and "tc-BPF" in result.stdout
    assert "tcx links" in result.stdout
    assert "pfprobe" not in host.ip("-o", "link").stdout


def packet_thread_nice() -> dict[str, int]:
    """The nice value of this process's threads named pyflannel-* whose nice is not 0."""
    found = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            if name.startswith("pyflannel-"):
                with open(f"/proc/self/task/{tid}/stat") as f:
                    nice = int(f.read().rsplit(")", 1)[1].split()[16])
                if nice:
                    found[name] = nice
        except FileNotFoundError:  # a thread (of another test's fixture) ended meanwhile
            continue
    return found


def test_every_lever_carries_tcp_intact_to_and_from_a_plain_peer(testbed: Testbed) -> None:
    """The default levers run in `pair`; the others, turned, meet the per-packet baseline."""
    third = len(testbed.hosts) + 10
    a = start_node(testbed, f"10.244.{third}.0/24", udp_coalesce=False, nice=-5)
    b = start_node(testbed, f"10.244.{third + 1}.0/24", batch=1, offload=False)
    link(a, b)
    try:
        for src, dst in [(a, b), (b, a)]:
            tcp_transfer(dst.host.container_netns, dst.host.container_ip,
                         src.host.container_netns, nbytes=8 << 20)
        tx, rx = a.fastpath.stats()["tx"], a.fastpath.stats()["rx"]
        assert tx["tso_superpackets"] > 0 and rx["coalesced"] > 0
        assert tx["drop_bad_offload"] == 0 and rx["drop_write_error"] == 0
        assert a.fastpath.nice_error == ""
        # a's two packet threads have the nice value asked for; any other fast path's threads
        # in this process keep the default
        assert sorted(packet_thread_nice().items()) == [("pyflannel-rx", -5),
                                                        ("pyflannel-tx", -5)]
    finally:
        a.fastpath.stop()
        b.fastpath.stop()


def test_ping_between_containers_both_ways(pair: tuple[Node, Node]) -> None:
    for src, dst in both_ways(pair):
        result = src.host.in_container("ping", "-c", "3", "-i", "0.2", "-W", "2",
                                       dst.host.container_ip, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "3 received" in result.stdout


def test_tcp_transfer_both_ways_runs_through_the_fast_path(pair: tuple[Node, Node]) -> None:
    for src, dst in both_ways(pair):
        before_tx = src.fastpath.stats()["tx"]
        before_rx = dst.fastpath.stats()["rx"]
        moved = tcp_transfer(dst.host.container_netns, dst.host.container_ip,
                             src.host.container_netns, nbytes=20 << 20)
        tx = src.fastpath.stats()["tx"]
        rx = dst.fastpath.stats()["rx"]
        # Every payload byte crossed as part of an inner packet the loops carried.
        assert tx["bytes"] - before_tx["bytes"] > moved
        assert rx["bytes"] - before_rx["bytes"] > moved
        assert tx["packets"] - before_tx["packets"] > moved // MTU


# TCP's retransmission timer starts at 0.2 s and doubles: a quiet second outlasts its first
# two firings (0.2 s of quiet let one straggler in, a CI flake: 301 packets counted for 300).
QUIET_SECONDS = 1.0
ETH_P_ALL = 0x0003
BURST = 400  # packets to a subnet with no route: fewer than a TUN's queue holds


def settled_stats(*nodes: Node) -> list[dict]:
    """The nodes' counters once nothing has moved for QUIET_SECONDS: the packets of an earlier
    test (a TCP connection's last ACKs, a FIN retransmitted after a backed-off timer) must not
    land inside this one's window."""
    stats = [node.fastpath.stats() for node in nodes]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(QUIET_SECONDS)
        now = [node.fastpath.stats() for node in nodes]
        if now == stats:
            break
        stats = now
    return stats


def container_udp(src: Host, dst: Host) -> tuple[socket.socket, socket.socket]:
    """(a UDP socket in src's container, one bound in dst's container whose buffer holds a
    whole test's burst, with a 5 s timeout)."""
    assert src.container_netns and dst.container_netns and dst.container_ip
    with inside(dst.container_netns):
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
        receiver.bind((dst.container_ip, 0))
    with inside(src.container_netns):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.settimeout(5)
    return sender, receiver


def test_counters_agree_with_what_was_sent(pair: tuple[Node, Node]) -> None:
    a, b = pair
    count, size = 300, 1000
    sender, receiver = container_udp(a.host, b.host)
    before_a, before_b = settled_stats(a, b)
    with sender, receiver:
        for i in range(count):
            sender.sendto(i.to_bytes(4, "big") * (size // 4), receiver.getsockname())
            if i % 50 == 49:
                time.sleep(0.01)
        got = sum(len(receiver.recv(65536)) == size for _ in range(count))
    after_a, after_b = a.fastpath.stats(), b.fastpath.stats()
    inner_bytes = count * (size + 28)  # UDP payload + UDP header + IPv4 header
    assert got == count
    assert after_a["tx"]["packets"] - before_a["tx"]["packets"] == count
    assert after_a["tx"]["bytes"] - before_a["tx"]["bytes"] == inner_bytes
    assert after_b["rx"]["packets"] - before_b["rx"]["packets"] == count
    assert after_b["rx"]["bytes"] - before_b["rx"]["bytes"] == inner_bytes
    # b runs batch size 1: every vector it received held exactly one datagram.
    assert sum(after_b["rx"]["batch_sizes"][1:]) == 0
    assert after_a["tx"]["batches"] > before_a["tx"]["batches"]
    # The wake-ups' sizes add up to the packets: a read each datagram, b received each.
    assert after_a["tx"]["batch_packets"] - before_a["tx"]["batch_packets"] == count
    assert after_b["rx"]["batch_packets"] - before_b["rx"]["batch_packets"] == count


def test_offloads_cap_a_wake_up_at_16_packets_and_the_plain_path_keeps_its_batch(
        testbed: Testbed, pair: tuple[Node, Node]) -> None:
    """With offloads any packet may be a 64 KiB super-packet: 16 a wake-up (1 MiB a direction)
    keep the daemon inside flannel's 50Mi. Without them a packet touches one page of its slot,
    and the whole batch stays."""
    a, _ = pair
    plain = start_node(testbed, f"10.244.{len(testbed.hosts) + 100}.0/24", batch=64,
                       offload=False)
    try:
        assert (a.fastpath.batch, a.fastpath.slots) == (64, 16)
        assert (plain.fastpath.batch, plain.fastpath.slots) == (64, 64)
        before = a.fastpath.stats()
        for src, dst in both_ways(pair):
            tcp_transfer(dst.host.container_netns, dst.host.container_ip,
                         src.host.container_netns, nbytes=16 << 20)
        after = a.fastpath.stats()
        for direction in ("tx", "rx"):
            sizes = [n - m for n, m in zip(after[direction]["batch_sizes"],
                                           before[direction]["batch_sizes"], strict=True)]
            assert sum(sizes) > 0
            assert sum(sizes[5:]) == 0, f"{direction}: a wake-up moved 32 or more: {sizes}"
    finally:
        plain.fastpath.stop()


def inner_udp(source: str, destination: str, port: int, payload: bytes) -> bytes:
    """An IPv4/UDP packet from `source` (UDP checksum 0: none, legal for IPv4)."""
    total = 28 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 17, 0,
                         socket.inet_aton(source), socket.inet_aton(destination))
    header = header[:10] + struct.pack("!H", reference_checksum(header)) + header[12:]
    return header + struct.pack("!HHHH", 4000, port, 8 + len(payload), 0) + payload


def test_a_udp_gro_receive_is_counted_once_with_each_of_its_datagrams(
        pair: tuple[Node, Node]) -> None:
    """One UDP_SEGMENT send from b's host reaches a's socket (UDP_GRO) whole: one receive of
    `count` datagrams, each carrying a packet for a's container."""
    a, b = pair
    count, payload = 10, 100
    with inside(str(a.host.container_netns)):
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind((str(a.host.container_ip), 0))
    receiver.settimeout(5)
    with inside(b.host.netns):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setsockopt(socket.SOL_UDP, UDP_SEGMENT, 28 + payload)  # one inner packet each
    sent = [i.to_bytes(4, "big") * (payload // 4) for i in range(count)]
    before = settled_stats(a)[0]["rx"]
    with sender, receiver:
        sender.sendto(b"".join(inner_udp("10.244.2.9", str(a.host.container_ip),
                                         receiver.getsockname()[1], data) for data in sent),
                      (a.host.underlay_ip, PORT))
        got = [receiver.recv(65536) for _ in range(count)]
    # The loop counts a batch after its TUN write, which the receiver may read first.
    after = settled_stats(a)[0]["rx"]
    assert got == sent
    names = ("gro_superdatagrams", "gro_datagrams", "batches", "batch_packets", "packets")
    assert {name: after[name] - before[name] for name in names} == {
        "gro_superdatagrams": 1, "gro_datagrams": count, "batches": 1, "batch_packets": count,
        "packets": count}


def test_udp_datagrams_merged_into_one_tun_write_arrive_one_by_one_intact(
        pair: tuple[Node, Node]) -> None:
    a, b = pair
    assert a.fastpath.udp_coalesce, f"this kernel lacks {a.fastpath.offload_missing}"
    count = 400
    sender, receiver = container_udp(b.host, a.host)
    before = settled_stats(a)[0]["rx"]
    # Equal datagrams with a shorter one now and then (which ends a merged write), sent in
    # bursts so that the receiving loop finds several of one flow at once.
    sent = [i.to_bytes(4, "big") * (25 if i % 7 else 3) for i in range(count)]
    with sender, receiver:
        for i, datagram in enumerate(sent):
            sender.sendto(datagram, receiver.getsockname())
            if i % 100 == 99:
                time.sleep(0.02)
        got = [receiver.recv(65536) for _ in range(count)]
    after = settled_stats(a)[0]["rx"]  # counted after the TUN write, as above
    assert got == sent
    assert after["packets"] - before["packets"] == count
    assert after["bytes"] - before["bytes"] == sum(len(d) + 28 for d in sent)
    assert after["coalesced"] > before["coalesced"], "no datagrams were merged"


def capture(netns: str, ifname: str) -> socket.socket:
    """An AF_PACKET socket seeing the packets, without link header, on ifname in netns."""
    with inside(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        sock.bind((ifname, ETH_P_ALL))
    sock.settimeout(0.5)
    return sock


def find(sock: socket.socket, marker: bytes, pkttype: int, deadline: float) -> bytes:
    """The first captured packet of the given direction (socket.PACKET_*) carrying marker."""
    while time.monotonic() < deadline:
        try:
            data, address = sock.recvfrom(65536)
        except TimeoutError:
            continue
        if address[2] == pkttype and data[0] >> 4 in (4, 6) and marker in data:
            return data
    raise AssertionError(f"no packet carrying {marker!r} was captured")


def test_wire_format_is_the_inner_packet_with_ttl_one_lower(pair: tuple[Node, Node]) -> None:
    a, b = pair
    marker = os.urandom(16).hex().encode()
    inner_tap = capture(a.host.netns, a.fastpath.tun_name)   # what a's kernel hands the TUN
    wire_tap = capture(b.host.netns, "eth0")                 # what arrives on b's underlay
    with inner_tap, wire_tap:
        with inside(a.host.container_netns):
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sender:
            sender.sendto(marker, (b.host.container_ip, 9))
        deadline = time.monotonic() + 5
        inner = find(inner_tap, marker, socket.PACKET_OUTGOING, deadline)
        outer = find(wire_tap, marker, socket.PACKET_HOST, deadline)
    ihl = (outer[0] & 0x0F) * 4
    src_port, dst_port, udp_len, _ = struct.unpack("!HHHH", outer[ihl:ihl + 8])
    assert outer[12:16] == socket.inet_aton(a.host.underlay_ip)
    assert outer[16:20] == socket.inet_aton(b.host.underlay_ip)
    assert outer[9] == socket.IPPROTO_UDP
    assert (src_port, dst_port) == (PORT, PORT)
    payload = outer[ihl + 8:ihl + udp_len]
    # The inner packet with its TTL one lower and its checksums complete. (With offloads the
    # kernel hands the TUN reader the UDP checksum unfinished; the wire carries it finished.)
    expected = bytearray(inner)
    expected[8] -= 1
    expected[10:12] = b"\0\0"
    expected[10:12] = struct.pack("!H", reference_checksum(bytes(expected[:20])))
    expected[26:28] = b"\0\0"
    pseudo = bytes(expected[12:20]) + struct.pack("!BBH", 0, socket.IPPROTO_UDP,
                                                  len(expected) - 20)
    expected[26:28] = struct.pack("!H", reference_checksum(pseudo + bytes(expected[20:])) or 0xFFFF)
    assert payload == bytes(expected)


def test_destination_without_route_gets_icmp_net_unreachable(pair: tuple[Node, Node]) -> None:
    a, _ = pair
    before = a.fastpath.stats()["tx"]
    result = a.host.in_container("ping", "-c", "1", "-W", "2", "10.244.99.5", check=False)
    after = a.fastpath.stats()["tx"]
    assert result.returncode != 0
    assert "Destination Net Unreachable" in result.stdout, result.stdout
    assert after["icmp_unreachable"] - before["icmp_unreachable"] == 1
    assert after["drop_no_route"] - before["drop_no_route"] == 1


def udp_snmp(host: Host) -> dict[str, int]:
    lines = [line.split() for line in host.run("cat", "/proc/net/snmp").stdout.splitlines()
             if line.startswith("Udp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))


def garbage(rng: random.Random) -> dict[str, list[bytes]]:
    """Datagrams the receive loop must refuse, by the counter that should count them."""
    def header(total: int, first: int = 0x45) -> bytes:
        return struct.pack("!BBHHHBBH4s4s", first, 0, total, 0, 0, 64, 17, 0,
                           socket.inet_aton("10.244.1.2"), socket.inet_aton("10.244.2.2"))
    return {
        "drop_too_short": [rng.randbytes(rng.randint(1, 19)) for _ in range(500)],
        "drop_bad_header": [header(40, 0x60) + rng.randbytes(20) for _ in range(500)]
                           + [header(40, 0x43) + rng.randbytes(20) for _ in range(500)],
        "drop_bad_length": [header(rng.randint(20, 39)) + rng.randbytes(20) for _ in range(500)],
        "drop_too_big": [header(MTU + 100) + rng.randbytes(MTU + 80) for _ in range(200)],
    }


def test_garbage_flood_is_dropped_and_counted_while_a_transfer_completes(
        pair: tuple[Node, Node]) -> None:
    a, b = pair
    bad = garbage(random.Random(3))
    before = b.fastpath.stats()["rx"]
    snmp_before = udp_snmp(b.host)
    done = threading.Event()
    sent = 0

    def flood() -> None:
        nonlocal sent
        with inside(a.host.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            for rounds in range(1000):
                for datagrams in bad.values():
                    for datagram in datagrams[rounds % 20::20][:5]:
                        sock.sendto(datagram, (b.host.underlay_ip, PORT))
                        sent += 1
                if done.is_set() and rounds >= 20:
                    return
                time.sleep(0.002)

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        tcp_transfer(b.host.container_netns, b.host.container_ip, a.host.container_netns,
                     nbytes=10 << 20)
    finally:
        done.set()
        flooder.join()
    time.sleep(0.2)
    after = b.fastpath.stats()["rx"]
    lost_in_kernel = udp_snmp(b.host)["RcvbufErrors"] - snmp_before["RcvbufErrors"]
    for reason in bad:
        assert after[reason] > before[reason], reason
    dropped = sum(after[reason] - before[reason] for reason in bad)
    # Every garbage datagram was counted as a drop, unless the socket buffer overflowed before
    # the loop saw it; none was written to the TUN.
    assert sent - lost_in_kernel <= dropped <= sent
    assert after["drop_write_error"] == before["drop_write_error"]
    assert b.fastpath.running


def test_routes_change_while_traffic_flows(pair: tuple[Node, Node]) -> None:
    a, b = pair
    changes = 0
    done = threading.Event()

    def churn() -> None:
        nonlocal changes
        rng = random.Random(4)
        while not done.is_set():
            subnet = f"10.244.{rng.randint(3, 255)}.0/24"
            if rng.random() < 0.5:
                a.fastpath.set_route(subnet, f"198.18.1.{rng.randint(1, 254)}",
                                     rng.randint(1, 65535))
            else:
                a.fastpath.del_route(subnet)
            # Rewriting the live route with its own value races the loops too.
            a.fastpath.set_route(b.subnet, b.host.underlay_ip, PORT)
            changes += 2

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        moved = tcp_transfer(b.host.container_netns, b.host.container_ip,
                             a.host.container_netns, seconds=3)
    finally:
        done.set()
        churner.join()
    for index in range(3, 256):
        a.fastpath.del_route(f"10.244.{index}.0/24")
    assert moved > 0
    assert changes > 1000
    assert a.fastpath.table.lookup(b.host.container_ip) == (b.host.underlay_ip, PORT)


def fastpath_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pyflannel-")]


def test_stop_during_traffic_is_prompt_and_leaves_nothing_behind() -> None:
    require_host_network_tools()
    fds_before = set(os.listdir("/proc/self/fd"))
    threads_before = fastpath_threads()
    with Testbed() as bed:
        nodes = [start_node(bed, "10.244.1.0/24")]
        nodes.append(start_node(bed, "10.244.2.0/24"))
        a, b = nodes
        link(a, b)
        with inside(a.host.container_netns):
            blaster = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stop_blasting = threading.Event()
        target = (b.host.container_ip, 9)

        def blast() -> None:
            payload = os.urandom(1200)
            while not stop_blasting.is_set():
                for _ in range(100):
                    blaster.sendto(payload, target)

        sender = threading.Thread(target=blast)
        sender.start()
        try:
            deadline = time.monotonic() + 5
            while b.fastpath.stats()["rx"]["packets"] < 1000 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert b.fastpath.stats()["rx"]["packets"] >= 1000, "traffic never got going"
            for node in (a, b):
                started = time.monotonic()
                node.fastpath.stop()
                assert time.monotonic() - started < 1.0
                assert not node.fastpath.running
                # Closing the TUN removed the device.
                assert node.host.ip("-o", "link").stdout.count(node.fastpath.tun_name) == 0
        finally:
            stop_blasting.set()
            sender.join()
            blaster.close()
            for node in nodes:
                node.fastpath.stop()
        del a, b, node, nodes  # the route tables' memfds go with their fast paths
    assert fastpath_threads() == threads_before
    assert set(os.listdir("/proc/self/fd")) == fds_before


def test_handed_descriptors_are_taken_when_they_fit_and_closed_when_not(
        testbed: Testbed) -> None:
    host = testbed.add_host()
    with inside(host.netns):
        fd, name, offload, _ = open_tun("pfkeep%d", True)
        index = socket.if_nametoindex(name)
        # The same settings: the same device, whose fd is now this run's.
        again, same, _, _ = open_tun("pfkeep%d", True, handed=os.dup(fd))
        assert (same, socket.if_nametoindex(same), offload) == (name, index, True)
        os.close(again)
        # Other offload settings: the handed fd is closed, a new device made.
        other, new, _, _ = open_tun("pfkeep%d", False, handed=os.dup(fd))
        assert new != name
        os.close(other)
        sock = open_udp(host.underlay_ip, 18285, 1 << 20, True)
        kept = open_udp(host.underlay_ip, 18285, 1 << 20, False, handed=os.dup(sock.fileno()))
        assert kept.getsockname() == (host.underlay_ip, 18285)
        # Bound elsewhere: a new socket.
        fresh = open_udp(host.underlay_ip, 18286, 1 << 20, False, handed=os.dup(sock.fileno()))
        assert fresh.getsockname() == (host.underlay_ip, 18286)
        for s in (sock, kept, fresh):
            s.close()
        os.close(fd)


# ---- IPv6 inside the overlay, between pyflannel peers ----------------------------------------

def test_ipv6_routes_need_an_ipv6_network_and_an_mtu_ipv6_can_take() -> None:
    fp = FastPath(NETWORK, SUBNET_LEN, "198.18.0.1", PORT)
    with pytest.raises(ValueError, match="no ipv6_network"):
        fp.set_route("fd00:0:0:2::/64", "198.18.0.2", PORT)
    with pytest.raises(ValueError, match="below IPv6's 1280"):
        FastPath(NETWORK, SUBNET_LEN, "198.18.0.1", PORT, mtu=1200, ipv6_network=NETWORK6)
    fp = FastPath(NETWORK, SUBNET_LEN, "198.18.0.1", PORT, ipv6_network=NETWORK6)
    with pytest.raises(ValueError, match="not a /64 subnet"):
        fp.set_route("fd01:0:0:2::/64", "198.18.0.2", PORT)
    fp.set_route("fd00:0:0:2::/64", "198.18.0.2", PORT)
    assert fp.table.routes() == [] and fp.table6.lookup("fd00:0:0:2::9") == ("198.18.0.2", PORT)
    fp.del_route("fd00:0:0:2::/64")
    assert fp.table6.routes() == []


def test_a_resumed_fast_path_keeps_its_ipv6_network_and_routes(testbed: Testbed) -> None:
    host = testbed.add_host()
    with inside(host.netns):
        fp = FastPath(NETWORK, SUBNET_LEN, host.underlay_ip, PORT, ipv6_network=NETWORK6)
        fp.start()
        try:
            fp.set_route("10.244.2.0/24", "198.18.0.2", PORT)
            fp.set_route("fd00:0:0:2::/64", "198.18.0.2", PORT)
            handed = {name: os.dup(fd) for name, fd in fp.kept().items()}
            assert "routes6" in handed
        finally:
            fp.stop()
        resumed = FastPath.resume(handed)
    assert resumed is not None
    try:
        assert resumed.table6.network == ipaddress.IPv6Network(NETWORK6)
        assert resumed.table6.adopted
        assert resumed.table6.routes() == [("fd00:0:0:2::/64", ("198.18.0.2", PORT))]
        assert resumed.table.routes() == [("10.244.2.0/24", ("198.18.0.2", PORT))]
    finally:
        resumed.stop()

@pytest.fixture(scope="module")
def pair6(testbed: Testbed) -> Iterator[tuple[Node, Node]]:
    """As pair, dual-stack: a offloads (TSO6 in), b is the per-packet baseline."""
    a = start_node(testbed, "10.244.1.0/24", subnet6="fd00:0:0:1::/64")
    b = start_node(testbed, "10.244.2.0/24", batch=1, offload=False, subnet6="fd00:0:0:2::/64")
    link(a, b)
    try:
        yield a, b
    finally:
        a.fastpath.stop()
        b.fastpath.stop()


def test_ipv6_pings_cross_both_ways(pair6: tuple[Node, Node]) -> None:
    for src, dst in both_ways(pair6):
        before = src.fastpath.stats()["tx"]["packets"]
        result = src.host.run("ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", dst.address6,
                              check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "3 received" in result.stdout
        assert src.fastpath.stats()["tx"]["packets"] - before >= 3


def tcp6_transfer(server: Node, client: Node, nbytes: int) -> None:
    """nbytes of TCP over IPv6 from client's TUN address to server's, arriving intact."""
    with inside(server.host.netns):
        listener = socket.create_server((server.address6, 0), family=socket.AF_INET6)
    with inside(client.host.netns):
        sender = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    data = os.urandom(nbytes)
    received = bytearray()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while chunk := conn.recv(1 << 16):
                received.extend(chunk)

    listener.settimeout(30)
    server_thread = threading.Thread(target=serve)
    server_thread.start()
    with listener, sender:
        sender.settimeout(30)
        sender.connect((server.address6, listener.getsockname()[1]))
        sender.sendall(data)
        sender.shutdown(socket.SHUT_WR)
        server_thread.join(30)
    assert not server_thread.is_alive(), "the receiver did not see the end of the stream"
    assert received == data


def test_tcp_over_ipv6_crosses_both_ways_and_tso6_super_packets_are_cut(
        pair6: tuple[Node, Node]) -> None:
    a, _ = pair6
    for src, dst in both_ways(pair6):
        before, before_rx = src.fastpath.stats()["tx"], dst.fastpath.stats()["rx"]
        tcp6_transfer(dst, src, 8 << 20)
        after, after_rx = src.fastpath.stats()["tx"], dst.fastpath.stats()["rx"]
        assert after["bytes"] - before["bytes"] > 8 << 20
        assert after_rx["bytes"] - before_rx["bytes"] > 8 << 20
        if src is a:  # TSO6 on its TUN: the kernel hands over TCP/IPv6 super-packets
            assert after["tso_superpackets"] > before["tso_superpackets"]
        else:  # UDP GRO and coalesced TUN writes (GSO_TCPV6) on a's side
            assert after_rx["coalesced"] > before_rx["coalesced"]
        assert after["drop_bad_offload"] == before["drop_bad_offload"]


def test_udp_over_ipv6_merged_into_one_tun_write_arrives_one_by_one_intact(
        pair6: tuple[Node, Node]) -> None:
    """As over IPv4: b's datagrams to a, merged by a's receive loop (GSO_UDP_L4 over IPv6),
    arrive one by one as sent."""
    a, b = pair6
    assert a.fastpath.udp_coalesce, f"this kernel lacks {a.fastpath.offload_missing}"
    count = 400
    with inside(a.host.netns):
        receiver = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        receiver.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
        receiver.bind((a.address6, 0))
    with inside(b.host.netns):
        sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    receiver.settimeout(5)
    before = settled_stats(a)[0]["rx"]
    sent = [i.to_bytes(4, "big") * (25 if i % 7 else 3) for i in range(count)]
    with sender, receiver:
        for i, datagram in enumerate(sent):
            sender.sendto(datagram, receiver.getsockname()[:2])
            if i % 100 == 99:
                time.sleep(0.02)
        got = [receiver.recv(65536) for _ in range(count)]
    after = settled_stats(a)[0]["rx"]
    assert got == sent
    assert after["packets"] - before["packets"] == count
    assert after["bytes"] - before["bytes"] == sum(len(d) + 48 for d in sent)
    assert after["coalesced"] > before["coalesced"], "no datagrams were merged"


def test_ipv6_hop_limit_running_out_gets_icmp6_time_exceeded_on_either_side(
        pair6: tuple[Node, Node]) -> None:
    """Hop limit 1 runs out in a's send loop (answered into a's TUN), 2 in b's receive loop
    (answered back over the underlay to a)."""
    a, b = pair6
    for hops, node, direction in ((1, a, "tx"), (2, b, "rx")):
        before = node.fastpath.stats()[direction]
        result = a.host.run("ping", "-6", "-c", "1", "-W", "2", "-t", str(hops), b.address6,
                            check=False)
        after = node.fastpath.stats()[direction]
        assert result.returncode != 0
        assert "Time exceeded" in result.stdout, result.stdout
        assert after["drop_ttl"] - before["drop_ttl"] == 1
        assert after["icmp_time_exceeded"] - before["icmp_time_exceeded"] == 1


def test_ipv6_wire_format_is_the_inner_packet_with_hop_limit_one_lower(
        pair6: tuple[Node, Node]) -> None:
    """One datagram from a's port to b's, its payload the IPv6 packet a's kernel handed the TUN
    with the hop limit one lower and the UDP checksum (left partial with offloads) finished."""
    a, b = pair6
    marker = os.urandom(16).hex().encode()
    inner_tap = capture(a.host.netns, a.fastpath.tun_name)
    wire_tap = capture(b.host.netns, "eth0")
    with inner_tap, wire_tap:
        with inside(a.host.netns):
            sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        with sender:
            sender.sendto(marker, (b.address6, 9))
        deadline = time.monotonic() + 5
        inner = find(inner_tap, marker, socket.PACKET_OUTGOING, deadline)
        outer = find(wire_tap, marker, socket.PACKET_HOST, deadline)
    assert outer[0] == 0x45 and outer[9] == socket.IPPROTO_UDP
    assert outer[12:20] == socket.inet_aton(a.host.underlay_ip) + socket.inet_aton(
        b.host.underlay_ip)
    src_port, dst_port, udp_len, _ = struct.unpack("!HHHH", outer[20:28])
    assert (src_port, dst_port) == (PORT, PORT)
    expected = bytearray(inner)
    expected[7] -= 1
    expected[46:48] = b"\0\0"
    pseudo = bytes(expected[8:40]) + struct.pack("!I3xB", len(expected) - 40, socket.IPPROTO_UDP)
    expected[46:48] = struct.pack("!H", reference_checksum(pseudo + bytes(expected[40:])) or 0xFFFF)
    assert outer[28:20 + udp_len] == bytes(expected)


def test_ipv6_destination_without_route_gets_icmp6_unreachable(pair6: tuple[Node, Node]) -> None:
    a, _ = pair6
    before = a.fastpath.stats()["tx"]
    result = a.host.run("ping", "-6", "-c", "1", "-W", "2", "fd00:0:0:99::5", check=False)
    after = a.fastpath.stats()["tx"]
    assert result.returncode != 0
    assert "Destination unreachable: No route" in result.stdout, result.stdout
    assert after["icmp_unreachable"] - before["icmp_unreachable"] == 1


@pytest.mark.parametrize("destination", ["fd00:0:0:99::5", "10.244.99.5"])
def test_icmp_errors_are_rate_limited_as_linux_limits_its_own(pair6: tuple[Node, Node],
                                                              destination: str) -> None:
    """A burst to a subnet with no route: 50 errors, then one a millisecond; the rest counted.
    The burst fits the TUN's queue (500 packets), so each packet the TUN took reaches the
    loop: the burst, and what the TUN's own IPv6 sent meanwhile, which is owed no error."""
    a, _ = pair6
    family = socket.AF_INET6 if ":" in destination else socket.AF_INET
    (before,) = settled_stats(a)  # and the bucket full again
    with inside(a.host.netns):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        multicast = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        tun_index = socket.if_nametoindex(a.fastpath.tun_name)
        tun = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    with tun:
        tun.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
        tun.bind((a.fastpath.tun_name, 0))
        start = time.monotonic()
        with sock, multicast:
            # As the TUN's own IPv6 does now and then: no route, and no error owed.
            multicast.sendto(b"x", ("ff02::1", 9, 0, tun_index))
            for _ in range(BURST):
                sock.sendto(b"x", (destination, 9))
        seen = -1
        while (now := a.fastpath.stats()["tx"]["drop_no_route"]) != seen:
            seen = now
            elapsed_ms = (time.monotonic() - start) * 1000
            time.sleep(0.05)
        after = a.fastpath.stats()["tx"]
        owed_none = ipv6_owed_no_error(tun)
    reached = after["drop_no_route"] - before["tx"]["drop_no_route"]
    answered = after["icmp_unreachable"] - before["tx"]["icmp_unreachable"]
    limited = after["icmp_rate_limited"] - before["tx"]["icmp_rate_limited"]
    assert owed_none >= 1
    assert reached == BURST + owed_none
    assert answered + limited == BURST
    assert 50 <= answered <= 50 + elapsed_ms + 1


def ipv6_owed_no_error(tun: socket.socket) -> int:
    """The packets the TUN's own IPv6 sent meanwhile (router solicitations, MLD reports) that
    the socket, bound to it, has queued: to a multicast address or from ::, they find no route
    and get no ICMPv6 error (RFC 4443 2.4 (e))."""
    tun.setblocking(False)
    count = 0
    while True:
        try:
            packet = tun.recv(2048)
        except BlockingIOError:
            return count
        if len(packet) >= 40 and packet[0] >> 4 == 6 and (
                packet[24] == 0xFF or packet[8:24] == bytes(16)):
            count += 1


def test_ipv6_packet_over_the_mtu_gets_icmp6_packet_too_big(pair6: tuple[Node, Node]) -> None:
    """A TUN whose MTU is above the fast path's (set by hand here) hands over a packet the wire
    cannot take: IPv6 routers do not fragment, so the sender hears the MTU instead."""
    a, b = pair6
    tun = a.fastpath.tun_name
    before = a.fastpath.stats()["tx"]
    a.host.ip("link", "set", tun, "mtu", str(MTU + 28))
    try:
        # With its IPv6 and ICMPv6 headers the echo request is 8 bytes over the MTU.
        result = a.host.run("ping", "-6", "-c", "1", "-W", "2", "-M", "do", "-s",
                            str(MTU - 40), b.address6, check=False)
    finally:
        a.host.ip("link", "set", tun, "mtu", str(MTU))
        a.host.ip("-6", "route", "flush", "cache")
    after = a.fastpath.stats()["tx"]
    assert result.returncode != 0
    assert f"mtu={MTU}" in result.stdout + result.stderr, result.stdout + result.stderr
    assert after["drop_too_big"] - before["drop_too_big"] == 1
    assert after["icmp_too_big"] - before["icmp_too_big"] == 1


def inner_udp6(source: str, destination: str, payload: bytes, port: int = 9) -> bytes:
    """An IPv6 packet carrying a UDP datagram to `port` with its checksum right (RFC 8200
    8.1)."""
    src, dst = ipaddress.IPv6Address(source).packed, ipaddress.IPv6Address(destination).packed
    udp = struct.pack("!HHHH", 5000, port, 8 + len(payload), 0) + payload
    pseudo = src + dst + struct.pack("!I3xB", len(udp), socket.IPPROTO_UDP)
    udp = udp[:6] + struct.pack("!H", reference_checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    return struct.pack("!IHBB16s16s", 6 << 28, len(udp), socket.IPPROTO_UDP, 64, src,
                       dst) + udp


def test_crafted_ipv6_datagrams_are_checked_at_the_source_and_malformed_ones_counted(
        pair6: tuple[Node, Node]) -> None:
    """From b's address: packets from b's subnet are delivered; from no host's subnet, or from
    another host's, dropped by the source check; malformed ones dropped by kind."""
    a, b = pair6
    a.fastpath.set_route("fd00:0:0:3::/64", "198.18.0.250", PORT)  # a third host's subnet
    good = inner_udp6(str(ipaddress.IPv6Address(b.address6) + 7), a.address6, b"ok")
    crafted = {
        "packets": [good],
        "drop_spoof_unrouted_source": [inner_udp6("fd00:0:0:77::1", a.address6, b"x"),
                                       inner_udp6(a.address6, a.address6, b"x")],
        "drop_spoof_wrong_sender": [inner_udp6("fd00:0:0:3::1", a.address6, b"x")],
        "drop_bad_length": [good + b"trailing", good[:-1]],
        "drop_too_short": [good[:39]],
        "drop_too_big": [inner_udp6(b.address6, a.address6, bytes(MTU))],
    }
    try:
        (before,) = settled_stats(a)
        with inside(b.host.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.bind((b.host.underlay_ip, 0))
            for datagrams in crafted.values():
                for datagram in datagrams:
                    sock.sendto(datagram, (a.host.underlay_ip, PORT))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            after = a.fastpath.stats()["rx"]
            if all(after[name] - before["rx"][name] >= len(datagrams)
                   for name, datagrams in crafted.items()):
                break
            time.sleep(0.05)
    finally:
        a.fastpath.del_route("fd00:0:0:3::/64")
    for name, datagrams in crafted.items():
        assert after[name] - before["rx"][name] == len(datagrams), name
