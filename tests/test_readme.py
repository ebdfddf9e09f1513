"""The README's copy-paste blocks, run as written: systemd, metrics and the CNI plugin wired into a
container runtime (the wheel's block runs in test_wheel.py); every other command block checked
(make targets that exist, pyflanneld command lines that parse); its flag tables, which name
every flag with its default; and its layout, which names the modules as they are.

Blocks that write to /etc, /opt, /var/lib or /run run in a private mount namespace where those
directories are directories of the test's own, so nothing on the machine changes."""

from __future__ import annotations

import importlib.resources
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.host.subnetenv import read_variables
from control.service.options import FLAGS, Flag, parse_args
from tests.cluster import FIGURE_2_CONFIG, Flanneld, key_of, put_config, stop_all, wait_for
from tests.etcd import EtcdServer
from tests.fdstore import KEPT_NAMES
from tests.flanneld import REPO
from tests.readme import command_blocks, readme_block, readme_section
from tests.testbed import CNI_PATH, Testbed, inside, sh

VENV_BIN = os.path.dirname(sys.executable)  # where the package's commands are installed
# The README's blocks that tests run: (its section's heading, the text that introduces it).
WHEEL = ("On a host: the wheel", "")  # run by test_wheel.py
SYSTEMD_BLOCK = ("On a host: systemd", "To run it under systemd")
METRICS_BLOCK = ("When something is wrong",
                 "To read the metrics on the host of the systemd unit above:")
CNI_BLOCK = ("On a host: the CNI plugin and Docker", "To install it, with Debian's `bridge`")
RUN_BLOCKS = [WHEEL, SYSTEMD_BLOCK, METRICS_BLOCK, CNI_BLOCK]
FLAGS_SECTION = "Running it"
# systemctl asks the running systemd (PID 1) to act: the offline checks leave these lines out,
# by name; test_systemd_block_starts_pyflanneld_under_a_real_systemd runs them on a systemd of
# its own.
NEEDS_RUNNING_SYSTEMD = ["systemctl daemon-reload && systemctl enable --now pyflanneld"]
UNIT = "/etc/systemd/system/pyflanneld.service"
# What the runtime asks portmap for: the container's port 80 on the host's port 8080.
HOST_PORT, CONTAINER_PORT = 8080, 80
PORT_MAPPINGS = {"portMappings": [{"hostPort": HOST_PORT, "containerPort": CONTAINER_PORT,
                                   "protocol": "tcp"}]}

# Run as `bash -c PRIVATE_PATHS cmd args...` under `unshare --mount`: each directory in
# $PRIVATE_PATHS shows $ROOT/<directory> in this mount namespace only, then cmd runs there. A
# directory the machine lacks (/etc/cni on a host without CNI) is made inside an overlay of its
# nearest existing ancestor, whose upper layer is a tmpfs of this namespace; an overlay hides the
# mounts below it, so /run's keeps /run/netns, where the container namespaces are.
PRIVATE_PATHS = r"""
layers=$ROOT/.layers
mkdir -p "$layers"
mount -t tmpfs -o mode=700 pf-layers "$layers"
for path in $PRIVATE_PATHS; do
    parent=$path
    while [ ! -d "$parent" ]; do parent=$(dirname "$parent"); done
    if [ "$parent" != "$path" ]; then
        layer=$layers$parent
        mkdir -p "$layer/upper" "$layer/work" "$layer/netns"
        if [ "$parent" = /run ]; then mount --rbind /run/netns "$layer/netns"; fi
        mount -t overlay pf-overlay \
            -o "lowerdir=$parent,upperdir=$layer/upper,workdir=$layer/work" "$parent"
        if [ "$parent" = /run ]; then mount --move "$layer/netns" /run/netns; fi
        mkdir -p "$path"
    fi
    mount --bind "$ROOT$path" "$path"
done
exec "$@"
"""


