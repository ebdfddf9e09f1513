"""deploy/: the DaemonSet manifest in kube-flannel.yml v0.20.2's shape, accepted by a real API
server (tests/kubeapi.py) in a server-side dry run; pyflanneld run as that DaemonSet runs it (in a
Pod's view of its ServiceAccount, bound to the manifest's ClusterRole, finding its Node from its
Pod), which writes what flanneld writes and is never refused; `kubectl apply` switching a
kube-flannel.yml install to it and back; and the Containerfile, which is not built here (no
container engine), checked against `make wheel`'s naming and the wheel's commands."""

from __future__ import annotations

import base64
import copy
import fnmatch
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from typing import Any

import yaml

from tests.cluster import Flanneld
from tests.etcd import EtcdServer
from tests.flanneld import REPO
from tests.kubeapi import FLANNEL_RULES, KubeApi
from tests.readme import readme_block
from tests.test_kubeapi import (
    IN_CLUSTER_MOUNT,
    SERVICE_ACCOUNT_DIR,
    flannel_annotations,
    network_condition,
    wait_for,
)
from tests.testbed import Host, Testbed

MANIFEST = os.path.join(REPO, "deploy", "kube-pyflannel.yml")
CONTAINERFILE = os.path.join(REPO, "deploy", "Containerfile")
NAMESPACE, ACCOUNT = "kube-flannel", "flannel"
# kube-flannel.yml v0.20.2's ConfigMap (../shared/kube-compat.md section 7).
FLANNEL_CNI_CONF = {"name": "cbr0", "cniVersion": "0.3.1", "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
    {"type": "portmap", "capabilities": {"portMappings": True}}]}
FLANNEL_NET_CONF = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}
FLANNEL_CNI_PLUGIN_IMAGE = "docker.io/rancher/mirrored-flannelcni-flannel-cni-plugin:v1.1.0"
MEMORY_LIMIT_MIB = 50  # the DaemonSet's, as flannel's


def documents() -> list[dict[str, Any]]:
    with open(MANIFEST) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def only(kind: str) -> dict[str, Any]:
    found = [doc for doc in documents() if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} in {MANIFEST}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    return only("DaemonSet")["spec"]["template"]["spec"]


