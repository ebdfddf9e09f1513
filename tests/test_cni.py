"""The `flannel` CNI plugin (control/programs/cni.py): flannel's plugin v1.1.0 run beside ours as
the oracle for the delegate config and every error; the real `bridge` and `host-local` plugins
for containers on a pyflanneld cluster."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import FIGURE_2_CONFIG, Cluster, stop_all
from tests.etcd import EtcdServer
from tests.flanneld import REFERENCE_CNI
from tests.testbed import CNI_PATH, FLANNEL_CNI, Testbed

PLUGIN = FLANNEL_CNI
needs_reference = pytest.mark.skipif(not os.path.exists(REFERENCE_CNI),
                                     reason=f"no reference CNI plugin at {REFERENCE_CNI}")

SUBNET_ENV = ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1472\n"
              "FLANNEL_IPMASQ=true\n")
# A delegate that records the config it was given and answers a minimal result.
RECORDER = """#!/bin/sh
cat > "$RECORD_TO.$CNI_COMMAND"
echo '{"cniVersion":"0.4.0","ips":[]}'
"""


def call(plugin: str, command: str, conf: dict | str, env: dict[str, str] | None = None,
         netns: str | None = None) -> subprocess.CompletedProcess[bytes]:
    environ = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": "ctr1",
               "CNI_NETNS": f"/run/netns/{netns or 'none'}", "CNI_IFNAME": "eth0",
               "CNI_PATH": CNI_PATH, **(env or {})}
    environ = {k: v for k, v in environ.items() if v is not None}
    stdin = conf if isinstance(conf, str) else json.dumps(conf)
    return subprocess.run([plugin], input=stdin.encode(), capture_output=True, env=environ,
                          timeout=30)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "subnet.env").write_text(SUBNET_ENV)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = bin_dir / "recorder"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    return tmp_path


def conf_for(files: Path, plugin: str, **extra: object) -> dict:
    return {"cniVersion": "0.4.0", "name": "cbr", "type": "flannel",
            "subnetFile": str(files / "subnet.env"),
            "dataDir": str(files / f"data-{os.path.basename(plugin)}"), **extra}


DELEGATE_CASES = {
    "defaults": {},
    "delegate keys win": {"delegate": {"bridge": "mynet0", "mtu": 1400, "ipMasq": True,
                                       "isGateway": False}},
    "top-level ipam and runtimeConfig": {
        "ipam": {"dataDir": "/tmp/x", "routes": [{"dst": "1.2.3.0/24"}]},
        "runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 8080}]}},
    "CNI 1.0.0": {"cniVersion": "1.0.0"},
    "CNI 0.3.1": {"cniVersion": "0.3.1"},
    "no cniVersion": {"cniVersion": None},
}


@needs_reference
@pytest.mark.parametrize("extra", DELEGATE_CASES.values(), ids=DELEGATE_CASES.keys())
def test_delegate_config_and_saved_file_are_flannels_byte_for_byte(files: Path,
                                                                   extra: dict) -> None:
    got = {}
    for plugin in (PLUGIN, REFERENCE_CNI):
        conf = {k: v for k, v in conf_for(files, plugin, **extra).items() if v is not None}
        conf.setdefault("delegate", {})["type"] = "recorder"
        record = files / os.path.basename(plugin)
        result = call(plugin, "ADD", conf, {"CNI_PATH": str(files / "bin"),
                                            "RECORD_TO": str(record)})
        assert result.returncode == 0, result.stdout + result.stderr
        saved = (files / f"data-{os.path.basename(plugin)}" / "ctr1").read_bytes()
        got[plugin] = (Path(f"{record}.ADD").read_bytes(), saved, json.loads(result.stdout))
        # DEL hands the delegate the saved config and forgets it.
        result = call(plugin, "DEL", conf, {"CNI_PATH": str(files / "bin"),
                                            "RECORD_TO": str(record)})
        assert result.returncode == 0, result.stdout + result.stderr
        assert Path(f"{record}.DEL").read_bytes() == saved
        assert not (files / f"data-{os.path.basename(plugin)}" / "ctr1").exists()
    ours, theirs = got[PLUGIN], got[REFERENCE_CNI]
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1] == ours[0]
    # The delegate's result is passed on; flannel's re-encodes it, which drops and adds empty
    # fields only.
    assert non_empty(ours[2]) == non_empty(theirs[2])


def non_empty(result: dict) -> dict:
    return {key: value for key, value in result.items() if value not in ({}, [], None)}


def bad_env(files: Path, text: str) -> str:
    path = files / "bad.env"
    path.write_text(text)
    return str(path)


ERROR_CASES = {
    "no subnet.env": lambda f: ({"subnetFile": str(f / "absent.env")}, {}),
    "malformed subnet": lambda f: ({"subnetFile": bad_env(f, SUBNET_ENV.replace(
        "10.244.5.1/24", "bogus"))}, {}),
    "subnet without prefix": lambda f: ({"subnetFile": bad_env(f, SUBNET_ENV.replace(
        "10.244.5.1/24", "10.244.5.1"))}, {}),
    "missing variables": lambda f: ({"subnetFile": bad_env(
        f, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=1472\n")}, {}),
    "bad MTU": lambda f: ({"subnetFile": bad_env(f, SUBNET_ENV.replace("1472", "abc"))}, {}),
    "delegate with ipam": lambda f: ({"delegate": {"ipam": {}}}, {}),
    "delegate with name": lambda f: ({"delegate": {"name": "x"}}, {}),
    "delegate type not a string": lambda f: ({"delegate": {"type": 5}}, {}),
    "delegate not a dictionary": lambda f: ({"delegate": "bridge"}, {}),
    "missing delegate plugin": lambda f: ({"delegate": {"type": "nosuchplugin"}}, {}),
    "unsupported version": lambda f: ({"cniVersion": "9.9.9"}, {}),
    "unknown command": lambda f: ({}, {"CNI_COMMAND": "BOGUS"}),
    "missing environment": lambda f: ({}, {"CNI_NETNS": None, "CNI_PATH": None}),
    "CHECK before 0.4.0": lambda f: ({"cniVersion": "0.3.1"}, {"CNI_COMMAND": "CHECK"}),
}


@needs_reference
@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_every_bad_input_gets_flannels_error(files: Path, case) -> None:
    answers = []
    for plugin in (PLUGIN, REFERENCE_CNI):
        extra, env = case(files)
        command = env.pop("CNI_COMMAND", "ADD")
        result = call(plugin, command, conf_for(files, plugin, **extra), env)
        assert result.returncode == 1
        answers.append(json.loads(result.stdout))
    assert answers[0] == answers[1]


def test_errors_without_the_reference_have_codes_and_messages(files: Path) -> None:
    """The same answers, checked on their own (where the reference build is absent)."""
    result = call(PLUGIN, "ADD", conf_for(files, PLUGIN, subnetFile=str(files / "absent.env")))
    assert result.returncode == 1
    assert json.loads(result.stdout) == {
        "code": 999, "msg": f"open {files / 'absent.env'}: no such file or directory"}
    result = call(PLUGIN, "ADD", "not json")
    assert result.returncode == 1 and json.loads(result.stdout)["code"] == 6
    result = call(PLUGIN, "VERSION", "{}")
    assert json.loads(result.stdout) == {
        "cniVersion": "1.0.0",
        "supportedVersions": ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]}


@pytest.mark.parametrize("plugin", [PLUGIN, pytest.param(REFERENCE_CNI, marks=needs_reference)],
                         ids=["ours", "flannel"])
def test_del_reads_only_the_data_dir(files: Path, plugin: str) -> None:
    """DEL hands the delegate what ADD kept in dataDir and reads nothing else: it works with
    the daemon gone and its subnet.env with it, as flannel's does."""
    conf = conf_for(files, plugin, delegate={"type": "recorder"})
    env = {"CNI_PATH": str(files / "bin"), "RECORD_TO": str(files / "record")}
    result = call(plugin, "ADD", conf, env)
    assert result.returncode == 0, result.stdout + result.stderr
    saved = Path(conf["dataDir"], "ctr1")
    kept = saved.read_bytes()
    (files / "subnet.env").unlink()
    result = call(plugin, "DEL", conf, env)
    assert (result.returncode, result.stdout) == (0, b""), result.stderr
    assert (files / "record.DEL").read_bytes() == kept
    assert not saved.exists()


