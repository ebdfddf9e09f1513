"""systemd's notify protocol (sd_notify(3)): KEY=VALUE lines in one datagram to the unix socket
named by $NOTIFY_SOCKET, a path or, with a leading "@", an abstract name, with file descriptors
attached for FDSTORE=1. Without the variable (not run by systemd with Type=notify) every call
does nothing. And the other way, the descriptors systemd hands a new run (sd_listen_fds(3)):
from its fd store they come back named as they were stored."""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Mapping, MutableMapping, Sequence

LISTEN_FDS_START = 3

log = logging.getLogger("pyflanneld")


def notify(message: str, environ: Mapping[str, str] = os.environ, fds: Sequence[int] = ()
           ) -> bool:
    """Send `message` (e.g. "READY=1\\nSTATUS=..."), with `fds` attached; False when there is
    nobody to tell or the socket refuses it (logged: like sd_notify's callers, the daemon goes
    on)."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds \
                else []
            sock.sendmsg([message.encode()], rights)
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


def handed_fds(environ: MutableMapping[str, str] = os.environ) -> dict[str, int]:
    """The descriptors systemd passed this process, by name (LISTEN_FDNAMES; "unknown" when
    unnamed, the last of a name winning), when LISTEN_PID is this process; the variables are
    then removed, as sd_listen_fds(1) does, so that no child takes them for its own."""
    count, pid = environ.get("LISTEN_FDS", ""), environ.get("LISTEN_PID", "")
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    for variable in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        environ.pop(variable, None)
    if not count.isdigit() or pid != str(os.getpid()):
        return {}
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    return {(names[i] if i < len(names) and names[i] else "unknown"): fd
            for i, fd in enumerate(fds)}
