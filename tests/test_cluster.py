"""pyflanneld against a real etcd, on both etcd APIs: leases, the watch, and bad input.

Each test uses its own etcd prefix and its own hosts on a shared testbed and etcd per API.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from control.service.endpoints import healthz_page
from fastpath.udp_tc import RX_VXLAN_DEVICE
from tests.cluster import (
    FIGURE_2_CONFIG,
    Cluster,
    Flanneld,
    Metrics,
    fetch,
    key_of,
    scrape,
    value,
    wait_for,
)
from tests.etcd import EtcdServer
from tests.testbed import Testbed, inside, tcp_transfer


def expected_value(daemon: Flanneld) -> str:
    return f'{{"PublicIP":"{daemon.host.underlay_ip}","PublicIPv6":null}}'


def test_ten_daemons_at_once_get_ten_subnets_and_route_to_all_others(cluster: Cluster) -> None:
    # SubnetLen 20 in 10.10-10.99 gives 90 subnets: ten random picks from them collide often.
    cluster.config(FIGURE_2_CONFIG)
    daemons = [cluster.daemon(start=False) for _ in range(10)]
    for daemon in daemons:
        daemon.start()
    subnets = [daemon.wait_subnet(timeout=60) for daemon in daemons]
    assert len(set(subnets)) == 10
    # etcd holds exactly these leases, each with flanneld's value byte for byte.
    assert cluster.leases() == {key_of(subnet, cluster.prefix): expected_value(daemon)
                                for subnet, daemon in zip(subnets, daemons, strict=True)}
    for daemon in daemons:
        daemon.wait_log("subnet added", count=9, timeout=30)
    # Every TUN reaches every other: 90 pings, from each host's TUN address to each other's.
    pings = [(src, dst, subprocess.Popen(
        ["ip", "netns", "exec", src.host.netns, "ping", "-c", "1", "-W", "5",
         str(dst_subnet.network_address)], stdout=subprocess.DEVNULL))
        for src in daemons for dst, dst_subnet in zip(daemons, subnets, strict=True)
        if dst is not src]
    failed = [(src.host.netns, dst.host.netns) for src, dst, ping in pings if ping.wait() != 0]
    assert failed == []


def test_subnet_env_and_lease_match_flanneld(cluster: Cluster) -> None:
    cluster.config(FIGURE_2_CONFIG)
    daemon = cluster.daemon()
    subnet = daemon.wait_subnet()
    assert subnet.prefixlen == 20
    assert ipaddress.IPv4Address("10.10.0.0") <= subnet.network_address
    assert subnet.network_address <= ipaddress.IPv4Address("10.99.0.0")
    with open(daemon.subnet_file) as f:
        assert f.read() == (f"FLANNEL_NETWORK=10.0.0.0/8\n"
                            f"FLANNEL_SUBNET={subnet.network_address + 1}/20\n"
                            f"FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")
    key = key_of(subnet, cluster.prefix)
    assert cluster.leases() == {key: expected_value(daemon)}
    assert 86000 < cluster.etcd.ttl(key, cluster.api) <= 86400
    # The TUN is flanneld's: flannel0, the subnet's address as a /32, MTU 1472, the Network.
    addr = daemon.host.ip("-o", "-4", "addr", "show", "dev", "flannel0").stdout
    assert f"inet {subnet.network_address}/32" in addr
    assert "mtu 1472" in daemon.host.ip("link", "show", "flannel0").stdout
    assert "10.0.0.0/8 dev flannel0" in daemon.host.ip("route").stdout


def test_sigterm_stops_cleanly_and_keeps_the_lease_and_a_restart_reuses_it(
        cluster: Cluster) -> None:
    cluster.config({"Network": "10.244.0.0/16"})
    daemon = cluster.daemon()
    subnet = daemon.wait_subnet()
    assert daemon.stop() == 0
    assert "flannel0" not in daemon.host.ip("link").stdout
    key = key_of(subnet, cluster.prefix)
    assert cluster.leases() == {key: expected_value(daemon)}

    daemon.start()
    daemon.wait_log("reusing it")
    assert daemon.wait_subnet() == subnet
    assert daemon.stop() == 0

    # With the key gone, the previous run's subnet.env brings the same subnet back.
    cluster.etcd.delete(key, cluster.api)
    daemon.start()
    daemon.wait_log(f"leased subnet {subnet}")
    assert cluster.leases() == {key: expected_value(daemon)}


def test_lease_is_renewed_before_it_expires(cluster: Cluster) -> None:
    cluster.config({"Network": "10.244.0.0/16"})
    # A 4 s lease renewed 1.5 s before it ends (flanneld: 24 h and 60 min).
    daemon = cluster.daemon("--subnet-lease-ttl", "4", "--subnet-lease-renew-margin", "0.025")
    subnet = daemon.wait_subnet()
    daemon.wait_log("renewed lease", count=3, timeout=15)
    key = key_of(subnet, cluster.prefix)
    assert cluster.leases() == {key: expected_value(daemon)}
    assert "was lost" not in daemon.log()


def test_lease_deleted_from_outside_is_taken_again(cluster: Cluster) -> None:
    cluster.config({"Network": "10.244.0.0/16"})
    daemon = cluster.daemon()
    subnet = daemon.wait_subnet()
    key = key_of(subnet, cluster.prefix)
    cluster.etcd.delete(key, cluster.api)
    daemon.wait_log("was lost")
    wait_for(lambda: cluster.leases() == {key: expected_value(daemon)}, 10,
             "the lease was not taken again")
    assert daemon.wait_subnet() == subnet


def test_bad_config_is_logged_and_retried_until_fixed(cluster: Cluster) -> None:
    key = f"{cluster.prefix}/config"
    daemon = cluster.daemon()
    daemon.wait_log(f"config {key}: flannel config not found in etcd store", count=2)
    cluster.config('{"Network": "10.244.0.0/16"')
    daemon.wait_log(f"config {key}: invalid JSON", count=2)
    cluster.config('{"SubnetLen": 24}')
    daemon.wait_log(f"config {key}: please define a correct Network", count=2)
    cluster.config({"Network": "10.244.0.0/16", "Backend": {"Type": "ipip"}})
    daemon.wait_log(f"config {key}: backend type 'ipip' is not served", count=2)
    cluster.config({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 1 << 24}})
    daemon.wait_log(f"config {key}: Backend.VNI 16777216 is out of range", count=2)
    assert daemon.process is not None and daemon.process.poll() is None
    cluster.config({"Network": "10.244.0.0/16"})
    assert daemon.wait_subnet().prefixlen == 24


def test_malformed_leases_are_logged_and_skipped(cluster: Cluster) -> None:
    cluster.config({"Network": "10.244.0.0/16"})
    cluster.put("/subnets/10.244.200.0-24", "not json")
    cluster.put("/subnets/banana", '{"PublicIP":"198.18.0.250"}')
    first = cluster.daemon()
    first.wait_subnet()
    first.wait_log("ignoring lease 10.244.200.0/24")
    first.wait_log("ignoring a key under subnets/")
    cluster.put("/subnets/10.244.201.0-24", '{"PublicIP": 7}')
    first.wait_log("ignoring lease 10.244.201.0/24")
    second = cluster.daemon()
    subnet = second.wait_subnet()
    assert subnet not in (ipaddress.IPv4Network("10.244.200.0/24"),
                          ipaddress.IPv4Network("10.244.201.0/24"))
    first.wait_log(f"subnet added: {subnet}")
    assert first.process is not None and first.process.poll() is None


def test_alloc_backend_leases_and_forwards_nothing(cluster: Cluster) -> None:
    cluster.config({"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}})
    daemon = cluster.daemon()
    subnet = daemon.wait_subnet()
    assert daemon.subnet_env()["FLANNEL_MTU"] == "1500"
    assert cluster.leases() == {key_of(subnet, cluster.prefix): expected_value(daemon)}
    assert "flannel" not in daemon.host.ip("link").stdout


def test_out_of_subnets_exits_non_zero(cluster: Cluster) -> None:
    cluster.config({"Network": "10.244.0.0/28"})  # /30s: 10.244.0.4, .8 and .12
    for third in ("4", "8", "12"):
        cluster.put(f"/subnets/10.244.0.{third}-30", '{"PublicIP":"198.18.0.250"}')
    daemon = cluster.daemon()
    assert daemon.process is not None and daemon.process.wait(20) == 1
    assert "out of subnets" in daemon.log()


def test_a_lease_that_changes_host_is_rerouted(cluster: Cluster) -> None:
    cluster.config({"Network": "10.244.0.0/16"})
    daemon = cluster.daemon()
    daemon.wait_subnet()
    cluster.put("/subnets/10.244.230.0-24", '{"PublicIP":"198.18.0.250"}')
    daemon.wait_log("subnet added: 10.244.230.0/24 via 198.18.0.250")
    cluster.put("/subnets/10.244.230.0-24", '{"PublicIP":"198.18.0.251","BackendType":"udp"}')
    daemon.wait_log("subnet changed: 10.244.230.0/24 via 198.18.0.251 (was 198.18.0.250)")


def test_watch_resumes_after_etcd_restart(cluster: Cluster) -> None:
    cluster.config({"Network": "10.244.0.0/16"})
    daemon = cluster.daemon()
    daemon.wait_subnet()
    cluster.etcd.restart()
    cluster.put("/subnets/10.244.210.0-24", '{"PublicIP":"198.18.0.250"}')
    daemon.wait_log("subnet added: 10.244.210.0/24 via 198.18.0.250", timeout=15)
    cluster.etcd.delete(f"{cluster.prefix}/subnets/10.244.210.0-24", cluster.api)
    daemon.wait_log("subnet removed: 10.244.210.0/24", timeout=15)


def put_with_ttl(cluster: Cluster, key: str, value: str, ttl: int) -> None:
    if cluster.api == "v2":
        cluster.etcd.ctl("set", "--ttl", str(ttl), "--", key, value, api="v2")
        return
    lease = cluster.etcd.ctl("lease", "grant", str(ttl)).stdout.split()[1]
    cluster.etcd.ctl("put", f"--lease={lease}", key, "--", value)


def test_an_expired_lease_stays_routed_for_a_grace_on_v2_unless_it_comes_back(
        cluster: Cluster) -> None:
    cluster.config({"Network": "10.244.0.0/16"})
    daemon = cluster.daemon()
    daemon.wait_subnet()
    for n in (240, 241):
        put_with_ttl(cluster, f"{cluster.prefix}/subnets/10.244.{n}.0-24",
                     '{"PublicIP":"198.18.0.250"}', 2)
    daemon.wait_log("subnet added: 10.244.241.0/24")
    if cluster.api == "v3":  # v3 reports an expired lease as a plain delete: unrouted at once
        daemon.wait_log("subnet removed: 10.244.241.0/24", timeout=15)
        assert "expired; keeping its route" not in daemon.log()
        return
    daemon.wait_log("lease 10.244.240.0/24 expired; keeping its route", timeout=15)
    daemon.wait_log("lease 10.244.241.0/24 expired; keeping its route", timeout=15)
    expired = time.monotonic()
    cluster.put("/subnets/10.244.240.0-24", '{"PublicIP":"198.18.0.250"}')  # its owner is back
    daemon.wait_log("subnet removed: 10.244.241.0/24", timeout=30)
    assert time.monotonic() - expired > 5, "the expired lease was unrouted without a grace"
    assert "subnet removed: 10.244.240.0/24" not in daemon.log()


def cut_off(cluster: Cluster, daemon: Flanneld) -> None:
    """Abort the daemon's TCP connections to etcd from etcd's side."""
    cluster.etcd.host.run("ss", "-K", "dst", daemon.host.underlay_ip)


def test_changes_missed_while_disconnected_arrive_and_history_loss_relists(
        cluster: Cluster) -> None:
    cluster.config({"Network": "10.244.0.0/16"})
    daemon = cluster.daemon()
    daemon.wait_subnet()
    assert daemon.process is not None
    pid = daemon.process.pid

    # Frozen and cut off: the changes made meanwhile come from the resumed watch.
    os.kill(pid, signal.SIGSTOP)
    cut_off(cluster, daemon)
    cluster.put("/subnets/10.244.220.0-24", '{"PublicIP":"198.18.0.250"}')
    os.kill(pid, signal.SIGCONT)
    daemon.wait_log("subnet added: 10.244.220.0/24", timeout=15)

    # Frozen again while etcd forgets the history it would resume from: list again.
    os.kill(pid, signal.SIGSTOP)
    cut_off(cluster, daemon)
    cluster.etcd.delete(f"{cluster.prefix}/subnets/10.244.220.0-24", cluster.api)
    cluster.put("/subnets/10.244.221.0-24", '{"PublicIP":"198.18.0.250"}')
    if cluster.api == "v3":
        cluster.etcd.compact()
    else:  # v2 keeps the last 1000 events
        cluster.etcd.flood_v2(f"{cluster.prefix}/churn", 1100)
    os.kill(pid, signal.SIGCONT)
    daemon.wait_log("listing the leases again", timeout=15)
    daemon.wait_log("subnet removed: 10.244.220.0/24", timeout=15)
    daemon.wait_log("subnet added: 10.244.221.0/24", timeout=15)


def ping(src: Flanneld, address: str, wait: float = 2) -> subprocess.CompletedProcess[str]:
    return src.host.in_container("ping", "-c", "1", "-W", str(wait), address, check=False)


def test_containers_on_three_hosts_then_a_fourth_joins_and_a_removed_lease_unroutes(
        cluster: Cluster) -> None:
    cluster.config(FIGURE_2_CONFIG)
    daemons = [cluster.daemon() for _ in range(3)]
    for daemon in daemons:
        cluster.bed.add_container(daemon.host, str(daemon.wait_subnet()), 1472)
    for daemon in daemons:
        daemon.wait_log("subnet added", count=2)
    for src in daemons:
        for dst in daemons:
            if dst is not src:
                result = ping(src, dst.host.container_ip)
                assert result.returncode == 0, (src.host.netns, dst.host.netns, result.stdout)

    fourth = cluster.daemon()
    subnet = fourth.wait_subnet()
    leased_at = time.monotonic()
    address = cluster.bed.add_container(fourth.host, str(subnet), 1472)
    for src in daemons:
        while ping(src, address, wait=0.5).returncode != 0:
            assert time.monotonic() - leased_at < 2.0, f"{src.host.netns} cannot reach {address}"

    assert fourth.stop() == 0
    cluster.etcd.delete(key_of(subnet, cluster.prefix), cluster.api)
    for src in daemons:
        src.wait_log(f"subnet removed: {subnet}")
        result = ping(src, address)
        assert "Destination Net Unreachable" in result.stdout, result.stdout


@pytest.mark.parametrize(("flags", "public_ip"), [
    (["--iface-regex", "^nomatch$", "--iface-regex", r"^198\.18\."], None),
    (["--iface-regex", "^eth"], None),
    (["--iface", "eth0", "--public-ip", "198.18.1.7"], "198.18.1.7"),
])
def test_interface_and_public_ip_choice(cluster: Cluster, flags: list[str],
                                        public_ip: str | None) -> None:
    cluster.config({"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}})
    daemon = cluster.daemon(*flags, iface=None)
    subnet = daemon.wait_subnet()
    daemon.wait_log(f"using interface eth0 ({daemon.host.underlay_ip}, MTU 1500)")
    value = f'{{"PublicIP":"{public_ip or daemon.host.underlay_ip}","PublicIPv6":null}}'
    assert cluster.leases() == {key_of(subnet, cluster.prefix): value}


def test_interface_by_address(cluster: Cluster) -> None:
    cluster.config({"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}})
    host = cluster.bed.add_host()
    daemon = Flanneld(cluster.bed, host, cluster.etcd, cluster.api, "--etcd-prefix",
                      cluster.prefix, iface=host.underlay_ip)
    cluster.daemons.append(daemon.start())
    daemon.wait_subnet()
    daemon.wait_log(f"using interface eth0 ({host.underlay_ip}")


@pytest.mark.parametrize(("flags", "reason"), [
    ([], "no default route"),
    (["--iface", "nosuch0"], "no interface matches --iface nosuch0"),
    (["--iface-regex", "^nosuch"], "no interface matches --iface-regex"),
])
def test_no_usable_interface_exits_non_zero(cluster: Cluster, flags: list[str],
                                            reason: str) -> None:
    """Once the config is read, as flanneld looks for the interface of its families then."""
    cluster.config({"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}})
    daemon = cluster.daemon(*flags, iface=None)
    assert daemon.process is not None and daemon.process.wait(20) == 1
    assert reason in daemon.log()


def test_healthz(cluster: Cluster) -> None:
    cluster.config({"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}})
    daemon = cluster.daemon("--healthz-port", "8471", "--healthz-ip", "127.0.0.1")
    daemon.wait_subnet()
    daemon.wait_log("healthz server listening")
    assert fetch(daemon, "http://127.0.0.1:8471/healthz", "http://127.0.0.1:8471/other") == [
        (200, "flanneld is running"), (404, "404 page not found\n")]


def test_healthz_is_unhealthy_while_the_lease_is_lost(cluster: Cluster) -> None:
    # /30s: 10.244.0.4, .8 and .12; other hosts hold the first two, this one gets the last.
    cluster.config({"Network": "10.244.0.0/28", "Backend": {"Type": "alloc"}})
    for third in ("4", "8"):
        cluster.put(f"/subnets/10.244.0.{third}-30", '{"PublicIP":"198.18.0.250"}')
    daemon = cluster.daemon("--healthz-port", "8472", "--healthz-ip", "127.0.0.1")
    assert str(daemon.wait_subnet()) == "10.244.0.12/30"
    daemon.wait_log("healthz server listening")
    url = "http://127.0.0.1:8472/healthz"
    assert fetch(daemon, url)[0][0] == 200
    # Another host takes the last subnet over: the lease is lost and cannot be taken again.
    cluster.put("/subnets/10.244.0.12-30", '{"PublicIP":"198.18.0.251","PublicIPv6":null}')
    daemon.wait_log("lease 10.244.0.12/30 was lost")
    daemon.wait_log("taking a lease again failed")
    assert fetch(daemon, url)[0][0] == 503
    # It frees up: the daemon takes it again and is healthy.
    cluster.etcd.delete(f"{cluster.prefix}/subnets/10.244.0.12-30", cluster.api)
    wait_for(lambda: fetch(daemon, url)[0][0] == 200, 10, "healthy again")
    assert daemon.process is not None and daemon.process.poll() is None


def pinged_with_metrics(cluster: Cluster, count: int, port: int, a_flags: list[str],
                       b_flags: list[str]) -> tuple[Flanneld, Flanneld,
                                                    Callable[..., float], dict]:
    """Two daemons with containers, a serving metrics on `port`; a's container pings b's
    `count` times. Returns a, b, moved(name, **labels) (how far a metric moved during the
    pings) and the metrics after them."""
    cluster.config(FIGURE_2_CONFIG)
    a = cluster.daemon("--metrics-port", str(port), "--metrics-ip", "127.0.0.1", *a_flags)
    b = cluster.daemon(*b_flags)
    for daemon in (a, b):
        cluster.bed.add_container(daemon.host, str(daemon.wait_subnet()), 1472)
    for daemon in (a, b):
        daemon.wait_log("subnet added")
    a.wait_log("metrics server listening")
    assert b.host.container_ip
    before = scrape(a, port)
    result = a.host.in_container("ping", "-c", str(count), "-i", "0.05", "-W", "2",
                                 b.host.container_ip, check=False)
    assert f"{count} received" in result.stdout, result.stdout
    after = scrape(a, port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)
    return a, b, moved, after


def test_metrics_count_what_crossed_the_fast_path(cluster: Cluster) -> None:
    count = 20
    # The loops' counters: with the kernel path off, they carry everything.
    a, b, moved, after = pinged_with_metrics(cluster, count, 9125, ["--fastpath-kernel", "off"],
                                             ["--fastpath-kernel", "off"])

    echo = 20 + 8 + 56  # IPv4 + ICMP headers + ping's default payload
    assert moved("pyflannel_fastpath_packets_total", direction="tx") == count
    assert moved("pyflannel_fastpath_bytes_total", direction="tx") == count * echo
    assert moved("pyflannel_fastpath_packets_total", direction="rx") == count
    assert moved("pyflannel_fastpath_bytes_total", direction="rx") == count * echo
    assert moved("pyflannel_fastpath_drops_total", direction="rx", reason="ttl") == 0
    # The batch histogram's sum counts datagrams received: the echo replies, one each, and the
    # hellos b said meanwhile (it greets a new peer again 0.5 s after it routes it).
    assert moved("pyflannel_fastpath_batch_packets_sum", direction="rx") == \
        count + moved("pyflannel_fastpath_hellos_total")
    assert after[("pyflannel_routes", ())] == 1
    assert after[("pyflannel_lease_held", ())] == 1
    assert 0 < after[("pyflannel_lease_expiry_seconds", ())] <= 24 * 3600
    # A lease that comes while the daemon runs arrives through the watch.
    cluster.put("/subnets/10.99.0.0-20", '{"PublicIP":"198.18.0.250","PublicIPv6":null}')
    a.wait_log("subnet added: 10.99.0.0/20")
    later = scrape(a, 9125)
    assert later[("pyflannel_routes", ())] == 2
    assert later[("pyflannel_watch_events_total", ())] == after[
        ("pyflannel_watch_events_total", ())] + 1


@contextlib.contextmanager
def tcp_flow(server_ns: str, server_ip: str, client_ns: str) -> Iterator[Callable[[], int]]:
    """A TCP stream from client_ns to server_ns for as long as the block runs; yields a function
    that says how many bytes have arrived so far."""
    with inside(server_ns):
        listener = socket.create_server((server_ip, 0))
    with inside(client_ns):
        client = socket.create_connection((server_ip, listener.getsockname()[1]), timeout=30)
    listener.settimeout(30)
    conn, _ = listener.accept()
    conn.settimeout(30)
    received = 0
    stop = threading.Event()

    def serve() -> None:
        nonlocal received
        while chunk := conn.recv(1 << 16):
            received += len(chunk)

    def send() -> None:
        block = os.urandom(1 << 16)
        while not stop.is_set():
            client.sendall(block)
        client.shutdown(socket.SHUT_WR)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        server, sender = pool.submit(serve), pool.submit(send)
        try:
            yield lambda: received
        finally:
            stop.set()
            sender.result()  # raises what broke the flow
            server.result()
            for sock in (client, conn, listener):
                sock.close()


def batch_histogram(metrics: Metrics, direction: str) -> tuple[list[float], float]:
    """The buckets, from le="1" to le="+Inf", and the count of the batch-size histogram."""
    name = "pyflannel_fastpath_batch_packets"
    buckets = [value(metrics, f"{name}_bucket", direction=direction, le=le)
               for le in ("1", "3", "7", "15", "31", "63", "127", "+Inf")]
    return buckets, value(metrics, f"{name}_count", direction=direction)


def two_with_metrics(cluster: Cluster, port: int, *flags: str) -> tuple[Flanneld, Flanneld]:
    """Two daemons on FIGURE_2_CONFIG with `flags`, each serving metrics on `port` of its host
    and with a container, once each routes the other's subnet."""
    cluster.config(FIGURE_2_CONFIG)
    flags = ("--metrics-port", str(port), "--metrics-ip", "127.0.0.1", *flags)
    a, b = cluster.daemon(*flags), cluster.daemon(*flags)
    for daemon in (a, b):
        cluster.bed.add_container(daemon.host, str(daemon.wait_subnet()), 1472)
    for daemon in (a, b):
        daemon.wait_log("subnet added")
        daemon.wait_log("metrics server listening")
    return a, b