def container(spec: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    found = [c for c in spec["initContainers" if init else "containers"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def project() -> dict[str, Any]:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


# ---- the manifest, read ---------------------------------------------------------------------

def test_the_manifest_holds_kube_flannel_yml_objects_by_their_names() -> None:
    kinds = [(doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace"))
             for doc in documents()]
    assert kinds == [("Namespace", NAMESPACE, None), ("ClusterRole", "flannel", None),
                     ("ClusterRoleBinding", "flannel", None),
                     ("ServiceAccount", ACCOUNT, NAMESPACE),
                     ("ConfigMap", "kube-flannel-cfg", NAMESPACE),
                     ("DaemonSet", "kube-flannel-ds", NAMESPACE)]
    assert only("Namespace")["metadata"]["labels"] == {
        "pod-security.kubernetes.io/enforce": "privileged"}
    binding = only("ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": "flannel"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": ACCOUNT,
                                    "namespace": NAMESPACE}]
    config = only("ConfigMap")
    assert config["metadata"]["labels"] == {"tier": "node", "app": "flannel"}
    assert json.loads(config["data"]["cni-conf.json"]) == FLANNEL_CNI_CONF
    assert json.loads(config["data"]["net-conf.json"]) == FLANNEL_NET_CONF


def test_the_cluster_role_is_exactly_flanneld_s() -> None:
    assert only("ClusterRole")["rules"] == FLANNEL_RULES


def test_the_daemonset_runs_pyflanneld_as_flannel_s_runs_flanneld() -> None:
    daemonset = only("DaemonSet")
    assert daemonset["spec"]["selector"] == {"matchLabels": {"app": "flannel"}}
    assert daemonset["spec"]["template"]["metadata"]["labels"] == {"tier": "node",
                                                                   "app": "flannel"}
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists", "effect": "NoSchedule"}]
    assert spec["serviceAccountName"] == ACCOUNT
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [{"matchExpressions": [
        {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}]

    main = container(spec, "kube-flannel")
    assert main["args"] == ["--ip-masq", "--kube-subnet-mgr",
                            "--fastpath-pin-dir=/sys/fs/bpf/pyflannel"]
    assert main["resources"] == {"requests": {"cpu": "100m", "memory": "50Mi"},
                                 "limits": {"cpu": "100m", "memory": "50Mi"}}
    assert main["securityContext"] == {"privileged": False,
                                       "capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in main["env"]}
    assert env == {"POD_NAME": {"fieldRef": {"fieldPath": "metadata.name"}},
                   "POD_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                   "EVENT_QUEUE_DEPTH": "5000"}  # no NODE_NAME: its Node comes from its Pod
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert mounts == {"run": "/run/flannel", "flannel-cfg": "/etc/kube-flannel/",
                      "xtables-lock": "/run/xtables.lock", "bpffs": "/sys/fs/bpf"}

    plugin = container(spec, "install-cni-plugin", init=True)
    assert plugin["image"] == FLANNEL_CNI_PLUGIN_IMAGE
    assert [*plugin["command"], *plugin["args"]] == ["cp", "-f", "/flannel",
                                                     "/opt/cni/bin/flannel"]
    assert [(m["name"], m["mountPath"]) for m in plugin["volumeMounts"]] == [
        ("cni-plugin", "/opt/cni/bin")]
    conflist = container(spec, "install-cni", init=True)
    assert [*conflist["command"], *conflist["args"]] == [
        "cp", "-f", "/etc/kube-flannel/cni-conf.json", "/etc/cni/net.d/10-flannel.conflist"]
    assert {m["name"]: m["mountPath"] for m in conflist["volumeMounts"]} == {
        "cni": "/etc/cni/net.d", "flannel-cfg": "/etc/kube-flannel/"}
    assert [c["name"] for c in spec["initContainers"]] == ["install-cni-plugin", "install-cni"]
    # pyflannel's image (deploy/Containerfile) for the daemon and the conflist's copy.
    assert main["image"] == conflist["image"] == f"pyflannel:{project()['version']}"

    volumes = {v["name"]: v.get("hostPath") or v.get("configMap") for v in spec["volumes"]}
    assert volumes == {"run": {"path": "/run/flannel"}, "cni-plugin": {"path": "/opt/cni/bin"},
                       "cni": {"path": "/etc/cni/net.d"},
                       "flannel-cfg": {"name": "kube-flannel-cfg"},
                       "xtables-lock": {"path": "/run/xtables.lock", "type": "FileOrCreate"},
                       "bpffs": {"path": "/sys/fs/bpf"}}


# ---- the manifest, on a real API server ------------------------------------------------------

def write_documents(bed: Testbed, name: str, kinds: set[str]) -> str:
    """The manifest's documents of these kinds, as a file of their own."""
    path = os.path.join(bed.workdir, name)
    with open(path, "w") as f:
        yaml.safe_dump_all([doc for doc in documents() if doc["kind"] in kinds], f)
    return path


def test_the_api_server_accepts_the_whole_manifest_in_a_server_side_dry_run(
        kube: tuple[Testbed, EtcdServer, KubeApi]) -> None:
    """`kubectl apply --dry-run=server` (a newer kubectl than the 1.19 server: it works). A dry
    run persists nothing, so the Namespace the other objects go in is made for real first: in
    one dry run of the file they fail with `namespaces "kube-flannel" not found`, as
    kube-flannel.yml's do. Then each object goes through validation and admission
    (the DaemonSet's priority class, its pod template) and none is stored."""
    bed, _, api = kube
    api.kubectl("apply", "-f", write_documents(bed, "namespace.yml", {"Namespace"}))
    result = api.kubectl("apply", "--dry-run=server", "-f", MANIFEST)
    for kind, name in (("namespace", NAMESPACE),
                       ("clusterrole.rbac.authorization.k8s.io", "flannel"),
                       ("clusterrolebinding.rbac.authorization.k8s.io", "flannel"),
                       ("serviceaccount", ACCOUNT), ("configmap", "kube-flannel-cfg"),
                       ("daemonset.apps", "kube-flannel-ds")):
        assert re.search(rf"^{re.escape(kind)}/{name} \S+ \(server dry run\)$", result.stdout,
                         re.M), result.stdout
    status, _ = api.request("GET", f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/"
                            "kube-flannel-ds", check=False)
    assert status == 404


def wait_token(api: KubeApi, directory: str, account: str) -> str:
    """The ServiceAccount's token Secret, once the controller manager has filled it, written as
    a Pod sees it mounted (token, ca.crt, namespace); returns the folder."""
    data: dict[str, str] = {}

    def filled() -> bool:
        sa = api.get(f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{account}")
        for ref in sa.get("secrets") or []:
            secret = api.get(f"/api/v1/namespaces/{NAMESPACE}/secrets/{ref['name']}")
            if secret.get("type") == "kubernetes.io/service-account-token":
                data.update(secret.get("data") or {})
        return bool(data.get("token"))
    wait_for(filled, 90, f"a token for ServiceAccount {account}")
    os.makedirs(directory, exist_ok=True)
    for key in ("token", "ca.crt", "namespace"):
        with open(os.path.join(directory, key), "wb") as f:
            f.write(base64.b64decode(data[key]))
    return directory


def create_daemonset_pod(api: KubeApi, node: str) -> str:
    """The Pod the DaemonSet controller would make for `node`, from the manifest's template
    (bound to it: spec.nodeName); nothing runs it, pyflanneld reads it. Returns its name."""
    template = only("DaemonSet")["spec"]["template"]
    name = f"kube-flannel-ds-{node}"
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {**copy.deepcopy(template["metadata"]), "name": name},
           "spec": {**copy.deepcopy(template["spec"]), "nodeName": node}}
    api.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod)
    return name


def flannel_api_calls(api: KubeApi) -> dict[tuple[str, str, str, str], int]:
    """The API server's count of answered requests (apiserver_request_total) on pods and
    nodes, by (verb, resource, subresource, code). Requests refused by RBAC are not in it (1.19
    counts them in no metric, logs them at no default level and has no audit log here): those
    show in pyflanneld's log."""
    counts: dict[tuple[str, str, str, str], int] = {}
    for line in api.request("GET", "/metrics")[1].splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        if labels.get("resource") in ("pods", "nodes") and labels.get("group") == "":
            key = (labels["verb"], labels["resource"], labels["subresource"], labels["code"])
            counts[key] = counts.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


class InClusterPyflanneld(Flanneld):
    """pyflanneld with the DaemonSet's flags and environment, as its container sees the
    cluster: its ServiceAccount's files at /var/run/secrets/kubernetes.io/serviceaccount (a
    mount namespace of its own), KUBERNETES_SERVICE_HOST/PORT, POD_NAME and POD_NAMESPACE, no
    NODE_NAME and no kubeconfig; net-conf.json from the ConfigMap, in a file."""

    def __init__(self, bed: Testbed, host: Host, api: KubeApi, account_dir: str,
                 pod: str) -> None:
        net_conf = os.path.join(bed.workdir, f"{host.netns}-net-conf.json")
        with open(net_conf, "w") as f:
            f.write(only("ConfigMap")["data"]["net-conf.json"])
        main = container(pod_spec(), "kube-flannel")
        environ = {e["name"]: e["value"] for e in main["env"] if "value" in e}
        environ.update(POD_NAME=pod, POD_NAMESPACE=NAMESPACE, SA=SERVICE_ACCOUNT_DIR,
                       KUBERNETES_SERVICE_HOST=api.address, KUBERNETES_SERVICE_PORT=str(api.port))
        # --iface: the test host has no default route to find eth0 by.
        # The pins go in a folder of the test's (the host's /sys/fs/bpf is everyone's).
        args = [arg for arg in main["args"] if not arg.startswith("--fastpath-pin-dir")]
        super().__init__(bed, host, None, "", *args, f"--net-config-path={net_conf}",
                         program=["unshare", "--mount", "sh", "-c", IN_CLUSTER_MOUNT,
                                  account_dir, sys.executable, "-m", "control"],
                         environ=environ)
        for name in ("NODE_NAME", "KUBECONFIG"):  # from the test's own environment, if at all
            self.environ.pop(name, None)


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)[1]) / 1024  # type: ignore[index]


def test_pyflanneld_runs_in_cluster_with_exactly_the_manifest_s_role(
        kube: tuple[Testbed, EtcdServer, KubeApi]) -> None:
    """The manifest's Namespace, ServiceAccount, ClusterRole and binding applied for real;
    pyflanneld with the DaemonSet's args and environment finds its Node through its Pod
    (pods get), writes the Node's annotations, NetworkUnavailable=False and subnet.env, sets up
    --ip-masq, and is refused nothing. A control run with the role minus `pods get` is
    refused, and says so in its log: the log check can fail. Its peak RSS stays under the
    DaemonSet's memory limit."""
    bed, _, api = kube
    api.kubectl("apply", "-f", write_documents(
        bed, "rbac.yml", {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}))
    account_dir = wait_token(api, os.path.join(bed.workdir, "serviceaccount"), ACCOUNT)
    with open(os.path.join(account_dir, "namespace")) as f:
        assert f.read() == NAMESPACE
    host = bed.add_host()
    node = "manifest0"
    api.register_node(node, host.underlay_ip)
    cidr = api.wait_pod_cidr(node)
    pod = create_daemonset_pod(api, node)
    before = flannel_api_calls(api)
    daemon = InClusterPyflanneld(bed, host, api, account_dir, pod)
    assert "NODE_NAME" not in daemon.environ
    daemon.start()
    try:
        subnet = daemon.wait_subnet(timeout=40)
        assert str(subnet) == cidr
        assert daemon.subnet_env() == {
            "FLANNEL_NETWORK": FLANNEL_NET_CONF["Network"],
            "FLANNEL_SUBNET": f"{subnet.network_address + 1}/{subnet.prefixlen}",
            "FLANNEL_MTU": "1450", "FLANNEL_IPMASQ": "true"}
        condition = wait_for(lambda: network_condition(api, node), 20, "NetworkUnavailable set")
        assert (condition["status"], condition["reason"]) == ("False", "FlannelIsUp")
        mac = host.link("flannel.1")["address"]
        assert flannel_annotations(api, node) == {
            "kube-subnet-manager": "true", "public-ip": host.underlay_ip,
            "backend-type": "vxlan", "backend-data": f'{{"VNI":1,"VtepMAC":"{mac}"}}'}
        daemon.wait_log("running: watching Nodes", timeout=20)
        # Installed by the rules' own task once the daemon runs, as flanneld's goroutine does.
        wait_for(lambda: "FLANNEL-POSTRTG" in host.run("iptables", "-t", "nat", "-S").stdout,
                 10, "the masquerade chain installed")
        assert daemon.process is not None
        peak = peak_rss_mib(daemon.process.pid)
        log = daemon.log()
        assert f"Kubernetes Subnet Manager - {node}" in log, log[-3000:]
        assert "Using the inClusterConfig" in log
        assert not re.search(r"\b403\b|forbidden", log, re.I), log[-3000:]
    finally:
        assert daemon.stop() == 0
    after = flannel_api_calls(api)
    gained = {key: after[key] - before.get(key, 0) for key in after
              if after[key] > before.get(key, 0)}
    # Its own calls, each answered: its Pod read (no NODE_NAME), its Node's status patched.
    assert gained.get(("GET", "pods", "", "200")), gained
    assert gained.get(("PATCH", "nodes", "status", "200")), gained
    assert not [key for key in gained if key[3] >= "400"], gained
    assert peak < MEMORY_LIMIT_MIB, f"peak RSS {peak:.1f} MiB"

    # The control: the same, with a role that lacks `pods get`, is refused and logs it.
    rules = [rule for rule in FLANNEL_RULES if rule["resources"] != ["pods"]]
    api.request("POST", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts",
                {"apiVersion": "v1", "kind": "ServiceAccount",
                 "metadata": {"name": "flannel-no-pods"}})
    api.bind_cluster_role("flannel-no-pods", NAMESPACE, "flannel-no-pods", rules)
    control_dir = wait_token(api, os.path.join(bed.workdir, "serviceaccount-no-pods"),
                             "flannel-no-pods")
    control = InClusterPyflanneld(bed, host, api, control_dir, pod)
    control.start()
    try:
        control.wait_log(f"error retrieving pod spec for '{NAMESPACE}/{pod}'", timeout=30)
        assert re.search(r"\b403\b", control.log()), control.log()[-3000:]
    finally:
        control.stop()


FLANNEL_IMAGE = "docker.io/rancher/mirrored-flannelcni-flannel:v0.20.2"


def kube_flannel_yml(bed: Testbed) -> str:
    """kube-flannel.yml v0.20.2 as ../shared/kube-compat.md section 7 has it: this file with
    flannel's image and command, and without /sys/fs/bpf."""
    docs = documents()
    daemonset = next(doc for doc in docs if doc["kind"] == "DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    main = container(spec, "kube-flannel")
    main.update(image=FLANNEL_IMAGE, command=["/opt/bin/flanneld"])
    main["volumeMounts"] = [m for m in main["volumeMounts"] if m["name"] != "bpffs"]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "bpffs"]
    container(spec, "install-cni", init=True)["image"] = FLANNEL_IMAGE
    path = os.path.join(bed.workdir, "kube-flannel.yml")
    with open(path, "w") as f:
        yaml.safe_dump_all(docs, f)
    return path


def stored_daemonset(api: KubeApi) -> dict[str, Any]:
    return api.get(f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/kube-flannel-ds")


def images_and_volumes(daemonset: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    spec = daemonset["spec"]["template"]["spec"]
    return ([c["image"] for c in spec["initContainers"] + spec["containers"]],
            container(spec, "kube-flannel")["command"], [v["name"] for v in spec["volumes"]])


def holds(stored: Any, applied: Any) -> bool:
    """`stored` has everything `applied` has (a stored object: the applied one with the
    server's defaults added): dicts key by key, lists item by item."""
    if isinstance(applied, dict):
        return isinstance(stored, dict) and all(
            key in stored and holds(stored[key], value) for key, value in applied.items())
    if isinstance(applied, list):
        return (isinstance(stored, list) and len(stored) == len(applied)
                and all(holds(a, b) for a, b in zip(stored, applied, strict=True)))
    return bool(stored == applied)


def test_kubectl_apply_switches_a_kube_flannel_yml_install_and_back(
        kube: tuple[Testbed, EtcdServer, KubeApi]) -> None:
    """The README's switch: `kubectl apply -f deploy/kube-pyflannel.yml` over an install of
    kube-flannel.yml updates the same DaemonSet in place (its pods then roll over one Node at a
    time: RollingUpdate, maxUnavailable 1) to exactly this file's template, and applying
    kube-flannel.yml again takes it back, /sys/fs/bpf included."""
    bed, _, api = kube
    flannel = kube_flannel_yml(bed)
    api.kubectl("apply", "-f", flannel)
    installed = stored_daemonset(api)
    assert images_and_volumes(installed)[:2] == (
        [FLANNEL_CNI_PLUGIN_IMAGE, FLANNEL_IMAGE, FLANNEL_IMAGE], ["/opt/bin/flanneld"])
    assert installed["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}

    api.kubectl("apply", "-f", MANIFEST)
    switched = stored_daemonset(api)
    assert switched["metadata"]["uid"] == installed["metadata"]["uid"]  # the same DaemonSet
    assert switched["metadata"]["generation"] == installed["metadata"]["generation"] + 1
    main = container(pod_spec(), "kube-flannel")
    ours = only("DaemonSet")
    assert images_and_volumes(switched) == images_and_volumes(ours)
    # Everything the file says, with the server's defaults beside it; nothing of flannel's left.
    assert holds(switched["spec"]["template"], ours["spec"]["template"])
    assert container(switched["spec"]["template"]["spec"], "kube-flannel").keys() == {
        *main, "imagePullPolicy", "terminationMessagePath", "terminationMessagePolicy"}

    api.kubectl("apply", "-f", flannel)
    back = stored_daemonset(api)
    assert images_and_volumes(back) == (
        [FLANNEL_CNI_PLUGIN_IMAGE, FLANNEL_IMAGE, FLANNEL_IMAGE], ["/opt/bin/flanneld"],
        images_and_volumes(installed)[2])
    assert "bpffs" not in json.dumps(back["spec"]["template"])
    assert not holds(back["spec"]["template"], only("DaemonSet")["spec"]["template"])


# ---- the Containerfile -----------------------------------------------------------------------

def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) with continuation lines joined, comments left out."""
    with open(CONTAINERFILE) as f:
        text = f.read()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in joined.splitlines() if line.strip()]


def test_the_containerfile_installs_make_wheel_s_wheel_and_runs_pyflanneld() -> None:
    """Not built here: what it copies is what `make wheel` names (a manylinux wheel of this
    version for the base image's Python, whatever manylinux policy auditwheel gives it, and
    neither the sdist nor the unrepaired wheel), with the README's pip flags, the Debian
    packages of what pyflanneld execs and loads, and the wheel's pyflanneld as entry point, the
    manifest's command."""
    steps = instructions()
    assert [op for op, _ in steps] == ["FROM", "RUN", "COPY", "RUN", "ENTRYPOINT"]
    froms = [args for op, args in steps if op == "FROM"]
    assert froms == ["docker.io/library/python:3.11-slim-bookworm"]
    python = re.search(r"python:(\d+)\.(\d+)-", froms[0])
    assert python
    tag = f"cp{python[1]}{python[2]}"
    assert project()["requires-python"] == ">=3.11"
    version = project()["version"]

    copies = [shlex.split(args) for op, args in steps if op in ("COPY", "ADD")]
    assert len(copies) == 1
    *sources, _ = copies[0]
    glibc_of_bookworm = 36
    made = [f"pyflannel-{version}-{tag}-{tag}-manylinux_2_{minor}_x86_64.whl"
            for minor in range(17, glibc_of_bookworm + 1)]
    made.append(f"pyflannel-{version}-{tag}-{tag}-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
    not_made = [f"pyflannel-{version}.tar.gz", f"pyflannel-{version}-{tag}-{tag}-linux_x86_64.whl"]
    for source in sources:
        assert source.startswith("dist/"), source  # the Makefile's DIST
        assert all(fnmatch.fnmatch(f"dist/{name}", source) for name in made), source
        assert not any(fnmatch.fnmatch(f"dist/{name}", source) for name in not_made), source
        # After a `make wheel` in this checkout: exactly its wheel, which bookworm's glibc runs.
        present = glob.glob(os.path.join(REPO, source))
        if glob.glob(os.path.join(REPO, "dist", "pyflannel-*")):
            assert len(present) == 1, present
            policy = re.search(r"manylinux_2_(\d+)_", os.path.basename(present[0]))
            assert policy and int(policy[1]) <= glibc_of_bookworm, present

    runs = " ".join(args for op, args in steps if op == "RUN")
    pip = shlex.split(runs.split("pip install", 1)[1].split("&&", 1)[0])
    readme_pip = shlex.split(next(line for line in readme_block(
        "On a host: the wheel").splitlines() if line.startswith("pip install")))[2:]
    flags = [word for word in readme_pip if not word.endswith(".whl")]
    assert " ".join(flags) in " ".join(pip), (flags, pip)
    assert pip[-1] == "/tmp/wheel/pyflannel-*.whl" and copies[0][-1] == "/tmp/wheel/"

    packages = runs.split("--no-install-recommends", 1)[1].split("&&", 1)[0].split()
    assert sorted(packages) == ["iptables", "libbpf1"]
    with open(os.path.join(REPO, "control", "host", "iptables.py")) as f:
        # what it execs: iptables and ip6tables, and their -restore
        assert 'COMMAND = {4: "iptables", 6: "ip6tables"}' in f.read()
    with open(os.path.join(REPO, "fastpath", "udp_tc.py")) as f:
        assert 'LIBBPF_SONAMES = ("libbpf.so.1"' in f.read()  # what it loads first
    # The packages that hold them in Debian 12, the base image's release as this machine's.
    commands = [f"/usr/sbin/{name}-nft{tail}" for name in ("iptables", "ip6tables")
                for tail in ("", "-restore")]
    owners = subprocess.run(["dpkg", "-S", *commands, "libbpf.so.1"],
                            capture_output=True, text=True, check=True).stdout
    for command in commands:
        assert re.search(rf"^iptables: {command}$", owners, re.M), owners
    assert re.search(r"^libbpf1:amd64: \S+/libbpf\.so\.1$", owners, re.M), owners

    entrypoint = [json.loads(args) for op, args in steps if op == "ENTRYPOINT"]
    assert entrypoint == [["pyflanneld"]]
    assert project()["scripts"]["pyflanneld"] == "control.service.cli:main"
    assert container(pod_spec(), "kube-flannel")["command"] == entrypoint[0]