def require(*tools: str, files: tuple[str, ...] = ()) -> None:
    """Core tests never skip: a missing tool fails the test and names it."""
    missing = [f"the '{tool}' command" for tool in tools if shutil.which(tool) is None]
    missing += [path for path in files if not os.path.exists(path)]
    if os.geteuid() != 0:
        missing.append("root (mount namespaces and mounts)")
    if missing:
        pytest.fail("missing: " + "; ".join(missing) + " (make install installs them)",
                    pytrace=False)


def private_paths_command(root: Path, paths: list[str], *command: str,
                          netns: str | None = None, unshare: tuple[str, ...] = ()
                          ) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run command with `paths` private to it (each is
    `root`/path), in `netns` if given and in the further namespaces `unshare` asks for, with
    the venv's commands first on PATH."""
    for path in paths:
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    # `ip netns exec` makes its own mount namespace (to show the netns's /sys); the private one
    # is made inside it, so the mounts stay with this command.
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return ([*prefix, "unshare", *unshare, "--mount", "--propagation", "private",
             "bash", "-euo", "pipefail", "-c", PRIVATE_PATHS, "private-paths", *command],
            {**os.environ, "ROOT": str(root), "PRIVATE_PATHS": " ".join(paths),
             "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})


def in_private_paths(root: Path, paths: list[str], *command: str,
                     netns: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run command with `paths` private to it, as root, from the checkout."""
    argv, env = private_paths_command(root, paths, *command, netns=netns)
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def on_the_machine(paths: list[str]) -> dict[str, bool]:
    return {path: os.path.lexists(path) for path in paths}


def environment_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile as systemd reads these plain lines: KEY=VALUE, # and ; comments."""
    variables: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            variables[key.strip()] = value.strip()
    return variables


# ---- the layout -----------------------------------------------------------------------------

def test_layout_names_every_control_room_and_module_and_no_other() -> None:
    """The Layout section's `control/` bullet has one sub-bullet per subpackage (`name/`), which
    names, in backquotes, every module in it and no other."""
    with open(os.path.join(REPO, "README.md")) as f:
        layout = f.read().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    bullet = layout.split("\n- `control/`", 1)[1].split("\n- ", 1)[0]
    rooms = re.split(r"\n  - `([a-z_]+)/`", bullet)[1:]
    # Backquoted identifiers: the modules, and the two commands the bullet names.
    named = {room: set(re.findall(r"`([a-z_0-9]+)`", text)) - {"pyflanneld", "flannel"}
             for room, text in zip(rooms[::2], rooms[1::2], strict=True)}
    control = Path(REPO, "control")
    on_disk = {room.name: {path.stem for path in room.glob("*.py")
                           if not path.stem.startswith("__")}
               for room in control.iterdir() if (room / "__init__.py").exists()}
    assert named == on_disk
    assert {path.stem for path in control.glob("*.py")} == {"__init__", "__main__"}


# ---- the other command blocks and the flag tables --------------------------------------------

def makefile_names() -> tuple[set[str], set[str]]:
    """The Makefile's targets and its variables a command line may set."""
    with open(os.path.join(REPO, "Makefile")) as f:
        text = f.read()
    targets = set(re.findall(r"^([a-z][\w-]*):", text, re.M))
    variables = set(re.findall(r"^([A-Z][A-Z_]*) *[?:]?=", text, re.M))
    return targets, variables


def test_every_command_block_is_run_or_checked() -> None:
    """A block the tests do not run is `make` lines, each a target of the Makefile with its
    variables, or `pyflanneld` lines whose flags pyflanneld takes."""
    run = {readme_block(*block) for block in RUN_BLOCKS}
    targets, variables = makefile_names()
    blocks = command_blocks()
    assert run <= {block for _, block in blocks}
    for heading, block in blocks:
        if block in run:
            continue
        commands = [shlex.split(line, comments=True) for line in block.splitlines()]
        assert all(command[0] in ("make", "pyflanneld") for command in commands), \
            f"a block under {heading!r} that no test runs or checks:\n{block}"
        for command in commands:
            if command[0] == "make":
                assignments = [word.split("=", 1)[0] for word in command[1:] if "=" in word]
                goals = [word for word in command[1:] if "=" not in word]
                assert set(goals) <= targets, (heading, command)
                assert set(assignments) <= variables, (heading, command)
            else:
                try:
                    parse_args(command[1:], environ={})
                except SystemExit as exit:
                    pytest.fail(f"pyflanneld refuses {command} in README's {heading!r}: "
                                f"status {exit.code}")


def shown_default(flag: Flag) -> str:
    """A flag's default as the README's tables show it."""
    value = flag.default
    if value is None or value == []:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):  # the etcd endpoints
        return ",".join(f"{e.scheme}://{e.host}:{e.port}" for e in value)
    return str(value)


def test_flag_tables_name_every_flag_with_its_default() -> None:
    """The tables of "Running it" name each flag of `pyflanneld --help` once, with its default
    (flags of one row share it): read from control/service/options.py, not copied by hand."""
    rows = [line.split("|")[1:-1] for line in readme_section(FLAGS_SECTION).splitlines()
            if line.startswith("| `--")]
    shown: dict[str, str] = {}
    for first, default, _ in rows:
        for name in re.findall(r"`--([a-z0-9-]+)`", first):
            assert name not in shown, f"--{name} has two rows"
            shown[name] = default.strip().strip("`")
    usage = subprocess.run([os.path.join(VENV_BIN, "pyflanneld"), "--help"],
                           capture_output=True, text=True, check=True).stdout
    offered = set(re.findall(r"^  (?:-h, )?--([a-z][a-z0-9-]*)", usage, re.M)) - {"help"}
    assert set(shown) == offered
    for flag in FLAGS:
        assert shown[flag.name] == shown_default(flag), f"--{flag.name}"


# ---- systemd --------------------------------------------------------------------------------

def test_systemd_block_writes_a_unit_systemd_accepts_and_flags_pyflanneld_accepts(
        tmp_path: Path) -> None:
    require("unshare", "mount", "systemd-analyze", "systemctl")
    block = readme_block(*SYSTEMD_BLOCK)
    lines = block.splitlines()
    for line in NEEDS_RUNNING_SYSTEMD:
        assert line in lines, f"the README's systemd block no longer has {line!r}"
    runnable = "\n".join(line for line in lines if line not in NEEDS_RUNNING_SYSTEMD)
    paths = ["/etc/systemd/system", "/etc/default"]
    written = [UNIT, "/etc/default/pyflanneld",
               "/etc/systemd/system/multi-user.target.wants/pyflanneld.service"]
    before = on_the_machine(written)
    root = tmp_path / "root"

    ran = in_private_paths(root, paths, "bash", "-euo", "pipefail", "-c", runnable)
    assert ran.returncode == 0, ran.stdout + ran.stderr

    # The unit is the one shipped in the package, started by this pyflanneld's full path.
    unit = (root / UNIT.lstrip("/")).read_text().splitlines()
    shipped = (importlib.resources.files("control.service") / "pyflanneld.service").read_text()
    assert f"ExecStart={VENV_BIN}/pyflanneld" in unit
    assert [line for line in unit if not line.startswith("ExecStart=")] == [
        line for line in shipped.splitlines() if not line.startswith("ExecStart=")]
    # It reads the file the block writes, and pyflanneld takes every variable in it.
    assert "EnvironmentFile=-/etc/default/pyflanneld" in unit
    variables = environment_file(root / "etc/default/pyflanneld")
    assert set(variables) <= {flag.env for flag in FLAGS}, variables
    options = parse_args([], environ=variables)
    assert [(e.host, e.port) for e in options.etcd_endpoints] == [("10.0.0.1", 2379)]
    assert options.iface == ["eth0"] and options.ip_masq
    # The metrics block reads the port this one sets.
    assert f":{options.metrics_port}/metrics" in readme_block(*METRICS_BLOCK)

    # systemd-analyze verify needs no running systemd: it loads the unit offline and checks
    # its directives and that ExecStart is an executable (a bare `pyflanneld` is not found
    # from a venv). It prints only problems, some with status 0, so no output is the pass.
    verify = in_private_paths(root, paths, "systemd-analyze", "verify", UNIT)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
    # What `enable` does to the file system can be done offline too (--root): the unit's
    # [Install] section links it into multi-user.target. Starting it cannot be checked here.
    enable = in_private_paths(root, paths, "systemctl", "--root=/", "enable", "pyflanneld")
    assert enable.returncode == 0, enable.stdout + enable.stderr
    wanted = root / "etc/systemd/system/multi-user.target.wants/pyflanneld.service"
    assert os.readlink(wanted) == UNIT

    assert on_the_machine(written) == before


# ---- a two-host cluster: the metrics and CNI blocks -----------------------------------------

@pytest.fixture(scope="module")
def cluster(bed_and_etcd: tuple[Testbed, EtcdServer]) -> Iterator[list[Flanneld]]:
    """Two pyflanneld hosts that know each other, with --ip-masq as flannel's manifest runs
    flanneld; the first serves metrics on the README's port."""
    bed, etcd = bed_and_etcd
    put_config(etcd, "v3", FIGURE_2_CONFIG)
    daemons: list[Flanneld] = []
    try:
        for extra in (["--metrics-port", "9125"], []):
            daemons.append(Flanneld(bed, bed.add_host(), etcd, "v3", "--ip-masq", *extra).start())
        for daemon in daemons:
            daemon.wait_subnet()
        for daemon in daemons:
            daemon.wait_log("subnet added")
        yield daemons
    finally:
        stop_all(daemons)


def test_metrics_block_shows_the_daemons_metrics(cluster: list[Flanneld]) -> None:
    require("curl", "grep")
    daemon = cluster[0]
    daemon.wait_log("metrics server listening")
    # In the host's network namespace, as on the host.
    scraped = daemon.host.run("bash", "-euo", "pipefail", "-c",
                              readme_block(*METRICS_BLOCK)).stdout.splitlines()
    assert scraped and all(line.startswith("pyflannel_") for line in scraped), scraped
    assert "pyflannel_lease_held 1.0" in scraped
    assert "pyflannel_routes 1.0" in scraped  # the other host's subnet
    assert any(line.startswith("pyflannel_fastpath_packets_total{") for line in scraped)


# A systemd of the test's own, kept from the machine: PID 1 of new PID, UTS and mount
# namespaces, in a test host's network namespace. Private to it: the README's /etc directories,
# /run (its state, and pyflanneld's subnet.env), the cgroup hierarchies, /tmp, /var/tmp and
# /var/log, each an empty tmpfs but for what the test runs from (kept_paths(): a checkout or venv
# under /tmp stays in sight); /proc/sys is read-only but for the namespace's own net/. Every
# unit of the machine's but the targets, and every generator, is masked: the service's default
# dependencies (sysinit.target) would otherwise start the machine's boot services, whose sysctl,
# tmpfiles (it empties /tmp) and sysusers change the whole machine. It boots pf.target, which
# pulls in nothing, and default.target names it too. pyflanneld's output goes to a file by a
# drop-in (there is no journal); the rest of its unit is the one the block writes.
SYSTEMD = "/lib/systemd/systemd"
MACHINE_UNITS = "/usr/lib/systemd/system"  # /lib/systemd/system too, where /lib is usr/lib
MACHINE_GENERATORS = "/usr/lib/systemd/system-generators"
MASKED_KINDS = (".service", ".socket", ".mount", ".automount", ".path", ".timer", ".swap")
TARGET = "[Unit]\nDescription=pyflannel's test: nothing but what is started by hand\n" \
         "DefaultDependencies=no\n"
BOOT_SYSTEMD = r"""
last_stage= last_dir=
for dir in $SYSTEMD_PRIVATE; do
    stage=$ROOT/.layers/private${dir//\//-}
    mkdir "$stage"
    mount --no-mtab -t tmpfs pf-private "$stage"
    while IFS= read -r keep; do
        case $keep in "$dir"/*)
            mkdir -p "$stage${keep#"$dir"}"
            mount --no-mtab --rbind "$keep" "$stage${keep#"$dir"}";;
        esac
    done <<< "$KEEP"
    case $ROOT/ in
        "$dir"/*) last_stage=$stage last_dir=$dir;;
        *) mount --no-mtab --move "$stage" "$dir";;
    esac
done
if [ -n "$last_dir" ]; then mount --no-mtab --move "$last_stage" "$last_dir"; fi
mkdir -p /run/lock
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mount --bind /proc/sys/net /proc/sys/net
mount -t tmpfs pf-cgroup /sys/fs/cgroup
mkdir /sys/fs/cgroup/unified /sys/fs/cgroup/systemd
mount -t cgroup2 pf-cgroup2 /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd pf-systemd /sys/fs/cgroup/systemd
grep -q DefaultDependencies=no /etc/systemd/system/pf.target
[ "$(readlink /etc/systemd/system/default.target)" = pf.target ]
[ "$(readlink /etc/systemd/system/systemd-tmpfiles-setup.service)" = /dev/null ]
exec env container=pyflannel-test SYSTEMD_LOG_TARGET=console "$SYSTEMD" --unit=pf.target
"""
# Each an empty tmpfs for the test's systemd, made under $ROOT with what $KEEP holds under it bound
# back in place, then moved over the machine's directory: the one that holds $ROOT last, as
# covering it hides the others' stages. --no-mtab: libmount's table in /run/mount is the
# machine's file, or gone once /run is covered.
SYSTEMD_PRIVATE = ["/run", "/tmp", "/var/tmp", "/var/log"]


def kept_paths() -> list[str]:
    """What the test's systemd must still see under its private directories: the checkout (the
    editable install's sources), the venv (pyflanneld, the unit's ExecStart) and the interpreter
    the venv runs on, where any of them lies under one of those directories (a clone in /tmp);
    each once, and none inside another."""
    paths = {spelling(path) for path in (REPO, sys.prefix, sys.base_prefix)
             for spelling in (os.path.abspath, os.path.realpath)}
    private = [path for path in paths
               if any(path.startswith(d + os.sep) for d in SYSTEMD_PRIVATE)]
    return sorted(path for path in private
                  if not any(path.startswith(other + os.sep) for other in private))


# The one the machine lacks first: the overlay that makes it would hide the others' mounts.
SYSTEMD_PATHS = ["/etc/systemd/system-generators", "/etc/systemd/system", "/etc/default"]
# What a booting systemd sets for the whole machine unless kept from it (PID 1 raises the file
# limits; systemd-sysctl applies sysctl.d), read before and after.
MACHINE_SETTINGS = ["/proc/sys/fs/file-max", "/proc/sys/fs/nr_open",
                    "/proc/sys/fs/protected_regular", "/proc/sys/fs/protected_fifos",
                    "/proc/sys/kernel/hostname"]


def machine_settings() -> dict[str, str]:
    settings = {}
    for path in MACHINE_SETTINGS:
        with open(path) as setting:
            settings[path] = setting.read()
    return settings


class OwnSystemd:
    """systemd as PID 1 of its own namespaces, in a host's network namespace."""

    LOG = "/var/log/pyflanneld.log"  # in its private /var/log: read through /proc

    def __init__(self, root: Path, paths: list[str], netns: str) -> None:
        argv, env = private_paths_command(
            root, paths, "bash", "-euo", "pipefail", "-c", BOOT_SYSTEMD, netns=netns,
            unshare=("--pid", "--fork", "--mount-proc", "--uts", "--ipc"))
        units = root / "etc/systemd/system"
        for name in os.listdir(MACHINE_UNITS):
            if name.endswith(MASKED_KINDS):
                (units / name).symlink_to("/dev/null")
        for name in os.listdir(MACHINE_GENERATORS):
            (root / "etc/systemd/system-generators" / name).symlink_to("/dev/null")
        (units / "pf.target").write_text(TARGET)
        (units / "default.target").symlink_to("pf.target")
        (units / "pyflanneld.service.d").mkdir()
        (units / "pyflanneld.service.d/test-log.conf").write_text(
            f"[Service]\nStandardOutput=append:{self.LOG}\nStandardError=inherit\n")
        self.output = root / "systemd.log"
        with open(self.output, "w") as output:
            self.process = subprocess.Popen(
                argv, env={**env, "SYSTEMD": SYSTEMD, "KEEP": "\n".join(kept_paths()),
                           "SYSTEMD_PRIVATE": " ".join(SYSTEMD_PRIVATE)},
                stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT)
        self.pid = 0  # systemd's, as this namespace sees it (unshare's one child)

    def wait_running(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            if not self.pid and children.exists():
                self.pid = int((children.read_text().split() or ["0"])[0])
            if self.pid and self.run("systemctl", "is-system-running").stdout.strip() in (
                    "running", "degraded"):
                return
            time.sleep(0.2)
        raise AssertionError(f"systemd did not come up in {timeout}s:\n"
                             f"{self.output.read_text()[-3000:]}")

    def run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A command in systemd's namespaces (mount, PID and network) with the venv's commands
        first on PATH, as a root shell on that host would run it."""
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "-n", *command],
            env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"},
            capture_output=True, text=True, timeout=timeout)

    def daemon_log(self) -> str:
        try:
            with open(f"/proc/{self.pid}/root{self.LOG}") as log:
                return log.read()
        except OSError:
            return ""

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def kill(self) -> None:
        """SIGKILL to PID 1 ends its namespace and everything in it."""
        if self.pid:
            os.kill(self.pid, 9)
        self.process.wait(30)


def test_systemd_block_starts_pyflanneld_under_a_real_systemd(
        cluster: list[Flanneld], bed_and_etcd: tuple[Testbed, EtcdServer],
        tmp_path: Path) -> None:
    """The block as written, but for the host's own values (its etcd, its interface), run on a
    host whose PID 1 is systemd: pyflanneld starts as a notify service, serves, keeps its
    data plane in the fd store across a restart, and stops."""
    require("unshare", "nsenter", "mount", "systemctl", files=(SYSTEMD,))
    bed, etcd = bed_and_etcd
    host = bed.add_host()
    block = readme_block(*SYSTEMD_BLOCK)
    placeholder = "FLANNELD_ETCD_ENDPOINTS=http://10.0.0.1:2379"
    assert placeholder in block and "FLANNELD_IFACE=eth0" in block
    block = block.replace(placeholder, f"FLANNELD_ETCD_ENDPOINTS={etcd.endpoint}")
    before = machine_settings()
    systemd = OwnSystemd(tmp_path / "root", SYSTEMD_PATHS, host.netns)
    try:
        systemd.wait_running()
        # `systemctl enable --now` returns once the start job is done: for Type=notify, once
        # pyflanneld said READY=1.
        ran = systemd.run("bash", "-euo", "pipefail", "-c", block)
        assert ran.returncode == 0, ran.stdout + ran.stderr + systemd.daemon_log()
        assert systemd.show("pyflanneld", "ActiveState") == "active", systemd.daemon_log()
        # READY=1 came after subnet.env (in the private /run) and the lease.
        env = read_variables(f"/proc/{systemd.pid}/root/run/flannel/subnet.env")
        subnet = ipaddress.ip_network(env["FLANNEL_SUBNET"], strict=False)
        assert str(subnet) in systemd.show("pyflanneld", "StatusText")
        lease = json.loads(etcd.get_prefix("/coreos.com/network/subnets/", "v3")[
            key_of(subnet, "/coreos.com/network")])
        assert lease["PublicIP"] == host.underlay_ip
        assert systemd.show("pyflanneld", "MainPID") != "0"
        # Nothing of the machine's ran: pyflanneld is the one service.
        services = systemd.run("systemctl", "list-units", "--type=service", "--state=active",
                               "--plain", "--no-legend").stdout.split("\n")
        assert [line.split()[0] for line in services if line] == ["pyflanneld.service"]

        def reaches_the_cluster() -> bool:
            """A ping from this host to each other pyflanneld's flannel0 address, through
            this host's flannel0 and theirs."""
            return all(host.run("ping", "-c", "1", "-W", "1", str(peer.wait_subnet(
                ).network_address), check=False).returncode == 0 for peer in cluster)

        wait_for(reaches_the_cluster, 5, "the cluster reached from the systemd host")
        # Everything it keeps is in the store: systemd drops what polls POLLERR (BPF maps)
        # unless it came with FDPOLL=0.
        wait_for(lambda: systemd.show("pyflanneld", "NFileDescriptorStore") == str(
            len(KEPT_NAMES)), 5, "the fd store filled")
        tun = host.ip("-j", "link", "show", "flannel0").stdout
        # A restart through the fd store: the same TUN (so the same ifindex) forwards again.
        first = systemd.show("pyflanneld", "MainPID")
        restarted = systemd.run("systemctl", "restart", "pyflanneld")
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        second = systemd.show("pyflanneld", "MainPID")
        assert second not in ("0", first)
        environ = dict(variable.split("=", 1) for variable in systemd.run(
            "cat", f"/proc/{second}/environ").stdout.split("\0") if variable)
        assert sorted(environ["LISTEN_FDNAMES"].split(":")) == KEPT_NAMES
        assert host.ip("-j", "link", "show", "flannel0").stdout == tun
        assert systemd.daemon_log().count(
            "went on with the fast path the previous run kept") == 1, systemd.daemon_log()
        wait_for(reaches_the_cluster, 5, "the cluster reached after the restart")
        # A stop empties the store: flannel0 goes; the lease stays for the next start.
        stopped = systemd.run("systemctl", "stop", "pyflanneld")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert systemd.show("pyflanneld", "ActiveState") == "inactive"
        wait_for(lambda: host.ip("link", "show", "flannel0", check=False).returncode != 0, 5,
                 "flannel0 gone after systemctl stop")
        assert key_of(subnet, "/coreos.com/network") in etcd.get_prefix(
            "/coreos.com/network/subnets/", "v3")
    finally:
        systemd.kill()
    assert machine_settings() == before


# Where a runtime and the plugins keep things: the block writes the first two; the flannel
# plugin reads /run/flannel/subnet.env and keeps its delegate configs in /var/lib/cni/flannel,
# host-local its leases in /var/lib/cni/networks, the runtime its results in /var/lib/cni/results.
RUNTIME_PATHS = ["/opt/cni/bin", "/etc/cni/net.d", "/var/lib/cni", "/run/flannel"]


def nat_rules(daemon: Flanneld) -> str:
    return daemon.host.run("iptables", "-t", "nat", "-S").stdout


def test_cni_block_wires_a_runtime_whose_containers_reach_each_other(
        cluster: list[Flanneld], bed_and_etcd: tuple[Testbed, EtcdServer]) -> None:
    plugins = [os.path.join(CNI_PATH, name) for name in ("bridge", "host-local", "portmap")]
    require("unshare", "mount", "ip", "iptables", "ping", files=tuple(plugins))
    bed = bed_and_etcd[0]
    block = readme_block(*CNI_BLOCK)
    written = ["/opt/cni/bin/flannel", "/etc/cni/net.d/10-flannel.conflist",
               "/run/flannel/subnet.env", "/var/lib/cni/networks/cbr0", "/var/lib/cni/results"]
    before = on_the_machine(written)
    roots, containers, results = [], [], []
    for i, daemon in enumerate(cluster):
        # This host's runtime directories; subnet.env is the one its pyflanneld writes.
        root = Path(bed.workdir) / f"runtime{i}"
        (root / "run/flannel").mkdir(parents=True)
        (root / "run/flannel/subnet.env").symlink_to(daemon.subnet_file)
        installed = in_private_paths(root, RUNTIME_PATHS, "bash", "-euo", "pipefail", "-c",
                                     block, netns=daemon.host.netns)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert os.readlink(root / "opt/cni/bin/flannel") == os.path.join(VENV_BIN, "flannel")
        for plugin in plugins:
            assert os.readlink(root / "opt/cni/bin" / os.path.basename(plugin)) == plugin
        conflist = json.loads((root / "etc/cni/net.d/10-flannel.conflist").read_text())
        assert [p["type"] for p in conflist["plugins"]] == ["flannel", "portmap"]

        container = f"{bed.prefix}-rt{i}"
        sh("ip", "netns", "add", container)
        bed.namespaces.append(container)  # deleted with the testbed, whatever happens here
        added = in_private_paths(root, RUNTIME_PATHS, sys.executable, "-m", "tests.cniruntime",
                                 "ADD", container, f"/run/netns/{container}", "eth0",
                                 json.dumps(PORT_MAPPINGS), netns=daemon.host.netns)
        assert added.returncode == 0, added.stdout + added.stderr
        result = json.loads(added.stdout)
        # An address of this host's subnet (from the subnet.env pyflanneld wrote), through
        # the subnet's first address.
        subnet = ipaddress.ip_network(daemon.subnet_env()["FLANNEL_SUBNET"], strict=False)
        ip = result["ips"][0]
        assert result["cniVersion"] == "1.0.0"
        assert ipaddress.ip_interface(ip["address"]).network == subnet
        assert ipaddress.ip_address(ip["gateway"]) == subnet.network_address + 1
        # portmap ran: its chains in the host's nat table, DNAT to the container's port.
        address = ip["address"].split("/")[0]
        nat = nat_rules(daemon)
        assert "-N CNI-HOSTPORT-DNAT" in nat, nat
        assert f"--to-destination {address}:{CONTAINER_PORT}" in nat, nat
        roots.append(root)
        containers.append(container)
        results.append(address)

    for i, j in ((0, 1), (1, 0)):
        ping = sh("ip", "netns", "exec", containers[i], "ping", "-c", "2", "-i", "0.2", "-W",
                  "2", results[j], check=False)
        assert "2 received" in ping.stdout, ping.stdout + ping.stderr
    # The other host reaches the first container through the first host's mapped port.
    with inside(containers[0]):
        server = socket.create_server(("0.0.0.0", CONTAINER_PORT))
    try:
        server.settimeout(5)
        with inside(cluster[1].host.netns):
            client = socket.create_connection((cluster[0].host.underlay_ip, HOST_PORT), 5)
        with client:
            client.sendall(b"through portmap")
            connection, _ = server.accept()
            with connection:
                connection.settimeout(5)
                assert connection.recv(100) == b"through portmap"
    finally:
        server.close()

    for daemon, root, container, address in zip(cluster, roots, containers, results,
                                                strict=True):
        lease = root / "var/lib/cni/networks/cbr0" / address
        delegate = root / "var/lib/cni/flannel" / container
        cached = root / "var/lib/cni/results" / f"cbr0-{container}-eth0"
        assert lease.exists() and delegate.exists() and cached.exists()
        deleted = in_private_paths(root, RUNTIME_PATHS, sys.executable, "-m",
                                   "tests.cniruntime", "DEL", container,
                                   f"/run/netns/{container}", "eth0", json.dumps(PORT_MAPPINGS),
                                   netns=daemon.host.netns)
        assert deleted.returncode == 0, deleted.stdout + deleted.stderr
        link = sh("ip", "-n", container, "link", "show", "eth0", check=False)
        assert link.returncode != 0, link.stdout  # the interface is gone
        assert not lease.exists() and not delegate.exists() and not cached.exists()
        assert f"--to-destination {address}:" not in nat_rules(daemon)

    assert on_the_machine(written) == before