def test_metrics_move_while_a_tcp_flow_crosses(cluster: Cluster) -> None:
    """Scraped twice during a TCP flow: the wake-ups and their sizes, TSO and GRO move between
    the scrapes. Then by exactly what was sent: ICMP errors and drops of packets without a
    route, and the watch's events."""
    port = 9127
    # The loops carry everything: they count it.
    a, b = two_with_metrics(cluster, port, "--fastpath-kernel", "off")
    assert b.host.container_netns and a.host.container_netns and b.host.container_ip
    with tcp_flow(b.host.container_netns, b.host.container_ip,
                  a.host.container_netns) as received:
        wait_for(lambda: received() > 0, 10, "the flow started")
        first = {daemon: scrape(daemon, port) for daemon in (a, b)}
        mark = received()
        wait_for(lambda: received() > mark + (16 << 20), 30, "16 MiB more crossed")
        second = {daemon: scrape(daemon, port) for daemon in (a, b)}

        def moved(daemon: Flanneld, name: str, **labels: str) -> float:
            return value(second[daemon], name, **labels) - value(first[daemon], name, **labels)

        # a sends the data: TCP super-packets read from its TUN, cut into datagrams.
        for name in ("pyflannel_fastpath_packets_total", "pyflannel_fastpath_bytes_total",
                     "pyflannel_fastpath_batch_packets_count",
                     "pyflannel_fastpath_batch_packets_sum"):
            assert moved(a, name, direction="tx") > 0, name
        assert moved(a, "pyflannel_fastpath_tso_superpackets_total") > 0
        # b receives them, many at once: merged by the kernel's UDP_GRO, then into TCP
        # segments for the TUN.
        for name in ("pyflannel_fastpath_packets_total", "pyflannel_fastpath_batch_packets_count",
                     "pyflannel_fastpath_batch_packets_sum"):
            assert moved(b, name, direction="rx") > 0, name
        for name in ("pyflannel_fastpath_gro_superdatagrams_total",
                     "pyflannel_fastpath_gro_datagrams_total",
                     "pyflannel_fastpath_coalesced_packets_total"):
            assert moved(b, name) > 0, name
        # Each super-datagram holds two datagrams or more.
        assert moved(b, "pyflannel_fastpath_gro_datagrams_total") >= 2 * moved(
            b, "pyflannel_fastpath_gro_superdatagrams_total")
        for metrics in (*first.values(), *second.values()):
            for direction in ("tx", "rx"):
                buckets, count = batch_histogram(metrics, direction)
                assert buckets == sorted(buckets)  # cumulative
                assert buckets[-1] == count  # le="+Inf" holds every wake-up

    # Once the flow has stopped, so that nothing else can be dropped (a full TUN queue drops
    # whatever comes): addresses of the Network that no lease holds. Each echo request is
    # dropped for want of a route and answered with ICMP net unreachable.
    pings = 3
    before = scrape(a, port)
    result = a.host.in_container("ping", "-c", str(pings), "-i", "0.2", "-W", "1",
                                 "10.200.0.1", check=False)
    assert result.stdout.count("Destination Net Unreachable") == pings, result.stdout
    after = scrape(a, port)
    for name, labels in (("pyflannel_fastpath_icmp_unreachable_total", {}),
                         ("pyflannel_fastpath_drops_total",
                          {"direction": "tx", "reason": "no_route"})):
        assert value(after, name, **labels) - value(before, name, **labels) == pings, name

    # A lease that comes now arrives through the watch: one event, one more route.
    cluster.put("/subnets/10.99.0.0-20", '{"PublicIP":"198.18.0.250","PublicIPv6":null}')
    a.wait_log("subnet added: 10.99.0.0/20")
    later = scrape(a, port)
    assert value(later, "pyflannel_watch_events_total") == value(
        after, "pyflannel_watch_events_total") + 1
    assert value(later, "pyflannel_routes") == 2


