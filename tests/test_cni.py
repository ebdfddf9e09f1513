"""The `flannel` CNI plugin (control/programs/cni.py): flannel's plugin v1.1.0 run beside ours as
the oracle for the delegate config and every error; the real `bridge` and `host-local` plugins
for containers on a pyflanneld cluster."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.host.subnetenv import read_variables
from tests.cluster import FIGURE_2_CONFIG, Cluster, stop_all
from tests.etcd import EtcdServer
from tests.flanneld import REFERENCE_CNI
from tests.test_config import flanneld_on, needs_flanneld
from tests.testbed import CNI_PATH, FLANNEL_CNI, Host, Testbed

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
    # flannel's plugin decodes ipam.routes as CNI's types.Route and encodes them again.
    "ipam routes as Go writes them again": {"ipam": {"routes": [
        {"dst": "FD00:0000:1::5/64", "x": 1}, {"DST": "::ffff:a00:1/120", "gw": "::ffff:a00:1"},
        {"dst": "1.2.3.4/24", "gw": ""}, {"gw": "1.2.3.1"}, None]}},
    "no ipam routes": {"ipam": {"routes": None}},
    # Go writes UTF-8 as it is and escapes <, > and & (and U+2028, U+2029).
    "delegate text Go escapes": {"delegate": {"bridge": "réseau <&>\u2028"}},
    "CNI 1.0.0": {"cniVersion": "1.0.0"},
    "CNI 0.3.1": {"cniVersion": "0.3.1"},
    "no cniVersion": {"cniVersion": None},
}


# subnet.env as flanneld writes it for each family set (tests/test_subnetenv.py checks that
# against flanneld v0.20.2), and what else the plugin reads alike.
IPV6_LINES = "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:5::1/64\n"
SUBNET_ENVS = {
    "dual-stack": SUBNET_ENV.replace("FLANNEL_MTU", IPV6_LINES + "FLANNEL_MTU"),
    "IPv6 only": IPV6_LINES + "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    "IPv6 lines first": IPV6_LINES + SUBNET_ENV,
    "IPv4-mapped IPv6 subnet": SUBNET_ENV + "FLANNEL_IPV6_NETWORK=::ffff:0:0/96\n"
                               "FLANNEL_IPV6_SUBNET=::ffff:a00:1/120\n",
    "IPv6 subnet unmasked, network only IPv4": SUBNET_ENV.replace(
        "FLANNEL_SUBNET=10.244.5.1/24", "FLANNEL_IPV6_SUBNET=fd00:1:2:3:4::9/80"),
}


def delegate_outputs(files: Path, extra: dict) -> dict[str, tuple[bytes, bytes, dict]]:
    """Per plugin: the config its delegate was given on ADD, the file it saved for DEL, and
    its ADD result. DEL is checked on the way: it hands the delegate the saved config and
    forgets it."""
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
        result = call(plugin, "DEL", conf, {"CNI_PATH": str(files / "bin"),
                                            "RECORD_TO": str(record)})
        assert result.returncode == 0, result.stdout + result.stderr
        assert Path(f"{record}.DEL").read_bytes() == saved
        assert not (files / f"data-{os.path.basename(plugin)}" / "ctr1").exists()
    return got


def assert_flannels(got: dict[str, tuple[bytes, bytes, dict]]) -> None:
    ours, theirs = got[PLUGIN], got[REFERENCE_CNI]
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1] == ours[0]
    # The delegate's result is passed on; flannel's re-encodes it, which drops and adds empty
    # fields only.
    assert non_empty(ours[2]) == non_empty(theirs[2])


@needs_reference
@pytest.mark.parametrize("extra", DELEGATE_CASES.values(), ids=DELEGATE_CASES.keys())
def test_delegate_config_and_saved_file_are_flannels_byte_for_byte(files: Path,
                                                                   extra: dict) -> None:
    assert_flannels(delegate_outputs(files, extra))


@needs_reference
@pytest.mark.parametrize("env", SUBNET_ENVS.values(), ids=SUBNET_ENVS.keys())
@pytest.mark.parametrize("extra", [{}, {"ipam": {"routes": [
    {"dst": "1.2.3.0/24"}, {"dst": "fd00:1::/64", "gw": "fd00::1"}]}}],
    ids=["defaults", "ipam routes of both families"])
def test_delegate_for_each_family_is_flannels_byte_for_byte(files: Path, env: str,
                                                            extra: dict) -> None:
    (files / "subnet.env").write_text(env)
    assert_flannels(delegate_outputs(files, extra))


def test_dual_stack_delegate_ranges_ipv4_first_and_routes_to_both_networks(files: Path) -> None:
    """What the byte-for-byte tests compare, spelled out (and checked where flannel's build
    is absent)."""
    (files / "subnet.env").write_text(SUBNET_ENVS["IPv6 lines first"])
    conf = conf_for(files, PLUGIN, delegate={"type": "recorder"})
    result = call(PLUGIN, "ADD", conf, {"CNI_PATH": str(files / "bin"),
                                        "RECORD_TO": str(files / "record")})
    assert result.returncode == 0, result.stdout + result.stderr
    delegate = json.loads((files / "record.ADD").read_bytes())
    assert delegate["ipam"] == {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.5.0/24"}], [{"subnet": "fc00:0:0:5::/64"}]],
        "routes": [{"dst": "10.244.0.0/16"}, {"dst": "fc00::/48"}]}
    assert (delegate["mtu"], delegate["ipMasq"]) == (1472, False)


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
    "MTU past 32 bits": lambda f: ({"subnetFile": bad_env(f, SUBNET_ENV.replace(
        "1472", "4294967296"))}, {}),
    "subnet with a netmask": lambda f: ({"subnetFile": bad_env(f, SUBNET_ENV.replace(
        "10.244.5.1/24", "10.244.5.1/255.255.255.0"))}, {}),
    "IPv6 network without subnets": lambda f: ({"subnetFile": bad_env(
        f, "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")}, {}),
    "IPv6 subnet alone": lambda f: ({"subnetFile": bad_env(
        f, "FLANNEL_IPV6_SUBNET=fc00:0:0:5::1/64\n")}, {}),
    "malformed IPv6 subnet": lambda f: ({"subnetFile": bad_env(
        f, SUBNET_ENVS["dual-stack"].replace("fc00:0:0:5::1/64", "fc00:::5::1/64"))}, {}),
    "IPv6 subnet without prefix": lambda f: ({"subnetFile": bad_env(
        f, SUBNET_ENVS["dual-stack"].replace("fc00:0:0:5::1/64", "fc00:0:0:5::1"))}, {}),
    "IPv6 subnet with a zone": lambda f: ({"subnetFile": bad_env(
        f, SUBNET_ENVS["dual-stack"].replace("fc00:0:0:5::1/64", "fe80::1%eth0/64"))}, {}),
    # flanneld v0.20.2 writes Go's dotted text for an IPv4-mapped IPv6Network: no CIDR to Go.
    "dotted IPv6 network": lambda f: ({"subnetFile": bad_env(
        f, SUBNET_ENVS["dual-stack"].replace("fc00::/48", "0.0.0.0/96"))}, {}),
    "delegate with ipam": lambda f: ({"delegate": {"ipam": {}}}, {}),
    "ipam routes not a list": lambda f: ({"ipam": {"routes": {"dst": "1.2.3.0/24"}}}, {}),
    "ipam route not an object": lambda f: ({"ipam": {"routes": ["1.2.3.0/24"]}}, {}),
    "ipam route dst not a CIDR": lambda f: ({"ipam": {"routes": [{"dst": "fd00::1"}]}}, {}),
    "ipam route dst null": lambda f: ({"ipam": {"routes": [{"dst": None}]}}, {}),
    "ipam route dst a number": lambda f: ({"ipam": {"routes": [{"dst": 5}]}}, {}),
    "ipam route gw not an address": lambda f: ({"ipam": {"routes": [
        {"dst": "fd00::/64", "gw": "fd00::1%eth0"}]}}, {}),
    "ipam route gw a number": lambda f: ({"ipam": {"routes": [{"dst": "fd00::/64", "gw": 1}]}},
                                         {}),
    "delegate with name": lambda f: ({"delegate": {"name": "x"}}, {}),
    "delegate type not a string": lambda f: ({"delegate": {"type": 5}}, {}),
    "delegate not a dictionary": lambda f: ({"delegate": "bridge"}, {}),
    "missing delegate plugin": lambda f: ({"delegate": {"type": "nosuchplugin"}}, {}),
    "unsupported version": lambda f: ({"cniVersion": "9.9.9"}, {}),
    "no network name": lambda f: ({"name": None}, {}),
    "network name with a space": lambda f: ({"name": "cbr 0"}, {}),
    "network name starting with a dot": lambda f: ({"name": ".cbr"}, {}),
    "container ID with a slash": lambda f: ({}, {"CNI_CONTAINERID": "ctr/1"}),
    "interface name too long": lambda f: ({}, {"CNI_IFNAME": "eth0123456789abcdef"}),
    "interface name with a slash": lambda f: ({}, {"CNI_IFNAME": "eth/0"}),
    "JSON cut short": lambda f: ('{"name": "cbr"', {}),
    "no config": lambda f: ("", {}),
    "config not an object": lambda f: ("[]", {}),
    "network name not a string": lambda f: ({"name": 5}, {}),
    "container ID checked before the command": lambda f: ({}, {"CNI_COMMAND": "BOGUS",
                                                              "CNI_CONTAINERID": "-x"}),
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
        # The recorder as the delegate: a plugin that took a bad input by mistake runs no
        # real plugin in this namespace.
        env = {"CNI_PATH": str(files / "bin"), "RECORD_TO": str(files / "record"), **env}
        if isinstance(extra, str):
            conf: dict | str = extra
        else:
            conf = {"delegate": {"type": "recorder"}, **conf_for(files, plugin, **extra)}
        result = call(plugin, command, conf, env)
        assert result.returncode == 1, result.stdout
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


@pytest.mark.parametrize("plugin", [PLUGIN, pytest.param(REFERENCE_CNI, marks=needs_reference)],
                         ids=["ours", "flannel"])
def test_del_of_an_unknown_container_succeeds_with_or_without_its_netns(files: Path,
                                                                       plugin: str) -> None:
    for env in ({}, {"CNI_NETNS": None}):  # CNI's skel needs no CNI_NETNS for DEL
        result = call(plugin, "DEL", conf_for(files, plugin), env)
        assert (result.returncode, result.stdout) == (0, b""), result.stdout


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


def in_host(host: Host, command: str, conf: dict, netns: str,
            plugin: str = PLUGIN) -> subprocess.CompletedProcess[bytes]:
    """The plugin as a runtime on the host runs it."""
    environ = {"CNI_COMMAND": command, "CNI_CONTAINERID": netns,
               "CNI_NETNS": f"/run/netns/{netns}", "CNI_IFNAME": "eth0", "CNI_PATH": CNI_PATH}
    exports = [f"{k}={v}" for k, v in environ.items()]
    return subprocess.run(["ip", "netns", "exec", host.netns, "env", *exports, plugin],
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
        result = in_host(daemon.host, "ADD", conf, netns)
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
        result = in_host(daemon.host, "CHECK", check, netnses[i])
        assert result.returncode == 0, result.stdout + result.stderr
        lease = os.path.join(workdir, f"cni-ipam-{i}", "cbr0", addresses[i])
        assert os.path.exists(lease)
        if i == 0:
            # An interface removed by hand: CHECK says so, DEL still cleans up.
            subprocess.run(["ip", "-n", netnses[i], "link", "del", "eth0"], check=True)
            result = in_host(daemon.host, "CHECK", check, netnses[i])
            assert result.returncode == 1
            assert json.loads(result.stdout)["msg"], result.stdout
        result = in_host(daemon.host, "DEL", confs[i], netnses[i])
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
        result = in_host(daemon.host, "ADD", conf, netns, plugin)
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
        deleted = in_host(daemon.host, "DEL", conf, netns, plugin)
        assert (deleted.returncode, deleted.stdout) == (0, b""), deleted.stderr
        assert not has_eth0(netns)
        assert not os.path.exists(lease)  # the address is free again
        assert not os.path.exists(os.path.join(conf["dataDir"], netns))


# ---- both families, from the subnet.env flanneld v0.20.2 writes -------------------------------

FAMILY_CONFIGS = {
    "dual-stack": '{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fc00::/48"}',
    # flanneld's udp backend panics without IPv4 before it writes subnet.env; vxlan writes it.
    "IPv6 only": '{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fc00::/48",'
                 ' "Backend": {"Type": "vxlan"}}',
}


def answers_ping(netns: str, address: str) -> bool:
    """Whether `address` answers from netns within 5 s (a new IPv6 address is tentative until
    duplicate address detection is done)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if subprocess.run(["ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "1", address],
                          capture_output=True).returncode == 0:
            return True
        time.sleep(0.2)
    return False


@needs_reference
@needs_flanneld
@pytest.mark.parametrize("config", FAMILY_CONFIGS.values(), ids=FAMILY_CONFIGS.keys())
def test_containers_get_each_family_as_with_flannels_plugin(
        bed_and_etcd: tuple[Testbed, EtcdServer], config: str) -> None:
    """flanneld v0.20.2 writes subnet.env for `config`; our plugin and flannel's each add a
    container through the real bridge and host-local: an address in each subnet, a route to
    each network, the bridge answering over each family, the same results but for what is
    each container's own; DEL removes both."""
    bed, etcd = bed_and_etcd
    tag = f"family{list(FAMILY_CONFIGS.values()).index(config)}"
    host = bed.add_host()
    assert flanneld_on(bed, etcd, host, config, tag, "--ip-masq", subnet_env=True).subnet_env
    subnet_file = os.path.join(bed.workdir, f"{tag}.env")
    env = read_variables(subnet_file)
    subnets = [ipaddress.ip_network(env[key], strict=False)
               for key in ("FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET") if key in env]
    networks = [ipaddress.ip_network(env[key])
                for key in ("FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK") if key in env]
    added = {}
    for plugin in (PLUGIN, REFERENCE_CNI):
        name = os.path.basename(plugin)
        netns = f"{bed.prefix}-{tag}-{name}"
        subprocess.run(["ip", "netns", "add", netns], check=True)
        bed.namespaces.append(netns)  # deleted with the testbed
        conf = {"cniVersion": "1.0.0", "name": f"cbr-{tag}", "type": "flannel",
                "subnetFile": subnet_file, "dataDir": os.path.join(bed.workdir, f"{tag}-{name}"),
                "ipam": {"dataDir": os.path.join(bed.workdir, f"{tag}-{name}-ipam")}}
        result = in_host(host, "ADD", conf, netns, plugin)
        assert result.returncode == 0, result.stdout + result.stderr
        added[plugin] = (netns, conf, json.loads(result.stdout))
    netns, _, result = added[PLUGIN]
    assert [ipaddress.ip_interface(ip["address"]).network for ip in result["ips"]] == subnets
    for network in networks:
        route = subprocess.run(["ip", "-n", netns, f"-{network.version}", "route", "show",
                                str(network)],
                               capture_output=True, text=True, check=True).stdout
        assert " via " in route, (network, route)
    for ip in result["ips"]:
        assert answers_ping(netns, ip["gateway"]), ip
    assert non_empty(per_container(result)) == non_empty(per_container(added[REFERENCE_CNI][2]))
    for plugin, (netns, conf, _) in added.items():
        deleted = in_host(host, "DEL", conf, netns, plugin)
        assert (deleted.returncode, deleted.stdout) == (0, b""), deleted.stderr
        assert not has_eth0(netns)