def test_del_of_an_unknown_container_succeeds(files: Path) -> None:
    result = call(PLUGIN, "DEL", conf_for(files, PLUGIN))
    assert result.returncode == 0 and result.stdout == b""


def test_start_up_is_cheap(files: Path) -> None:
    """It runs once per container: only the standard library's small parts are imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import control.programs.cni"],
        capture_output=True, text=True)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()[1:]}
    assert "control.programs.cni" in imported
    heavy = {"uvloop", "aetcd", "etcd", "grpc", "prometheus_client", "fastpath", "asyncio",
             "subprocess", "typing"}
    assert not {name.split(".")[0] for name in imported} & heavy


# ---- with the real plugins, on a pyflanneld cluster ------------------------------------------

def container(cluster: Cluster, name: str) -> str:
    netns = f"{cluster.bed.prefix}-{name}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    cluster.bed.namespaces.append(netns)  # deleted with the testbed
    return netns


@pytest.fixture
def cluster(bed_and_etcd: tuple[Testbed, EtcdServer]) -> Iterator[Cluster]:
    bed, etcd = bed_and_etcd
    cluster = Cluster(bed, etcd, "v3", "/cni/network")
    try:
        yield cluster
    finally:
        stop_all(cluster.daemons)


@pytest.fixture
def two_hosts(cluster: Cluster) -> list:
    cluster.config(FIGURE_2_CONFIG)
    # --ip-masq, as flannel's manifest runs it: the plugin then tells bridge not to masquerade.
    daemons = [cluster.daemon("--ip-masq") for _ in range(2)]
    for daemon in daemons:
        daemon.wait_subnet()
    for daemon in daemons:
        daemon.wait_log("subnet added")
    return daemons


def in_host(daemon, command: str, conf: dict, netns: str,
            plugin: str = PLUGIN) -> subprocess.CompletedProcess[bytes]:
    """The plugin as a runtime on the daemon's host runs it."""
    environ = {"CNI_COMMAND": command, "CNI_CONTAINERID": netns,
               "CNI_NETNS": f"/run/netns/{netns}", "CNI_IFNAME": "eth0", "CNI_PATH": CNI_PATH}
    exports = [f"{k}={v}" for k, v in environ.items()]
    return subprocess.run(["ip", "netns", "exec", daemon.host.netns, "env", *exports, plugin],
                          input=json.dumps(conf).encode(), capture_output=True, timeout=30)


