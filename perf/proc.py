"""What the benchmark reads from /proc and /sys: CPU time of the whole machine and of a process,
a process's peak resident and proportional memory, the machine's free memory, and its
description.

/proc is not per network namespace, so these work from inside any testbed namespace."""

from __future__ import annotations

import os
import platform

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
VULNERABILITIES = "/sys/devices/system/cpu/vulnerabilities"


def machine_busy_seconds() -> float:
    """CPU-seconds all cores have spent busy since boot: every state but idle and iowait.

    /proc/stat's first line: user nice system idle iowait irq softirq steal guest guest_nice;
    guest time is already counted in user, so it is left out."""
    with open("/proc/stat") as f:
        ticks = [int(field) for field in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def process_pss_bytes(pid: int) -> int:
    """The process's proportional set size: its private memory plus its share of pages it
    shares with others (the interpreter and libraries of N daemons are in memory once)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def machine_available_bytes() -> int:
    """MemAvailable: what the machine can still give without swapping."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def machine() -> dict[str, str]:
    """CPU, cores, kernel, Python and the CPU's speculative-execution mitigations: results on
    this kind of testbed depend on them (../shared/perf-facts.md)."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    found = []
    for name in sorted(os.listdir(VULNERABILITIES)) if os.path.isdir(VULNERABILITIES) else []:
        with open(os.path.join(VULNERABILITIES, name)) as f:
            state = f.read().strip()
        if state != "Not affected":
            found.append(f"{name}: {state}")
    return {"kernel": platform.release(), "cpu": cpu, "cores": str(os.cpu_count()),
            "python": platform.python_version(),
            "vulnerabilities": "; ".join(found) or "none reported"}
