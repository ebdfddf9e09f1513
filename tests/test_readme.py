"""The README's copy-paste blocks under "## pyflanneld", run as written: systemd, metrics and the
CNI plugin wired into a container runtime (the wheel's block runs in test_wheel.py); and its
layout, which names the modules as they are.

Blocks that write to /etc, /opt, /var/lib or /run run in a private mount namespace where those
directories are directories of the test's own, so nothing on the machine changes."""

from __future__ import annotations

import importlib.resources
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.options import FLAGS, parse_args
from tests.cluster import FIGURE_2_CONFIG, Flanneld, put_config, stop_all
from tests.etcd import EtcdServer
from tests.flanneld import REPO
from tests.readme import readme_block
from tests.testbed import CNI_PATH, Testbed, inside, sh

VENV_BIN = os.path.dirname(sys.executable)  # where the package's commands are installed
SYSTEMD_BLOCK = "To run it under systemd"
METRICS_BLOCK = "To read them on the host of the daemon above:"
CNI_BLOCK = "To install it, with Debian's `bridge`"
# systemctl asks the running systemd (PID 1) to act: there is none here (and on a machine that
# had one, these lines would change the machine). They are left out of the run, by name.
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


def in_private_paths(root: Path, paths: list[str], *command: str,
                     netns: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run command with `paths` private to it (each is `root`/path), in `netns` if given, as
    root with the venv's commands first on PATH, from the checkout."""
    for path in paths:
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    # `ip netns exec` makes its own mount namespace (to show the netns's /sys); the private one
    # is made inside it, so the mounts stay with this command.
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run(
        [*prefix, "unshare", "--mount", "--propagation", "private",
         "bash", "-euo", "pipefail", "-c", PRIVATE_PATHS, "private-paths", *command],
        env={**os.environ, "ROOT": str(root), "PRIVATE_PATHS": " ".join(paths),
             "PATH": f"{VENV_BIN}:{os.environ['PATH']}"},
        cwd=REPO, capture_output=True, text=True, timeout=120)


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

def test_layout_names_every_control_module_and_no_other() -> None:
    with open(os.path.join(REPO, "README.md")) as f:
        layout = f.read().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    bullet = layout.split("\n- `control/`", 1)[1].split("\n- ", 1)[0]
    # Backquoted identifiers: the modules, and the two commands the bullet names.
    named = set(re.findall(r"`([a-z_0-9]+)`", bullet)) - {"pyflanneld", "flannel"}
    modules = {path.stem for path in Path(REPO, "control").glob("*.py")
               if not path.stem.startswith("__")}
    assert named == modules


# ---- systemd --------------------------------------------------------------------------------

def test_systemd_block_writes_a_unit_systemd_accepts_and_flags_pyflanneld_accepts(
        tmp_path: Path) -> None:
    require("unshare", "mount", "systemd-analyze", "systemctl")
    block = readme_block("pyflanneld", SYSTEMD_BLOCK)
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
    shipped = (importlib.resources.files("control") / "pyflanneld.service").read_text()
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
    assert f":{options.metrics_port}/metrics" in readme_block("pyflanneld", METRICS_BLOCK)

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
                              readme_block("pyflanneld", METRICS_BLOCK)).stdout.splitlines()
    assert scraped and all(line.startswith("pyflannel_") for line in scraped), scraped
    assert "pyflannel_lease_held 1.0" in scraped
    assert "pyflannel_routes 1.0" in scraped  # the other host's subnet
    assert any(line.startswith("pyflannel_fastpath_packets_total{") for line in scraped)


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
    block = readme_block("pyflanneld", CNI_BLOCK)
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
