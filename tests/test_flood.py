"""A million garbage datagrams at a host's port, mixed with real traffic, with the kernel path on
as by default: the fast path does not crash, counts every one it sees by reason, stays the same
size, and a TCP transfer across it completes meanwhile."""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.test_dataplane import (
    PORT,
    Node,
    garbage,
    link,
    settled_stats,
    start_node,
    udp_snmp,
)
from tests.test_source_check import inner_udp
from tests.testbed import Testbed, inside, tcp_transfer

FLOOD = 1_000_000


@pytest.fixture(scope="module")
def pair(testbed: Testbed) -> Iterator[tuple[Node, Node]]:
    a = start_node(testbed, "10.244.1.0/24", kernel="on", underlay="eth0")
    b = start_node(testbed, "10.244.2.0/24", kernel="on", underlay="eth0")
    link(a, b)
    try:
        yield a, b
    finally:
        for node in (a, b):
            node.fastpath.stop()


def rss_kib() -> int:
    """This process's resident set: the fast path's loops run in its threads."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def softnet_dropped() -> int:
    """Packets the machine's per-CPU input queues dropped (softnet_stat's second column), in
    any namespace: a loose but honest bound on what never reached the socket."""
    with open("/proc/net/softnet_stat") as stat:
        return sum(int(line.split()[1], 16) for line in stat)


def test_a_million_garbage_datagrams_are_counted_and_change_nothing(
        pair: tuple[Node, Node]) -> None:
    a, b = pair
    bad = garbage(random.Random(5))
    # and well-formed packets from a source in b's own subnet, which a does not own
    bad["drop_spoof_unrouted_source"] = [
        inner_udp("10.244.2.77", str(b.host.container_ip), 9, bytes([i])) for i in range(50)]
    kinds = [datagram for datagrams in bad.values() for datagram in datagrams]
    before, snmp_before, rss_before = b.fastpath.stats()["rx"], udp_snmp(b.host), rss_kib()
    softnet_before = softnet_dropped()
    sent = 0

    def flood() -> None:
        nonlocal sent
        with inside(a.host.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            target = (b.host.underlay_ip, PORT)
            while sent < FLOOD:
                for datagram in kinds:
                    sock.sendto(datagram, target)
                sent += len(kinds)

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        assert b.host.container_netns and b.host.container_ip and a.host.container_netns
        moved = tcp_transfer(b.host.container_netns, b.host.container_ip,
                             a.host.container_netns, nbytes=20 << 20)
    finally:
        flooder.join()
    assert moved == 20 << 20
    after = settled_stats(b)[0]["rx"]  # once the loop has drained the socket
    for reason in bad:
        assert after[reason] > before[reason], reason
    counted = sum(after[reason] - before[reason] for reason in bad)
    lost_in_kernel = (udp_snmp(b.host)["RcvbufErrors"] - snmp_before["RcvbufErrors"]
                      + softnet_dropped() - softnet_before)
    # Every datagram that reached the socket was counted by its reason; none got through.
    assert sent - lost_in_kernel <= counted <= sent
    assert after["drop_write_error"] == before["drop_write_error"]
    assert b.fastpath.running and rss_kib() - rss_before < 8 * 1024
