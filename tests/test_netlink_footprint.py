"""What control/host/rtnl.py's netlink costs pyflanneld, measured as docs/netlink.md says: in a
fresh process that has imported what pyflanneld imports, the growth of VmHWM (peak resident
memory) from importing rtnl and running every request it has, and the modules that brings in.
rtnl uses pyroute2's rtnetlink message classes without pyroute2's package __init__, which
imports the whole library; the last test measures that import, which is why.

Each process runs in a test host's namespace: the vxlan link, routes, neighbours and fdb entries
it makes are permanent entries in that namespace, and nothing is sent anywhere. Python compiles
into a pycache of the test's own, warmed by a first process, so that compiling the sources (which
an installed wheel does not) is not what is measured.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

from control.host.rtnl import PYROUTE2_MESSAGE_MODULES
from tests.testbed import Host, Testbed

ROOT = Path(__file__).resolve().parent.parent
# Measured on 2026-12-07 (Python 3.11.7, pyroute2 0.9.7, docs/netlink.md): rtnl imported and
# used +2.25 MiB; `from pyroute2 import IPRoute` +10.5 MiB.
RTNL_LIMIT_MIB = 3.0
IPROUTE_AT_LEAST_MIB = 5.0
RUNS = 3  # fresh processes, the median taken
# The only modules that importing and using rtnl may add to pyflanneld's: pyroute2's message
# modules and what they import (pyroute2.config imports multiprocessing's package, +0.14 MiB,
# and multiprocessing makes __mp_main__ an alias of __main__; nothing is started).
PYROUTE2_PACKAGES = ("pyroute2.netlink.rtnl.ifinfmsg.plugins",)
ALLOWED = {"control", "control.host", "control.host.rtnl",
           "pyroute2", "pyroute2.common", "pyroute2.config", "pyroute2.netlink",
           "pyroute2.netlink.exceptions", "pyroute2.netlink.rtnl", "pyroute2.netlink.rtnl.iw_event",
           *PYROUTE2_MESSAGE_MODULES, *PYROUTE2_PACKAGES,
           "multiprocessing", "multiprocessing.context", "multiprocessing.process",
           "multiprocessing.reduction", "__mp_main__"}
# What pyroute2's __init__ brings and rtnl must not: NDB's sqlite3, unittest.mock, IPRoute and
# the asyncio sockets, IPDB, the namespace helpers.
HEAVY = ("sqlite3", "unittest", "pyroute2.iproute", "pyroute2.ndb", "pyroute2.ipdb",
         "pyroute2.netns", "pyroute2.nslink", "pyroute2.netlink.nlsocket")

# pyflanneld's own imports (the etcd v3 client, uvloop, ssl, grpc...), listed by a process of
# their own: everything but control's modules and what rtnl itself brings.
LIST_DAEMON_MODULES = """
import json, sys
import uvloop, control.service.cli, control.service.daemon, control.subnet.etcdv3
own = ("control", "pyroute2", "multiprocessing", "__mp_main__", "__main__")
print(json.dumps([m for m in sys.modules if m.split(".")[0] not in own]))
"""

MEASURE = r"""
import gc, importlib, ipaddress, json, sys

def status():
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = int(value.split()[0]) / 1024
    return found

def exercise(rtnl, underlay, local):
    r = rtnl.RtNetlink()
    eth0 = next(link.index for link in r.links() if link.name == underlay)
    r.addresses(); r.default_route_interfaces()
    for _ in range(3):
        vx = r.add_vxlan("flannel.1", 1, ipaddress.IPv4Address(local), eth0, 8472, False, False,
                         1450)
        r.set_up(vx, 1450)
        r.set_only_address(vx, ipaddress.IPv4Address("10.244.1.0"), 32)
        assert r.link_kind(vx) == "vxlan" and r.vxlan("flannel.1").index == vx
        remotes = [(ipaddress.IPv4Network(f"10.244.{n}.0/24"), f"1a:fd:f4:c0:3d:{n:02x}",
                    ipaddress.IPv4Address(f"198.18.0.{n + 100}")) for n in range(2, 40)]
        for subnet, mac, host in remotes:
            r.replace_neigh(vx, subnet.network_address, mac)
            r.replace_fdb(vx, mac, host)
            r.replace_route(subnet, vx, subnet.network_address, onlink=True)
        assert len(r.routes(vx)) == len(r.neighbours(vx)) == len(r.fdb(vx)) == len(remotes)
        r.links()
        for subnet, mac, host in remotes:
            r.delete_route(subnet, vx, subnet.network_address)
            r.delete_neigh(vx, subnet.network_address)
            r.delete_fdb(vx, mac, host)
        r.delete_link(vx)
    r.close()

