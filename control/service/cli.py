"""The `pyflanneld` command: flags, logging, a kept fast path resumed, and the daemon on
uvloop."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from control.service.handover import resume_fastpath
from control.service.options import parse_args
from control.service.pinstore import PinStore
from control.service.sdnotify import handed_fds


def configure_logging(verbosity: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbosity >= 2 else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    options = parse_args(argv)
    configure_logging(options.v)
    # `kill -USR1` writes every thread's stack to the log: for a daemon that seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # A restart's data plane first: forwarding again on the descriptors the last run kept
    # before the control plane's imports and etcd, which take most of a restart.
    handed = handed_fds()
    pins = PinStore.of(options)
    if not handed and pins is not None:  # no fd store: what the last run pinned
        handed = pins.handed()
    resumed = resume_fastpath(handed, options)
    import uvloop

    from control.service.daemon import run_daemon

    status = uvloop.run(run_daemon(options, handed, resumed))
    # Everything is stopped and closed by now: the interpreter's own teardown (gRPC's and the
    # loop's threads) would only hold a restart's next run back, by 0.1 s.
    logging.shutdown()
    os._exit(status)
