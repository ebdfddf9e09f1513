"""Source verification (on by default): a host delivers a received packet only when its source
lies in the subnet leased to the host that sent the datagram. A namespace on the underlay that is
no cluster member, and a member posing as another, get nothing into a container, every attempt
counted by reason; real traffic is unharmed; and a host with the check off shows what it stops."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.test_dataplane import (
    PORT,
    Node,
    container_udp,
    inner_udp,
    link,
    settled_stats,
    start_node,
)
from tests.testbed import Host, Testbed, inside

COUNT = 50


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[tuple[Node, Node, Node, Host]]:
    """(a, b, open) members, with the kernel path on as by default, `open` with the check
    off; and an outsider: a host on the same underlay that runs nothing."""
    a = start_node(testbed, "10.244.1.0/24", kernel="on", underlay="eth0")
    b = start_node(testbed, "10.244.2.0/24", kernel="on", underlay="eth0")
    unchecked = start_node(testbed, "10.244.3.0/24", kernel="on", underlay="eth0",
                           verify_source=False)
    link(a, b, unchecked)
    outsider = testbed.add_host()
    try:
        yield a, b, unchecked, outsider
    finally:
        for node in (a, b, unchecked):
            node.fastpath.stop()


def inject(sender: Host, target: Node, source: str) -> int:
    """COUNT datagrams from `sender`'s underlay address to target's fast path, each carrying a
    packet from `source` to a socket in target's container; returns how many that socket got."""
    with inside(str(target.host.container_netns)):
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind((str(target.host.container_ip), 0))
    receiver.settimeout(0.5)
    with inside(sender.netns):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    got = 0
    with udp, receiver:
        for i in range(COUNT):
            packet = inner_udp(source, str(target.host.container_ip), receiver.getsockname()[1],
                               i.to_bytes(4, "big"))
            udp.sendto(packet, (target.host.underlay_ip, PORT))
        try:
            while True:
                receiver.recv(100)
                got += 1
        except TimeoutError:
            pass
    return got


def drops(node: Node) -> dict[str, int]:
    rx = settled_stats(node)[0]["rx"]
    return {reason: rx[f"drop_spoof_{reason}"] for reason in ("unrouted_source", "wrong_sender")}


@pytest.mark.parametrize(("source", "reason"), [
    ("10.244.1.7", "wrong_sender"),       # a's subnet
    ("10.244.200.7", "unrouted_source"),  # the Network, but no one's
    ("10.9.9.9", "unrouted_source"),      # outside the Network
    ("10.244.2.9", "unrouted_source"),    # the target's own subnet
])
def test_an_outsider_gets_nothing_in_and_every_attempt_is_counted(
        cluster: tuple[Node, Node, Node, Host], source: str, reason: str) -> None:
    _, b, unchecked, outsider = cluster
    before = drops(b)
    assert inject(outsider, b, source) == 0
    after = drops(b)
    assert after[reason] - before[reason] == COUNT
    assert sum(after.values()) - sum(before.values()) == COUNT
    # Without the check the same datagrams get in: that is what it stops. (Sources outside
    # the Network would meet the container host's reverse-path filter instead.)
    if source.startswith("10.244.") and source != "10.244.2.9":
        assert inject(outsider, unchecked, source) == COUNT


def test_a_member_cannot_pose_as_another(cluster: tuple[Node, Node, Node, Host]) -> None:
    a, b, unchecked, _ = cluster
    before = drops(b)
    assert inject(a.host, b, str(unchecked.host.container_ip)) == 0  # a as the third host
    assert drops(b)["wrong_sender"] - before["wrong_sender"] == COUNT
    assert inject(a.host, unchecked, "10.244.2.5") == COUNT  # b's subnet, unchecked


def test_real_traffic_is_unharmed(cluster: tuple[Node, Node, Node, Host]) -> None:
    a, b, unchecked, _ = cluster
    before = drops(b)
    for src, dst in ((a, b), (b, a), (unchecked, b), (b, unchecked)):
        sender, receiver = container_udp(src.host, dst.host)
        with sender, receiver:
            for i in range(COUNT):
                sender.sendto(i.to_bytes(4, "big"), receiver.getsockname())
                time.sleep(0.001)
            assert [receiver.recv(100) for _ in range(COUNT)] == [
                i.to_bytes(4, "big") for i in range(COUNT)]
    assert drops(b) == before