def test_healthz_page_follows_the_lease() -> None:
    held = [True]
    page = healthz_page(lambda: held[0])
    assert page() == (b"200 OK", b"text/plain; charset=utf-8", b"flanneld is running")
    held[0] = False
    assert page()[0] == b"503 Service Unavailable"


def test_ip_masq_rules_let_containers_reach_the_underlay_and_go_on_exit(
        cluster: Cluster) -> None:
    cluster.config({"Network": "10.244.0.0/16"})
    daemon = cluster.daemon("--ip-masq")
    subnet = daemon.wait_subnet()
    assert daemon.subnet_env()["FLANNEL_IPMASQ"] == "true"
    cluster.bed.add_container(daemon.host, str(subnet), 1472)
    wait_for(lambda: daemon.host.run("iptables", "-S").stdout.count("flanneld forward") == 3,
             10, "the rules were not installed")  # the forward rules come last
    nat = daemon.host.run("iptables", "-t", "nat", "-S").stdout
    assert f"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d {subnet} -m comment --comment " \
           '"flanneld masq" -j RETURN' in nat
    assert "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4" in nat
    assert "-A FLANNEL-FWD -s 10.244.0.0/16" in daemon.host.run("iptables", "-S").stdout
    # The etcd host has no route back to the overlay: only a masqueraded ping comes back.
    result = daemon.host.in_container("ping", "-c", "1", "-W", "2", cluster.etcd.host.underlay_ip,
                                      check=False)
    assert result.returncode == 0, result.stdout
    assert daemon.stop() == 0
    nat = daemon.host.run("iptables", "-t", "nat", "-S").stdout
    assert "flanneld masq" not in nat, nat + daemon.log()
    assert "flanneld forward" not in daemon.host.run("iptables", "-S").stdout


