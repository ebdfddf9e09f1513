"""`make wheel`: the sdist and a manylinux wheel. The README's commands install the wheel with pip
into a fresh venv, away from the source tree, with no Cython and no compiler (binary packages
only; python-etcd exists only as a pure-Python sdist), and that venv's pyflanneld runs a
two-host cluster."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator

import pytest

from tests.cluster import FIGURE_2_CONFIG, Flanneld, put_config, stop_all
from tests.etcd import EtcdServer
from tests.flanneld import REPO
from tests.readme import readme_block
from tests.testbed import Testbed, tcp_transfer


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bin/ of a fresh venv with the wheel installed by the README's own commands."""
    venv = tmp_path_factory.mktemp("wheel") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # As a user runs them: in the checkout, with the fresh venv's pip first on PATH.
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_block("On a host: the wheel")], cwd=REPO,
        env={**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    dist = os.path.join(REPO, "dist")
    wheels = glob.glob(os.path.join(dist, "pyflannel-*-manylinux*.whl"))
    sdists = glob.glob(os.path.join(dist, "pyflannel-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(dist)
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
    # The compiled fast path, its tc programs, the unit file; no Cython sources needed.
    assert sum(name.startswith("fastpath/") and name.endswith(".so") for name in names) == 5
    assert "fastpath/udp_tc.bpf.o" in names and "control/service/pyflanneld.service" in names
    yield str(venv / "bin")


def test_the_installed_commands_run_from_the_wheel_not_the_source(installed: str) -> None:
    python = os.path.join(installed, "python")
    where = subprocess.run([python, "-c", "import fastpath, control, Cython"],
                           capture_output=True, text=True, cwd="/")
    assert "No module named 'Cython'" in where.stderr  # nothing to compile with
    where = subprocess.run([python, "-c", "import fastpath; print(fastpath.__file__)"],
                           capture_output=True, text=True, cwd="/", check=True)
    assert where.stdout.startswith(os.path.dirname(installed))
    # Not a substring test: a clone may lie at /tmp/p, the venv at /tmp/pytest-of-root/...
    assert not where.stdout.startswith(REPO + os.sep)
    version = subprocess.run([os.path.join(installed, "pyflanneld"), "--version"],
                             capture_output=True, text=True, check=True)
    assert "pyflanneld 0.1.0" in version.stdout and "flanneld v0.20.2" in version.stdout
    cni = subprocess.run([os.path.join(installed, "flannel")], input="{}",
                         env={"CNI_COMMAND": "VERSION"}, capture_output=True, text=True)
    assert "1.0.0" in json.loads(cni.stdout)["supportedVersions"]


def test_a_two_host_cluster_runs_on_the_installed_wheel(installed: str) -> None:
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        daemons: list[Flanneld] = []
        try:
            put_config(etcd, "v3", FIGURE_2_CONFIG)
            for _ in range(2):
                daemons.append(Flanneld(bed, bed.add_host(), etcd, "v3",
                                        program=[os.path.join(installed, "pyflanneld")]).start())
            for daemon in daemons:
                bed.add_container(daemon.host, str(daemon.wait_subnet()),
                                  int(daemon.subnet_env()["FLANNEL_MTU"]))
            for daemon in daemons:
                daemon.wait_log("subnet added")
            a, b = daemons
            assert b.host.container_ip
            result = a.host.in_container("ping", "-c", "2", "-i", "0.2", "-W", "2",
                                         b.host.container_ip, check=False)
            assert "2 received" in result.stdout, result.stdout + a.log()
            assert tcp_transfer(b.host.container_netns, b.host.container_ip,
                                a.host.container_netns, nbytes=4 << 20) == 4 << 20
        finally:
            stop_all(daemons)
            etcd.stop()
