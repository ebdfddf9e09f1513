"""A restart that keeps the udp data plane where nothing holds descriptors across it (a DaemonSet's
container, which systemd's fd store does not reach): with --fastpath-pin-dir, the TUN is
persistent (it stays, addressed and routed, with no process) and the kernel path's links, maps
and program are pinned in a bpffs, so the kernel path forwards while no pyflanneld runs, through
a crash or an OOM kill too; the route table lives in a tmpfs file beside subnet.env. The next
run takes them up as it takes the fd store's (control/service/handover.py), with a new UDP
socket on the same address: what only the loops carry waits or is lost meanwhile.

What is kept goes when this host leaves: the daemon's Pod deleted (a DaemonSet removed or
replaced, kube-flannel.yml applied over this one, a node drained), or another backend started
here. By hand: `rm -r <pin dir> <subnet file>.kept; ip link del flannel0`.

Like handover.py, this module stays light: the next run uses it before the control plane's
imports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket

from control.service.handover import KEPT_PREFIX
from control.service.options import Options
from fastpath import FastPath
from fastpath.dataplane import KERNEL_PREFIX
from fastpath.device import open_tun, set_persistent
from fastpath.udp_tc import pin, pinned

log = logging.getLogger("pyflanneld.pinstore")

STATE = "state.json"  # the TUN's name, the socket's address and port, the offload setting
ROUTES = "routes"  # the route table (fastpath/table.pyx), in the file itself
ROUTES6 = "routes6"  # the IPv6 one, with IPv6 in the network


class PinStore:
    def __init__(self, pin_dir: str, subnet_file: str) -> None:
        self.pin_dir = pin_dir
        self.state_dir = subnet_file + ".kept"

    @classmethod
    def of(cls, options: Options) -> PinStore | None:
        """The store --fastpath-pin-dir asks for, None without the flag."""
        if not options.fastpath_pin_dir:
            return None
        return cls(options.fastpath_pin_dir, options.subnet_file)

    def routes_fds(self, ipv6: bool) -> dict[str, int]:
        """The tmpfs files the fast path's route tables live in (kept as they change), named
        as FastPath's `handed` takes them: the IPv4 one, and the IPv6 one with `ipv6`."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        return {name: os.open(os.path.join(self.state_dir, name),
                              os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                for name in ((ROUTES, ROUTES6) if ipv6 else (ROUTES,))}

    def handed(self) -> dict[str, int]:
        """What the last run kept, named as the fd store hands it (handover.resume_fastpath
        takes it from there); empty when nothing is kept, or what is kept is gone (a reboot)."""
        try:
            with open(os.path.join(self.state_dir, STATE)) as f:
                state = json.load(f)
            socket.if_nametoindex(state["tun"])
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        handed: dict[str, int] = {}
        try:
            handed[KEPT_PREFIX + "tun"] = open_tun(state["tun"], bool(state["offload"]))[0]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.bind((state["address"], state["port"]))
                handed[KEPT_PREFIX + "socket"] = sock.detach()
            for name in (ROUTES, ROUTES6):
                path = os.path.join(self.state_dir, name)
                if name == ROUTES or os.path.exists(path):
                    handed[KEPT_PREFIX + name] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            for name in os.listdir(self.pin_dir):
                handed[KEPT_PREFIX + KERNEL_PREFIX + name] = pinned(
                    os.path.join(self.pin_dir, name))
        except OSError as err:
            log.warning("cannot go on with the data plane the last run kept: %s", err)
            for fd in handed.values():
                os.close(fd)
            return {}
        return handed

    def keep(self, fastpath: FastPath) -> None:
        """Keep the running fast path's data plane for the next run, from now on: a crash
        keeps it too. What an earlier run pinned and this one does not use goes (its links
        would go on forwarding)."""
        try:
            os.makedirs(self.pin_dir, mode=0o700, exist_ok=True)
            for name in os.listdir(self.pin_dir):
                os.unlink(os.path.join(self.pin_dir, name))
            kept = fastpath.kept()
            for name, fd in kept.items():
                if name.startswith(KERNEL_PREFIX):
                    pin(fd, os.path.join(self.pin_dir, name[len(KERNEL_PREFIX):]))
            set_persistent(kept["tun"], True)
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            state = {"tun": fastpath.tun_name, "address": fastpath.bind_ip,
                     "port": fastpath.port, "offload": fastpath.offload}
            temp = os.path.join(self.state_dir, "." + STATE)
            with open(temp, "w") as f:
                json.dump(state, f)
            os.rename(temp, os.path.join(self.state_dir, STATE))
        except OSError as err:
            log.error("cannot keep the data plane for the next run (%s): a restart will "
                      "stall the udp backend's flows", err)

    def forget(self, fastpath: FastPath | None) -> bool:
        """Remove what is kept: the pins (their links detach once no run holds them), the
        state, and the TUN's persistence (it goes with its last descriptor, the running fast
        path's or none). True when there was something."""
        found = os.path.isdir(self.pin_dir) or os.path.isdir(self.state_dir)
        if fastpath is not None and fastpath.running:
            set_persistent(fastpath.kept()["tun"], False)
        else:
            try:
                with open(os.path.join(self.state_dir, STATE)) as f:
                    tun = json.load(f)["tun"]
                socket.if_nametoindex(tun)
                fd = open_tun(tun, True)[0]
                set_persistent(fd, False)
                os.close(fd)
            except (OSError, ValueError, KeyError, TypeError):
                pass
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.pin_dir):
                os.unlink(os.path.join(self.pin_dir, name))
            os.rmdir(self.pin_dir)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return found
