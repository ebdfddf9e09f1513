"""pyflanneld's memory, on both etcd APIs and in Kubernetes: only the client of the subnet
manager in use is loaded, and an idle daemon stays well inside flannel's `memory: 50Mi` limit.

The peak under load is `make perf`'s to measure, not this test's: here the daemon only leases,
routes one peer and sits idle.
"""

from __future__ import annotations

import json
import os

import pytest

from control.service.options import KUBE_ANNOTATION_PREFIX
from tests.cluster import FIGURE_2_CONFIG, Flanneld
from tests.etcd import EtcdServer
from tests.kubeapi import KubeApi
from tests.test_kube import KubePyflanneld
from tests.testbed import Testbed

# Idle VmHWM (peak since start) measured on 2026-12-07 at 46.4 MiB on v3, 35.2 MiB on v2 and
# 37.5 MiB in kube mode (httpx; 45.0 and 33.3 on etcd before rtnl took pyroute2's message
# classes, docs/netlink.md); pyroute2's
# whole package (+10.5 MiB) or the other API's client (+7-13 MiB) fails it, while a build's or
# a machine's drift of a megabyte does not (the peak under load is make perf's to hold at 50).
IDLE_HWM_LIMIT_MIB = {"v3": 48, "v2": 40, "kube": 42}
CLIENT_MODULES = {"v3": {"aetcd", "grpc"}, "v2": {"etcd", "urllib3"}}
KUBE_MODULES = {"httpx", "yaml", "control.subnet.kube"}  # --kube-subnet-mgr's alone
# control/host/rtnl.py takes pyroute2's rtnetlink messages only, never what pyroute2's package
# __init__ would bring (tests/test_netlink_footprint.py has the whole list).
NEVER_IMPORTED = {"sqlite3", "unittest", "pyroute2.iproute", "pyroute2.ndb", "pyroute2.ipdb",
                  "pyroute2.netns", "pyroute2.nslink",
                  *KUBE_MODULES}

GRPC_LIBRARY = "cygrpc"  # gRPC's shared object, mapped once grpc is imported

# pyflanneld's own entry point, writing the names of every module it imported when it exits
# (it leaves through os._exit, past atexit).
MAIN_LISTING_MODULES = """
import os, sys
from control.service.cli import main
listing = sys.argv.pop(1)
leave = os._exit
def listing_then_exit(status):
    with open(listing, "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
    leave(status)
os._exit = listing_then_exit
main(sys.argv[1:])
"""


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def run_listing(daemon: Flanneld, listing: str, routed: str) -> tuple[set[str], float, bool]:
    """Run the daemon until it routes `routed`, stop it: (the modules it imported, its VmHWM in
    MiB, whether gRPC's library was mapped)."""
    daemon.start()
    try:
        daemon.wait_log(f"subnet added: {routed}", timeout=30)
        assert daemon.process is not None
        pid = daemon.process.pid  # `ip netns exec` execs: this is pyflanneld itself
        with open(f"/proc/{pid}/maps") as f:
            grpc_mapped = GRPC_LIBRARY in f.read()
        hwm_mib = status_kib(pid, "VmHWM") / 1024
    finally:
        status = daemon.stop()
    assert status == 0, daemon.log()[-3000:]
    with open(listing) as f:
        return set(f.read().split()), hwm_mib, grpc_mapped


def assert_none_of(names: set[str], forbidden: set[str]) -> None:
    assert {name for name in names
            if any(name == n or name.startswith(n + ".") for n in forbidden)} == set()


@pytest.mark.parametrize("api", ["v3", "v2"])
def test_only_the_client_of_the_api_in_use_is_loaded_and_idle_rss_is_small(
        bed_and_etcd: tuple[Testbed, EtcdServer], api: str) -> None:
    bed, etcd = bed_and_etcd
    prefix = f"/footprint-{api}/network"
    etcd.put(f"{prefix}/config", json.dumps(FIGURE_2_CONFIG), api)
    # A peer's lease, so that the daemon also routes: nothing is ever sent to it.
    etcd.put(f"{prefix}/subnets/10.99.0.0-20", '{"PublicIP":"198.18.0.250","PublicIPv6":null}',
             api)
    listing = os.path.join(bed.workdir, f"modules-{api}.txt")
    daemon = Flanneld(bed, bed.add_host(), etcd, api, "--etcd-prefix", prefix,
                      python_args=("-c", MAIN_LISTING_MODULES, listing))
    names, hwm_mib, grpc_mapped = run_listing(daemon, listing, "10.99.0.0/20")
    assert grpc_mapped == (api == "v3")
    modules = {name.split(".")[0] for name in names}
    other = "v2" if api == "v3" else "v3"
    assert CLIENT_MODULES[api] <= modules
    assert modules & CLIENT_MODULES[other] == set()
    assert_none_of(names, NEVER_IMPORTED)
    print(f"idle on etcd {api}: VmHWM {hwm_mib:.1f} MiB")
    assert hwm_mib < IDLE_HWM_LIMIT_MIB[api], f"idle on etcd {api}: VmHWM {hwm_mib:.1f} MiB"


def test_kube_mode_loads_no_etcd_client_and_idles_small(
        kube: tuple[Testbed, EtcdServer, KubeApi]) -> None:
    """--kube-subnet-mgr imports httpx and neither etcd client: the daemon of flannel's
    DaemonSet idles well below its 50Mi."""
    bed, _, api = kube
    host = bed.add_host()
    api.register_node("footprint", host.underlay_ip)
    api.wait_pod_cidr("footprint")
    api.request("POST", "/api/v1/nodes", {
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "footprint-peer", "annotations": {
            KUBE_ANNOTATION_PREFIX + "/kube-subnet-manager": "true",
            KUBE_ANNOTATION_PREFIX + "/public-ip": "198.18.0.250",
            KUBE_ANNOTATION_PREFIX + "/backend-type": "",
            KUBE_ANNOTATION_PREFIX + "/backend-data": "null"}},
        "spec": {"podCIDR": "10.244.250.0/24", "podCIDRs": ["10.244.250.0/24"]}})
    listing = os.path.join(bed.workdir, "modules-kube.txt")
    daemon = KubePyflanneld(bed, host, api, "footprint", {"Type": "udp"},
                            python_args=("-c", MAIN_LISTING_MODULES, listing))
    try:
        names, hwm_mib, grpc_mapped = run_listing(daemon, listing, "10.244.250.0/24")
    finally:
        api.delete_node("footprint-peer")
    modules = {name.split(".")[0] for name in names}
    assert "httpx" in modules and not grpc_mapped
    assert modules & (CLIENT_MODULES["v3"] | CLIENT_MODULES["v2"]) == set()
    assert_none_of(names, NEVER_IMPORTED - KUBE_MODULES)
    print(f"idle in kube mode: VmHWM {hwm_mib:.1f} MiB")
    assert hwm_mib < IDLE_HWM_LIMIT_MIB["kube"], f"idle in kube mode: VmHWM {hwm_mib:.1f} MiB"
