"""The benchmark harness cannot rot: its smallest piece, one 2-second TCP measurement over each
path, runs end to end. This checks the shape of what it writes, never the speed."""

import json
import subprocess
import sys
from pathlib import Path

from perf.paths import PATHS
from tests.conftest import require_host_network_tools


def test_one_short_measurement_over_every_path(tmp_path: Path) -> None:
    require_host_network_tools()
    result = subprocess.run(
        [sys.executable, "-m", "perf.bench", "--regimes", "unshaped", "--workloads", "tcp1",
         "--reps", "1", "--seconds", "2", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"command", "date", "machine", "reps", "seconds"} <= set(data["meta"])
    samples = data["samples"]
    assert [s["path"] for s in samples] == PATHS
    for sample in samples:
        assert "error" not in sample, sample
        assert (sample["regime"], sample["workload"], sample["rep"]) == ("unshaped", "tcp1", 1)
        assert sample["bits_per_second"] > 0 and sample["bytes"] > 0
        assert ("cpu_seconds_per_gb" in sample) == sample["path"].startswith("pyflannel")
        assert ("rss_bytes" in sample) == sample["path"].startswith("pyflannel")
    report = (tmp_path / "RESULTS.md").read_text()
    assert all(f"| {path} |" in report for path in PATHS)
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")