@pytest.fixture(scope="module")
def tls_etcd(shared: tuple[Testbed, EtcdServer, str]) -> Iterator[EtcdServer]:
    etcd = EtcdServer(shared[0], tls=True)
    try:
        yield etcd
    finally:
        etcd.stop()


def test_etcd_over_tls_with_client_certificates(cluster: Cluster, tls_etcd: EtcdServer) -> None:
    cluster.etcd = tls_etcd
    cluster.config({"Network": "10.244.0.0/16"})
    daemon = cluster.daemon()
    assert "--etcd-cafile" in daemon.command
    subnet = daemon.wait_subnet()
    assert cluster.leases() == {key_of(subnet, cluster.prefix): expected_value(daemon)}
    # Without a client certificate etcd refuses; pyflanneld says so and keeps trying.
    host = cluster.bed.add_host()
    assert tls_etcd.certificates is not None
    refused = Flanneld(cluster.bed, host, tls_etcd, cluster.api, "--etcd-prefix", cluster.prefix)
    refused.command = [arg for arg in refused.command
                       if arg not in tls_etcd.client_flags()[2:]]  # keep only --etcd-cafile
    cluster.daemons.append(refused.start())
    refused.wait_log("reading config", count=2, timeout=20)
    assert refused.process is not None and refused.process.poll() is None


