"""pyflanneld and the real flanneld v0.20.2 (../shared/reference/) in one udp cluster: containers
on each reach the other's both ways, with the fast path's defaults (TCP cut into UDP GSO sends
and merged back from UDP GRO as iovecs, UDP datagrams merged into one TUN write) on one side and
flanneld's C proxy, one datagram per read, on the other. Skipped only where the reference build
is absent (a user's machine)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from fastpath.hello import HELLO_SECONDS
from tests.cluster import FIGURE_2_CONFIG, put_config, scrape, value
from tests.etcd import EtcdServer
from tests.flanneld import REFERENCE_FLANNELD, beside_flanneld
from tests.test_dataplane import container_udp
from tests.testbed import Host, Testbed, tcp_transfer

pytestmark = pytest.mark.skipif(not os.path.exists(REFERENCE_FLANNELD),
                                reason=f"no reference flanneld at {REFERENCE_FLANNELD}")


@pytest.fixture(scope="module", params=[[], ["--fastpath-kernel", "on"]],
                ids=["loops", "kernel-path"])
def mixed(bed_and_etcd: tuple[Testbed, EtcdServer], request: pytest.FixtureRequest
          ) -> Iterator[tuple[Host, Host]]:
    """(flanneld's host, pyflanneld's host), each with a container on its subnet; pyflanneld
    with its loops alone, then with the kernel path as well."""
    bed, etcd = bed_and_etcd
    put_config(etcd, "v3", FIGURE_2_CONFIG)
    with beside_flanneld(bed, etcd, *request.param) as (flanneld, pyflanneld):
        yield flanneld.host, pyflanneld.host


def test_ping_both_ways(mixed: tuple[Host, Host]) -> None:
    f_host, p_host = mixed
    for src, dst in ((f_host, p_host), (p_host, f_host)):
        assert dst.container_ip
        result = src.in_container("ping", "-c", "3", "-i", "0.2", "-W", "2", dst.container_ip,
                                  check=False)
        assert "3 received" in result.stdout, result.stdout + result.stderr


def test_tcp_arrives_intact_both_ways(mixed: tuple[Host, Host]) -> None:
    for src, dst in (mixed, mixed[::-1]):
        assert dst.container_netns and dst.container_ip and src.container_netns
        assert tcp_transfer(dst.container_netns, dst.container_ip, src.container_netns,
                            nbytes=16 << 20) == 16 << 20


def test_flanneld_never_gets_a_whole_super_packet(
        bed_and_etcd: tuple[Testbed, EtcdServer]) -> None:
    """flanneld says no hello (its proxy reads at most its MTU per datagram), so pyflanneld,
    with its defaults, cuts every TCP super-packet it sends there, as for any peer."""
    bed, etcd = bed_and_etcd
    put_config(etcd, "v3", FIGURE_2_CONFIG)
    port = 9131
    with beside_flanneld(bed, etcd, "--metrics-port", str(port), "--metrics-ip",
                         "127.0.0.1") as (flanneld, pyflanneld):
        pyflanneld.wait_log("metrics server listening")
        assert "kernel path on" in pyflanneld.log()
        assert "whole super-packets on" in pyflanneld.log()
        time.sleep(2 * HELLO_SECONDS)  # a hello, had flanneld said one, would be in by now
        f_host, p_host = flanneld.host, pyflanneld.host
        assert f_host.container_netns and f_host.container_ip and p_host.container_netns
        before = scrape(pyflanneld, port)
        assert tcp_transfer(f_host.container_netns, f_host.container_ip,
                            p_host.container_netns, nbytes=16 << 20) == 16 << 20
        after = scrape(pyflanneld, port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)
    assert moved("pyflannel_fastpath_tso_superpackets_total") > 0
    assert moved("pyflannel_kernelpath_superpackets_total", direction="tx") == 0


def test_udp_datagrams_arrive_one_by_one_intact_both_ways(mixed: tuple[Host, Host]) -> None:
    for src, dst in (mixed, mixed[::-1]):
        assert dst.container_netns and dst.container_ip and src.container_netns
        sender, receiver = container_udp(src, dst)
        sent = [i.to_bytes(4, "big") * (100 if i % 9 else 7) for i in range(300)]
        with sender, receiver:
            for i, datagram in enumerate(sent):
                sender.sendto(datagram, receiver.getsockname())
                if i % 50 == 49:
                    time.sleep(0.02)  # flanneld's proxy reads one at a time
            got = [receiver.recv(65536) for _ in sent]
        assert got == sent
