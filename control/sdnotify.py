"""systemd's notify protocol (sd_notify(3)): KEY=VALUE lines in one datagram to the unix socket
named by $NOTIFY_SOCKET, a path or, with a leading "@", an abstract name. Without the variable
(not run by systemd with Type=notify) every call does nothing."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("pyflanneld")


def notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send `message` (e.g. "READY=1\\nSTATUS=..."); False when there is nobody to tell or the
    socket refuses it (logged: like sd_notify's callers, the daemon goes on)."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as err:
        log.warning("cannot notify systemd at %s: %s", environ["NOTIFY_SOCKET"], err)
        return False
    return True


def watchdog_period(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings when systemd's WatchdogSec applies to this process
    (half the period it allows, as sd_watchdog_enabled(3) advises); None otherwise."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