def has_eth0(netns: str) -> bool:
    return subprocess.run(["ip", "-n", netns, "link", "show", "eth0"],
                          capture_output=True).returncode == 0


def test_containers_added_by_the_plugin_reach_each_other_and_del_and_check_work(
        cluster: Cluster, two_hosts: list) -> None:
    workdir = cluster.bed.workdir
    confs, results, netnses = [], [], []
    for i, daemon in enumerate(two_hosts):
        conf = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
                "subnetFile": daemon.subnet_file,
                "dataDir": os.path.join(workdir, f"cni-flannel-{i}"),
                "ipam": {"dataDir": os.path.join(workdir, f"cni-ipam-{i}")}}
        netns = container(cluster, f"cni{i}")
        result = in_host(daemon, "ADD", conf, netns)
        assert result.returncode == 0, result.stdout + result.stderr
        confs.append(conf)
        results.append(json.loads(result.stdout))
        netnses.append(netns)
        # The subnet.env the daemon wrote chose the address and the MTU.
        env = daemon.subnet_env()
        assert results[-1]["cniVersion"] == "1.0.0"
        assert results[-1]["ips"][0]["address"].startswith(
            env["FLANNEL_SUBNET"].rsplit(".", 1)[0] + ".")
        link = subprocess.run(["ip", "-n", netns, "-o", "link", "show", "eth0"],
                              capture_output=True, text=True, check=True).stdout
        assert f"mtu {env['FLANNEL_MTU']}" in link
    addresses = [r["ips"][0]["address"].split("/")[0] for r in results]
    for i, j in ((0, 1), (1, 0)):
        result = subprocess.run(["ip", "netns", "exec", netnses[i], "ping", "-c", "2", "-i",
                                 "0.2", "-W", "2", addresses[j]], capture_output=True, text=True)
        assert "2 received" in result.stdout, result.stdout

    for i, daemon in enumerate(two_hosts):
        check = {**confs[i], "prevResult": results[i]}
        result = in_host(daemon, "CHECK", check, netnses[i])
        assert result.returncode == 0, result.stdout + result.stderr
        lease = os.path.join(workdir, f"cni-ipam-{i}", "cbr0", addresses[i])
        assert os.path.exists(lease)
        if i == 0:
            # An interface removed by hand: CHECK says so, DEL still cleans up.
            subprocess.run(["ip", "-n", netnses[i], "link", "del", "eth0"], check=True)
            result = in_host(daemon, "CHECK", check, netnses[i])
            assert result.returncode == 1
            assert json.loads(result.stdout)["msg"], result.stdout
        result = in_host(daemon, "DEL", confs[i], netnses[i])
        assert result.returncode == 0, result.stdout + result.stderr
        assert not has_eth0(netnses[i])
        assert not os.path.exists(lease)  # the address is free again
        assert not os.path.exists(os.path.join(confs[i]["dataDir"], netnses[i]))


