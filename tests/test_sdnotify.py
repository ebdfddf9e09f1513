"""systemd's notify protocol against real unix datagram sockets: the module alone, then a real
pyflanneld that says READY=1 only once subnet.env is written, keeps the watchdog fed and says
STOPPING=1 on SIGTERM; and the unit it prints."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from control.service.sdnotify import handed_fds, notify, watchdog_period
from tests.cluster import FIGURE_2_CONFIG, Flanneld, put_config
from tests.etcd import EtcdServer
from tests.testbed import Testbed, inside


def listener(address: str) -> socket.socket:
    """A datagram socket at NOTIFY_SOCKET's address (a path, or "@name": abstract)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.settimeout(10)
    return sock


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sends_one_datagram(tmp_path: object, abstract: bool) -> None:
    address = f"@pf-notify-{os.getpid()}" if abstract else os.path.join(str(tmp_path), "notify")
    with listener(address) as sock:
        assert notify("READY=1\nSTATUS=up", {"NOTIFY_SOCKET": address})
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_notify_passes_descriptors_for_the_fd_store(tmp_path: object) -> None:
    address = os.path.join(str(tmp_path), "notify")
    read, write = os.pipe()
    with listener(address) as sock:
        assert notify("FDSTORE=1\nFDNAME=udp-tun", {"NOTIFY_SOCKET": address}, fds=[write])
        message, fds, _, _ = socket.recv_fds(sock, 4096, 4)
    assert message == b"FDSTORE=1\nFDNAME=udp-tun" and len(fds) == 1
    os.write(fds[0], b"x")  # the same pipe, through the copy systemd would keep
    assert os.read(read, 1) == b"x"
    for fd in (read, write, *fds):
        os.close(fd)


def test_handed_fds_are_named_as_stored_and_only_for_this_process() -> None:
    mine = {"LISTEN_FDS": "3", "LISTEN_PID": str(os.getpid()),
            "LISTEN_FDNAMES": "udp-tun:udp-socket:"}
    assert handed_fds(mine) == {"udp-tun": 3, "udp-socket": 4, "unknown": 5}
    assert mine == {}  # so no child takes them for its own
    assert handed_fds({"LISTEN_FDS": "2", "LISTEN_PID": "1"}) == {}
    assert handed_fds({}) == {}


def test_notify_without_systemd_or_with_a_dead_socket_does_nothing(tmp_path: object) -> None:
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": os.path.join(str(tmp_path), "gone")})


@pytest.mark.parametrize(("environ", "period"), [
    ({}, None), ({"WATCHDOG_USEC": "0"}, None), ({"WATCHDOG_USEC": "x"}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
])
def test_watchdog_period(environ: dict[str, str], period: float | None) -> None:
    assert watchdog_period(environ) == period


def test_the_printed_unit_is_a_notify_service_that_restarts_on_failure() -> None:
    result = subprocess.run([sys.executable, "-m", "control", "--print-systemd-unit"],
                            capture_output=True, text=True)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    for line in ("Type=notify", "Restart=on-failure", "ExecStart=pyflanneld", "[Install]"):
        assert line in lines


def messages(sock: socket.socket, until: str) -> list[str]:
    """The datagrams received up to and with the first that holds `until`."""
    got = []
    while not got or until not in got[-1]:
        got.append(sock.recv(4096).decode())
    return got


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_pyflanneld_is_ready_once_it_serves_feeds_the_watchdog_and_says_it_stops(
        bed_and_etcd: tuple[Testbed, EtcdServer], abstract: bool) -> None:
    bed, etcd = bed_and_etcd
    put_config(etcd, "v3", FIGURE_2_CONFIG)
    host = bed.add_host()
    # An abstract name belongs to a network namespace: listen in the daemon's.
    address = (f"@pf-notify-{host.netns}" if abstract
               else os.path.join(bed.workdir, f"{host.netns}.notify"))
    with inside(host.netns):
        sock = listener(address)
    daemon = Flanneld(bed, host, etcd, "v3", environ={"NOTIFY_SOCKET": address,
                                                       "WATCHDOG_USEC": "200000"})
    with sock:
        daemon.start()
        try:
            ready = messages(sock, "READY=1")
            # Ready only with the lease held, the fast path up and subnet.env in place.
            assert os.path.exists(daemon.subnet_file)
            subnet = daemon.wait_subnet()
            assert f"STATUS=subnet {subnet} of 10.0.0.0/8, udp on flannel0" in ready[-1]
            started = time.monotonic()
            pings = [m for m in messages(sock, "WATCHDOG=1") + messages(sock, "WATCHDOG=1")
                     if m == "WATCHDOG=1"]
            assert len(pings) == 2 and time.monotonic() - started < 1.0
            daemon.terminate()
            assert messages(sock, "STOPPING=1")[-1] == "STOPPING=1"
        finally:
            status = daemon.stop()
    assert status == 0, daemon.log()[-3000:]
