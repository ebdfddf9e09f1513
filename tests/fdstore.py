"""systemd's part in a restart that keeps descriptors (FileDescriptorStoreMax): a notify socket
that keeps what a daemon sends with FDSTORE=1, by FDNAME, drops what FDSTOREREMOVE=1 names, and
hands the kept ones to the next run as systemd does (LISTEN_FDS from fd 3, LISTEN_FDNAMES,
LISTEN_PID). As systemd, it drops a descriptor that polls POLLHUP or POLLERR unless sent with
FDPOLL=0 (at once here; systemd as soon as its event loop sees it). Only the protocol:
test_readme.py runs pyflanneld under a real systemd."""

from __future__ import annotations

import array
import os
import select
import socket
import threading
from typing import Self

MAX_FDS = 16
# What a pyflanneld with its defaults keeps (the kernel path on, on tcx links here).
KEPT_NAMES = sorted(["udp-tun", "udp-socket", "udp-routes", *(
    f"udp-kernel-{name}" for name in ("ingress", "egress", "routes", "routes6", "counters",
                                      "config", "whole_peers", "vxlan_ingress"))])


def hangs_up(fd: int) -> bool:
    """Whether the descriptor polls POLLHUP or POLLERR now (a BPF array map always does)."""
    poller = select.poll()
    poller.register(fd, 0)  # POLLHUP and POLLERR are reported whatever is asked
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


class FdStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self.fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join()
        with self._lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.fds)

    def _serve(self) -> None:
        size = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
        while True:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(4096, size)
            except OSError:
                return
            if not data:
                return
            fds = array.array("i")
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            self._handle(dict(line.split("=", 1) for line in data.decode().splitlines()
                              if "=" in line), list(fds))

    def _handle(self, fields: dict[str, str], fds: list[int]) -> None:
        name = fields.get("FDNAME", "stored")
        with self._lock:
            if fields.get("FDSTOREREMOVE") == "1" and name in self.fds:
                os.close(self.fds.pop(name))
            if fields.get("FDSTORE") == "1" and fds and not (
                    fields.get("FDPOLL") != "0" and hangs_up(fds[0])):
                os.set_inheritable(fds[0], False)  # recvmsg leaves them inheritable
                if name in self.fds:
                    os.close(self.fds.pop(name))
                self.fds[name] = fds.pop(0)
        for fd in fds:  # only one per name is kept here
            os.close(fd)

    def handed(self) -> dict[str, int]:
        """What the next run gets (LoggedDaemon.start's `handed`)."""
        with self._lock:
            return dict(self.fds)