def per_container(result: dict) -> dict:
    """A CNI result without what differs from one container to the next: MACs, the host end's
    veth name, the sandbox and the container's own address (kept: its subnet)."""
    interfaces = [{**{key: v for key, v in iface.items() if key not in ("mac", "sandbox")},
                   "name": "veth" if iface["name"].startswith("veth") else iface["name"],
                   "sandbox": bool(iface.get("sandbox"))} for iface in result["interfaces"]]
    ips = [{**ip, "address": str(ipaddress.ip_interface(ip["address"]).network)}
           for ip in result["ips"]]
    return {**result, "interfaces": interfaces, "ips": ips}


@pytest.mark.parametrize("plugins", [
    [PLUGIN], pytest.param([PLUGIN, REFERENCE_CNI], marks=needs_reference)],
    ids=["ours", "beside-flannel"])
def test_cni_0_3_1_add_then_del_with_the_daemon_stopped_and_subnet_env_gone(
        cluster: Cluster, plugins: list[str]) -> None:
    """CNI 0.3.1 through the real plugins: ADD answers a 0.3.1 result (flannel's, but for
    what is each container's own); DEL after the daemon stopped and its subnet.env was removed
    (a node going down) still removes the interface and frees the address."""
    cluster.config(FIGURE_2_CONFIG)
    daemon = cluster.daemon("--ip-masq")
    subnet = daemon.wait_subnet()
    tag = f"cni031-{len(plugins)}"  # each case its own containers and data
    workdir = cluster.bed.workdir
    conf = {"cniVersion": "0.3.1", "name": "cbr031", "type": "flannel",
            "subnetFile": daemon.subnet_file, "dataDir": os.path.join(workdir, f"{tag}-flannel"),
            "ipam": {"dataDir": os.path.join(workdir, f"{tag}-ipam")}}
    added = {}
    for plugin in plugins:
        netns = container(cluster, f"{tag}-{len(added)}")
        result = in_host(daemon, "ADD", conf, netns, plugin)
        assert result.returncode == 0, result.stdout + result.stderr
        added[plugin] = (netns, json.loads(result.stdout))
    netns, result = added[PLUGIN]
    assert result["cniVersion"] == "0.3.1"
    ip = result["ips"][0]
    assert ip["version"] == "4"  # 0.3.x names the family; 1.0.0 does not
    assert ipaddress.ip_interface(ip["address"]) in subnet
    assert result["interfaces"][ip["interface"]]["sandbox"] == f"/run/netns/{netns}"
    if REFERENCE_CNI in added:
        assert non_empty(per_container(result)) == non_empty(
            per_container(added[REFERENCE_CNI][1]))

    assert daemon.stop() == 0
    os.remove(daemon.subnet_file)
    for plugin, (netns, result) in added.items():
        address = result["ips"][0]["address"].split("/")[0]
        lease = os.path.join(conf["ipam"]["dataDir"], "cbr031", address)
        assert os.path.exists(lease)
        deleted = in_host(daemon, "DEL", conf, netns, plugin)
        assert (deleted.returncode, deleted.stdout) == (0, b""), deleted.stderr
        assert not has_eth0(netns)
        assert not os.path.exists(lease)  # the address is free again
        assert not os.path.exists(os.path.join(conf["dataDir"], netns))