# The ways whole super-packets go between two pyflanneld hosts on one kernel, by their flags.
WHOLE_WAYS = {"plain": [], "vxlan": ["--fastpath-plain-superpackets=false"],
              "loops": ["--fastpath-plain-superpackets=false", "--fastpath-vxlan-receive=false"]}


@pytest.mark.parametrize("way", WHOLE_WAYS)
def test_pyflanneld_hosts_send_each_other_tcp_super_packets_whole(
        cluster: Cluster, way: str) -> None:
    """With their defaults, two pyflanneld hosts on a veth underlay say hello to each other and
    then carry TCP in whole super-packets, as kernel VXLAN does: the sender's loops cut none.
    On one kernel, as here, they go plain and the receiver's kernel path takes each straight
    in; without plain ones, the receiver takes each in through its receive device (or, without
    it, its loops write each into the TUN as it came)."""
    port = 9128
    a, b = two_with_metrics(cluster, port, *WHOLE_WAYS[way])
    for daemon in (a, b):
        log = daemon.log()
        assert f"whole super-packets on, VXLAN receive {'off' if way == 'loops' else 'on'}" in log
        assert f"plain super-packets {'on' if way == 'plain' else 'off'}" in log
    hellos = 2 if way == "plain" else 1  # the hello, and the kernel hello beside it
    # b greets a as it routes it, 50 ms and 0.5 s later: the first may come before a routes b
    # and fail the source check (counted, not noted); the third comes when a knows b.
    wait_for(lambda: value(scrape(a, port), "pyflannel_kernelpath_hellos_total") >= 3 * hellos,
             10, "a heard b's hellos")
    before = {daemon: scrape(daemon, port) for daemon in (a, b)}
    assert b.host.container_netns and b.host.container_ip and a.host.container_netns
    assert tcp_transfer(b.host.container_netns, b.host.container_ip, a.host.container_netns,
                        nbytes=16 << 20) == 16 << 20
    after = {daemon: scrape(daemon, port) for daemon in (a, b)}

    def moved(daemon: Flanneld, name: str, **labels: str) -> float:
        return value(after[daemon], name, **labels) - value(before[daemon], name, **labels)
    whole = moved(a, "pyflannel_kernelpath_superpackets_total", direction="tx")
    assert whole > 0
    assert moved(a, "pyflannel_fastpath_tso_superpackets_total") == 0
    # Plain ones go by the next-hop cache; the packet that looks the next hop up again (ten
    # times a second) goes as to any peer, through the receive device.
    plain = moved(a, "pyflannel_kernelpath_plain_total", direction="tx")
    assert (plain > 0) == (way == "plain")
    assert moved(b, "pyflannel_kernelpath_plain_total", direction="rx") == plain
    assert moved(b, "pyflannel_fastpath_whole_superpackets_total") == (
        whole if way == "loops" else 0)
    for stage in ("handed", "arrived"):
        assert moved(b, "pyflannel_kernelpath_vxlan_receive_total", stage=stage) == (
            0 if way == "loops" else whole - plain)
    assert b.host.run("ip", "link", "show", RX_VXLAN_DEVICE, check=False).returncode == (
        1 if way == "loops" else 0)


