"""`make demo` keeps working: the whole demo runs and every container reaches every other, with
the subnets in etcd or in Kubernetes (SUBNET_MGR=kube), on each backend."""

import glob
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import require_host_network_tools
from tests.flanneld import REPO
from tests.kubeapi import KUBE_APISERVER, KUBE_CONTROLLER_MANAGER, REFERENCE

needs_kube = pytest.mark.skipif(
    not all(os.access(binary, os.X_OK) for binary in (KUBE_APISERVER, KUBE_CONTROLLER_MANAGER)),
    reason=f"no reference Kubernetes builds at {REFERENCE}")


@pytest.mark.parametrize(("subnet_mgr", "backend"), [
    ("etcd", "udp"), ("etcd", "vxlan"), ("etcd", "host-gw"),
    pytest.param("kube", "udp", marks=needs_kube), pytest.param("kube", "vxlan", marks=needs_kube),
    pytest.param("kube", "host-gw", marks=needs_kube)])
def test_demo_runs_end_to_end(subnet_mgr: str, backend: str) -> None:
    require_host_network_tools()
    result = subprocess.run([sys.executable, "-m", "tests.demo", "--backend", backend,
                             "--subnet-mgr", subnet_mgr],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(" ok ") == 6
    assert "Gbit/s" in result.stdout
    assert "every container reached every other" in result.stdout
    if subnet_mgr == "kube":
        # The leases are the Nodes': each its podCIDR, flannel's annotations and the condition.
        nodes = re.findall(r"^    node\d (10\.244\.\d+\.0/24) NetworkUnavailable=False "
                           r'\{.*"kube-subnet-manager": "true".*\}$', result.stdout, re.M)
        assert len(set(nodes)) == 3, result.stdout[-3000:]
        assert f"through pyflannel's {backend} backend" in result.stdout
        assert "FLANNEL_NETWORK=10.244.0.0/16" in result.stdout


@pytest.mark.parametrize(("backend", "ipv6"), [
    (None, "dual"), ("vxlan", "dual"), ("host-gw", "dual"), (None, "only"), ("host-gw", "only"),
    ("udp", "only")])
def test_an_ipv6_demo_runs_end_to_end(backend: str | None, ipv6: str) -> None:
    """`make demo IPV6=dual` (udp) and `IPV6=only` (vxlan; udp there sends over IPv6): every
    container pings every other over each family the network has."""
    require_host_network_tools()
    chosen = ["--backend", backend] if backend else []
    result = subprocess.run([sys.executable, "-m", "tests.demo", *chosen, "--ipv6", ipv6],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pings = re.findall(r"^ +(\S+) -> (\S+) +ok ", result.stdout, re.M)
    assert len(pings) == (12 if ipv6 == "dual" else 6), result.stdout[-3000:]
    assert sum(":" in destination for _, destination in pings) == 6
    assert ("FLANNEL_SUBNET=" in result.stdout) == (ipv6 == "dual")
    assert "FLANNEL_IPV6_SUBNET=fd00:10:" in result.stdout and "Gbit/s" in result.stdout
    shown = backend or ("udp" if ipv6 == "dual" else "vxlan")
    assert f"through pyflannel's {shown} backend" in result.stdout


def test_the_kube_demo_fails_saying_what_is_missing_without_the_reference() -> None:
    """Where ../shared/reference/ is absent (a user's machine), SUBNET_MGR=kube is an error
    that names what is missing, before anything is made; never a skip or a silent etcd demo."""
    run = ("import sys; from tests import kubeapi; kubeapi.REFERENCE = '/nonexistent/reference'; "
           "from tests import demo; sys.argv = ['demo', '--subnet-mgr', 'kube']; "
           "sys.exit(demo.main())")
    result = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""  # no testbed, no etcd
    assert "/nonexistent/reference/kube-apiserver-v1.19.0" in result.stderr
    assert "/nonexistent/reference/kube-controller-manager-v1.19.0" in result.stderr
    assert "SUBNET_MGR=kube" in result.stderr and "skip" not in result.stderr.lower()


@pytest.mark.parametrize("subnet_mgr", ["etcd", pytest.param("kube", marks=needs_kube)])
def test_a_demo_ended_by_sigterm_deletes_what_it_made(subnet_mgr: str) -> None:
    """A SIGTERM (a CI timeout, `kill`) unwinds the testbed as ^C does: daemons, etcd (and
    the API server and controller manager) and namespaces go (tests/testbed.py)."""
    require_host_network_tools()
    demo = subprocess.Popen([sys.executable, "-u", "-m", "tests.demo", "--subnet-mgr",
                             subnet_mgr], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        assert demo.stdout is not None
        lines = []
        for line in demo.stdout:  # until every daemon runs and a container has its address
            lines.append(line)
            if "leased" in line:
                break
        prefix = re.search(r"namespace (\S+)-ul\b", "".join(lines))
        assert prefix, "".join(lines)
        demo.send_signal(signal.SIGTERM)
        rest = demo.communicate(timeout=60)[0]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert "tearing down" in rest
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix[1] not in namespaces
    assert not glob.glob(f"/tmp/{prefix[1]}-*")
    processes = subprocess.run(["pgrep", "-af", prefix[1]], capture_output=True, text=True)
    assert processes.stdout == ""
