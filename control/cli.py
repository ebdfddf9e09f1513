"""The `pyflanneld` command: flags, logging, and the daemon on uvloop."""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
from collections.abc import Sequence

import uvloop

from control.daemon import run_daemon
from control.options import parse_args


def configure_logging(verbosity: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbosity >= 2 else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    configure_logging(options.v)
    # `kill -USR1` writes every thread's stack to the log: for a daemon that seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    return uvloop.run(run_daemon(options))