def test_a_device_of_another_kind_with_the_receive_device_s_name_is_left_alone(
        cluster: Cluster) -> None:
    """pyflanneld goes on without its receive device (its loops take whole super-packets), and
    neither puts a filter on nor deletes a device that is not its own."""
    cluster.config(FIGURE_2_CONFIG)
    daemon = cluster.daemon(start=False)
    daemon.host.run("ip", "link", "add", RX_VXLAN_DEVICE, "type", "bridge")
    daemon.start()
    daemon.wait_log(f"cannot make {RX_VXLAN_DEVICE}")
    daemon.wait_log("whole super-packets on, VXLAN receive off")
    shown = json.loads(daemon.host.ip("-d", "-j", "link", "show", RX_VXLAN_DEVICE).stdout)
    assert shown[0]["linkinfo"]["info_kind"] == "bridge"
    assert daemon.host.run("tc", "filter", "show", "dev", RX_VXLAN_DEVICE, "ingress").stdout == ""


def test_kernel_path_carries_the_cluster_and_its_metrics_count_it(cluster: Cluster) -> None:
    count = 20
    a, b, moved, _ = pinged_with_metrics(cluster, count, 9126, ["--fastpath-kernel", "on"],
                                         ["--fastpath-kernel", "off"])
    assert "kernel path on" in a.log() and "kernel path off" in b.log()
    # a sends in the kernel, b answers through its loops, a receives in the kernel: the
    # routes came from the watch into both tables.
    assert moved("pyflannel_kernelpath_packets_total", direction="tx") == count
    assert moved("pyflannel_kernelpath_packets_total", direction="rx") == count
    assert moved("pyflannel_fastpath_packets_total", direction="tx") == 0
    assert moved("pyflannel_fastpath_packets_total", direction="rx") == 0
    assert b.host.container_ip and a.host.container_ip
    assert tcp_transfer(b.host.container_netns, b.host.container_ip, a.host.container_netns,
                        nbytes=4 << 20) == 4 << 20