listing, choice, underlay, local = sys.argv[1:]
for name in json.loads(listing):
    try:
        importlib.import_module(name)
    except Exception:
        pass  # a private module that only its package can import
gc.collect()
before, modules = status(), set(sys.modules)
if choice == "rtnl":
    import control.host.rtnl
    exercise(control.host.rtnl, underlay, local)
else:
    from pyroute2 import IPRoute
    IPRoute().close()
gc.collect()
after = status()
print(json.dumps({"hwm": after["VmHWM"] - before["VmHWM"], "rss": after["VmRSS"] - before["VmRSS"],
                  "new": sorted(set(sys.modules) - modules)}))
"""


def measure(host: Host, pycache: Path, choice: str) -> tuple[float, float, set[str]]:
    """(VmHWM growth, VmRSS growth in MiB, the medians of RUNS fresh processes; the modules
    added) of `choice`: "rtnl" or "iproute"."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    listing = subprocess.run([sys.executable, "-c", LIST_DAEMON_MODULES], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout
    command = ["ip", "netns", "exec", host.netns, sys.executable, "-c", MEASURE, listing, choice,
               "eth0", host.underlay_ip]
    results = []
    for _ in range(1 + RUNS):  # the first one fills the pycache
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(json.loads(done.stdout))
    results = results[1:]
    new = set(results[0]["new"])
    assert all(set(r["new"]) == new for r in results)
    return (statistics.median(r["hwm"] for r in results),
            statistics.median(r["rss"] for r in results), new)


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)}


def test_rtnl_brings_only_pyroute2s_message_classes_and_costs_little(
        testbed: Testbed, tmp_path: Path) -> None:
    hwm, rss, new = measure(testbed.add_host(), tmp_path / "pycache", "rtnl")
    loaded = {m for m in new if not m.startswith(PYROUTE2_PACKAGES)}
    assert loaded <= ALLOWED, sorted(loaded - ALLOWED)
    assert set(PYROUTE2_MESSAGE_MODULES) <= new  # pyroute2's, not modules of the daemon's own
    assert heavy(new) == set()
    assert hwm < RTNL_LIMIT_MIB, f"rtnl imported and used: VmHWM +{hwm:.2f} MiB (RSS +{rss:.2f})"


def test_pyroute2s_package_import_is_what_rtnl_avoids(testbed: Testbed, tmp_path: Path) -> None:
    """If pyroute2 ever imports lightly (svinota/pyroute2#1404), this fails: rtnl could then
    import its message classes the public way."""
    hwm, _, new = measure(testbed.add_host(), tmp_path / "pycache", "iproute")
    assert {"sqlite3", "unittest.mock", "pyroute2.ndb", "pyroute2.ipdb"} <= new
    assert hwm >= IPROUTE_AT_LEAST_MIB, f"from pyroute2 import IPRoute: VmHWM +{hwm:.2f} MiB"


def test_pyroute2_is_the_pinned_version() -> None:
    """rtnl reaches pyroute2's modules by their place in the package, which is no API: the
    version installed is the one pyproject.toml pins (and these tests passed with)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    pins = [d for d in dependencies if d.startswith("pyroute2")]
    assert len(pins) == 1 and pins[0].startswith("pyroute2=="), pins
    assert importlib.metadata.version("pyroute2") == pins[0].removeprefix("pyroute2==")

