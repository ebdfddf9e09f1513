"""`make demo` keeps working: the whole demo runs and every container reaches every other."""

import glob
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import require_host_network_tools


@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw"])
def test_demo_runs_end_to_end(backend: str) -> None:
    require_host_network_tools()
    result = subprocess.run([sys.executable, "-m", "tests.demo", "--backend", backend],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(" ok ") == 6
    assert "Gbit/s" in result.stdout
    assert "every container reached every other" in result.stdout


def test_a_demo_ended_by_sigterm_deletes_what_it_made() -> None:
    """A SIGTERM (a CI timeout, `kill`) unwinds the testbed as ^C does: daemons, etcd and
    namespaces go (tests/testbed.py)."""
    require_host_network_tools()
    demo = subprocess.Popen([sys.executable, "-u", "-m", "tests.demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
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
