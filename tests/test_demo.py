"""`make demo` keeps working: the whole demo runs and every container reaches every other."""

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
