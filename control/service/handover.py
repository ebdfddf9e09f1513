"""A restart that loses nothing, through systemd's fd store (FileDescriptorStoreMax in the unit),
or without systemd in place (SIGHUP: the process execs itself, handing the next image the same):
the udp backend hands the next run its TUN, its socket, its route table (a memfd) and its kernel
path's links and maps, and the next run starts forwarding on them before anything else. The
kernel path forwards all along; packets for the loops wait in the TUN's and the socket's queues
meanwhile, and the routes are the last run's until etcd is read.

This module stays light (no asyncio, no etcd client): the new process resumes the fast path
before the control plane's imports, which are most of a restart's stall.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
import time
from typing import NoReturn

from control.service.options import Options
from control.service.sdnotify import LISTEN_FDS_START, notify
from fastpath import FastPath
from fastpath.dataplane import KEPT_ANY
from fastpath.device import tun_identity

log = logging.getLogger("pyflanneld.handover")

# The udp backend's descriptors in the store are named udp-<name of FastPath.kept()>.
KEPT_PREFIX = "udp-"


def resume_fastpath(handed: dict[str, int], options: Options) -> FastPath | None:
    """The fast path running again on the previous run's descriptors, taken out of `handed`;
    None when they are not there, or do not read back (they are left in `handed` then), or
    it failed to start (they are closed then, and taken out of the store)."""
    ours = {name[len(KEPT_PREFIX):]: fd for name, fd in handed.items()
            if name.startswith(KEPT_PREFIX)}
    given = set(ours)
    try:
        tun = tun_identity(ours["tun"])[0] if "tun" in ours else None
    except OSError:
        tun = None
    try:
        fastpath = FastPath.resume(ours, **options.fastpath_levers)
    except (OSError, ValueError) as err:
        log.warning("cannot go on with the fast path the previous run kept: %s", err)
        fastpath = None
    if fastpath is not None:
        log.info("resumed the fast path the previous run kept: %s <-> %s:%d, %d routes",
                 fastpath.tun_name, fastpath.bind_ip, fastpath.port,
                 len(fastpath.table.routes()))
    taken = [KEPT_PREFIX + name for name in given - set(ours)]
    for name in taken:  # FastPath.resume took them: running, or closed when it failed
        del handed[name]
    if fastpath is None and taken:
        forget(taken, [tun] if tun else [])
    return fastpath


def kept_names(kept: dict[str, int]) -> dict[str, int]:
    """FastPath.kept() as named in the store."""
    return {KEPT_PREFIX + name: fd for name, fd in kept.items()}


def keep_for_next_run(kept: dict[str, int]) -> None:
    """Have the store hold exactly what the backend keeps for the next run. Each name's earlier
    entry goes first: the store would keep both, the same descriptor or not. An entry this run
    does not keep goes too: a kernel path's link in it would go on forwarding. FDPOLL=0: systemd
    would otherwise drop an entry that polls POLLERR, as every BPF map but a ring buffer does."""
    for name, fd in kept.items():
        notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
        notify(f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0", fds=[fd])
    for name in {KEPT_PREFIX + name for name in KEPT_ANY} - kept.keys():
        notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def release(handed: dict[str, int]) -> None:
    """Close what an earlier run kept and this one has no use for, and take it out of the store,
    waiting (a moment at most) until a TUN among them is gone: a new TUN must get its name."""
    tuns = []
    for name, fd in handed.items():
        log.info("dropping %s, handed over by the previous run and of no use now", name)
        try:
            tuns.append(tun_identity(fd)[0])
        except OSError:  # not a TUN
            pass
        os.close(fd)
    forget(list(handed), tuns)
    handed.clear()


def release_resumed(fastpath: FastPath) -> None:
    """End a resumed fast path this run cannot use, and the store's copies of its descriptors."""
    names = list(kept_names(fastpath.kept())) if fastpath.running else []
    fastpath.stop()
    forget(names, [fastpath.tun_name])


def forget(names: list[str], tuns: list[str], timeout: float = 1.0) -> None:
    """Take `names` out of the store, then wait (until `timeout` at most) for the TUN devices
    among them to be gone once the store closed its copy: a new TUN must get the old name."""
    for name in names:
        notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
    deadline = time.monotonic() + timeout
    for device in tuns:
        while time.monotonic() < deadline:
            try:
                socket.if_nametoindex(device)
            except OSError:
                break
            time.sleep(0.01)


def restart_in_place(kept: dict[str, int]) -> NoReturn:
    """Exec this command again in this process, handing the new image `kept` as systemd hands
    its fd store's (LISTEN_FDS from fd 3, LISTEN_FDNAMES, LISTEN_PID): the PID stays, so a
    supervisor sees no restart, and the new image resumes as after one under systemd."""
    log.info("executing %s again with %s", " ".join(sys.orig_argv), ", ".join(kept) or "nothing")
    logging.shutdown()
    # Out of the way first: the targets 3, 4... may hold any of them.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, LISTEN_FDS_START + len(kept))
            for fd in kept.values()]
    for target, fd in enumerate(high, start=LISTEN_FDS_START):
        os.dup2(fd, target)  # inheritable, unlike every other descriptor of this process
    os.environ.update(LISTEN_FDS=str(len(kept)), LISTEN_PID=str(os.getpid()),
                      LISTEN_FDNAMES=":".join(kept))
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError as err:
        sys.stderr.write(f"pyflanneld: cannot execute {sys.executable} again: {err}\n")
        os._exit(1)
