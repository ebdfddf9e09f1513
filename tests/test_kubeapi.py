"""The Kubernetes control plane of tests/kubeapi.py against the reference builds (skipped only
where ../shared/reference/ is absent), and the real flanneld v0.20.2 in `--kube-subnet-mgr` mode
on it: the oracle for pyflanneld's Kubernetes subnet manager."""

from __future__ import annotations

import ipaddress
import json
import os
import time
import unittest
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from tests import kubeapi
from tests.cluster import LoggedDaemon
from tests.conftest import CLUSTER_CIDR
from tests.etcd import EtcdServer
from tests.flanneld import REFERENCE_FLANNELD, RealFlanneld
from tests.kubeapi import (
    FLANNEL_RULES,
    KUBELET_ANNOTATIONS,
    KubeApi,
    KubeError,
    ReferenceMissing,
    ServiceAccountFiles,
)
from tests.testbed import Host, Testbed

ANNOTATION = "flannel.alpha.coreos.com/"
NETWORK: Mapping[str, object] = {"Network": CLUSTER_CIDR}  # the kube tests' net-conf, less Backend
STRATEGIC = "application/strategic-merge-patch+json"


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s")


def test_absent_reference_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ../shared/reference/ (a user's machine) the caller is skipped, with the reason;
    nothing is made."""
    monkeypatch.setattr(kubeapi, "REFERENCE", "/nonexistent/reference")
    with pytest.raises(ReferenceMissing, match="no reference Kubernetes builds") as missing:
        KubeApi(Testbed.__new__(Testbed))
    assert isinstance(missing.value, unittest.SkipTest)


def test_node_registered_as_kubelet_gets_pod_cidr(kube: tuple[Testbed, EtcdServer, KubeApi]
                                                  ) -> None:
    bed, etcd, api = kube
    hosts = [bed.add_host(), bed.add_host()]
    cidrs = []
    for i, host in enumerate(hosts):
        created = api.register_node(f"cidr{i}", host.underlay_ip)
        assert created["metadata"]["annotations"] == dict(KUBELET_ANNOTATIONS)
        cidrs.append(ipaddress.IPv4Network(api.wait_pod_cidr(f"cidr{i}")))
    assert all(c.prefixlen == 24 and c.subnet_of(ipaddress.IPv4Network(CLUSTER_CIDR))
               for c in cidrs)
    assert cidrs[0] != cidrs[1]
    node = api.node("cidr0")
    assert node["spec"]["podCIDRs"] == [str(cidrs[0])]
    assert {"type": "InternalIP", "address": hosts[0].underlay_ip} in node["status"]["addresses"]
    # Node authorization and NodeRestriction: a node may not touch another Node.
    status, _ = api.request("PATCH", "/api/v1/nodes/cidr1/status",
                            {"metadata": {"annotations": {"x": "y"}}},
                            identity=api.node_identity("cidr0"), content_type=STRATEGIC,
                            check=False)
    assert status == 403
    api.delete_node("cidr1")
    with pytest.raises(KubeError) as gone:
        api.node("cidr1")
    assert gone.value.status == 404
    # Every key the API server wrote is under its own prefix in the tests' etcd.
    keys = [k for k in etcd.ctl("get", "--prefix", "/", "--keys-only").stdout.splitlines() if k]
    assert keys and all(k.startswith(api.etcd_prefix + "/") for k in keys), keys[:5]


def test_kubectl_as_admin(kube: tuple[Testbed, EtcdServer, KubeApi]) -> None:
    """kubectl, an independent client, sees what the API holds (here the Cloud SDK's kubectl,
    a newer client than the 1.19 server: it still lists and labels)."""
    bed, _, api = kube
    api.register_node("kubectl0", bed.add_host().underlay_ip)
    api.kubectl("label", "node", "kubectl0", "pool=test")
    listed = json.loads(api.kubectl("get", "nodes", "-l", "pool=test", "-o", "json").stdout)
    assert [n["metadata"]["name"] for n in listed["items"]] == ["kubectl0"]


def test_service_account_token_under_rbac(kube: tuple[Testbed, EtcdServer, KubeApi]) -> None:
    _, _, api = kube
    files = api.service_account_files("rbac-test", "reader")
    with open(files.namespace) as f:
        assert f.read() == "rbac-test"
    with open(files.ca_crt) as f, open(api.ca) as ca:
        assert f.read() == ca.read()
    identity = api.service_account_identity("rbac-test", "reader", files.token_value())
    status, body = api.request("GET", "/api/v1/nodes", identity=identity, check=False)
    assert status == 403, body  # authenticated (not 401), not authorized yet
    api.bind_cluster_role("rbac-test-reader", "rbac-test", "reader", FLANNEL_RULES)
    wait_for(lambda: api.request("GET", "/api/v1/nodes", identity=identity,
                                 check=False)[0] == 200, 10, "nodes listed once bound")
    status, _ = api.request("GET", "/api/v1/namespaces/rbac-test/secrets", identity=identity,
                            check=False)
    assert status == 403


def test_restart_keeps_nodes_and_old_watch_gets_gone(kube: tuple[Testbed, EtcdServer, KubeApi]
                                                     ) -> None:
    bed, _, api = kube
    api.register_node("restart0", bed.add_host().underlay_ip)
    cidr = api.wait_pod_cidr("restart0")
    version = api.get("/api/v1/nodes")["metadata"]["resourceVersion"]
    api.restart()
    assert api.node("restart0")["spec"]["podCIDR"] == cidr
    # The watch cache starts again at etcd's current revision: a watch that resumes from a
    # version before the restart is told 410 Gone (an ERROR event), and must list again.
    with api.watch(f"/api/v1/nodes?watch=1&resourceVersion={version}"
                   "&allowWatchBookmarks=true&timeoutSeconds=5") as events:
        first = next(events)
    assert first["type"] == "ERROR" and first["object"]["code"] == 410, first
    # A watch from a fresh list's version sees what changes next.
    version = api.get("/api/v1/nodes")["metadata"]["resourceVersion"]
    with api.watch(f"/api/v1/nodes?watch=1&resourceVersion={version}"
                   "&allowWatchBookmarks=true&timeoutSeconds=10") as events:
        api.request("PATCH", "/api/v1/nodes/restart0", {"metadata": {"annotations": {"a": "b"}}},
                    content_type=STRATEGIC)
        event = next(e for e in events if e["type"] != "BOOKMARK")
    assert event["type"] == "MODIFIED"
    assert event["object"]["metadata"]["annotations"]["a"] == "b"


# A pod's view of its ServiceAccount: in a mount namespace of its own, a tmpfs on /run (which
# /var/run links to) and the account's files bound where client-go's in-cluster config reads
# them; then the command ($0 is the files' folder).
IN_CLUSTER_MOUNT = ('mount -t tmpfs tmpfs /run && mkdir -p "$SA" && '
                    'mount --bind "$0" "$SA" && exec "$@"')
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class KubeFlanneld(RealFlanneld):
    """flanneld v0.20.2 in kube mode on a host, for Node `node_name`: with `kubeconfig`, or
    with a pod's in-cluster config (`in_cluster`: its ServiceAccount's files, the API server in
    KUBERNETES_SERVICE_HOST/PORT, the node found from the Pod `pod` if given, else from
    NODE_NAME). network: the net-conf's keys besides Backend; flags: more of flanneld's."""

    def __init__(self, bed: Testbed, host: Host, node_name: str, kubeconfig: str | None,
                 backend: str, *, api: KubeApi | None = None,
                 in_cluster: ServiceAccountFiles | None = None,
                 pod: tuple[str, str] | None = None,
                 network: Mapping[str, object] = NETWORK, flags: Sequence[str] = ()) -> None:
        net_conf = os.path.join(bed.workdir, f"{host.netns}-net-conf.json")
        with open(net_conf, "w") as f:
            json.dump({**network, "Backend": {"Type": backend}}, f)
        subnet_file = os.path.join(bed.workdir, f"{host.netns}-flanneld.env")
        command = [REFERENCE_FLANNELD, "--kube-subnet-mgr", f"--net-config-path={net_conf}",
                   "--iface=eth0", f"--subnet-file={subnet_file}", *flags]
        environ = {"NODE_NAME": node_name} if pod is None else {
            "POD_NAMESPACE": pod[0], "POD_NAME": pod[1]}
        if kubeconfig is not None:
            command.append(f"--kubeconfig-file={kubeconfig}")
        else:
            assert in_cluster is not None and api is not None
            command = ["unshare", "--mount", "sh", "-c", IN_CLUSTER_MOUNT,
                       in_cluster.directory, *command]
            environ.update(SA=SERVICE_ACCOUNT_DIR, KUBERNETES_SERVICE_HOST=api.address,
                           KUBERNETES_SERVICE_PORT=str(api.port))
        LoggedDaemon.__init__(
            self, host, subnet_file, os.path.join(bed.workdir, f"{host.netns}-flanneld.log"),
            ["ip", "netns", "exec", host.netns, *command], environ)
        self.node_name = node_name


def flannel_annotations(api: KubeApi, name: str) -> dict[str, str]:
    annotations = api.node(name)["metadata"].get("annotations") or {}
    return {k.removeprefix(ANNOTATION): v for k, v in annotations.items()
            if k.startswith(ANNOTATION)}


def network_condition(api: KubeApi, name: str) -> dict[str, Any] | None:
    for condition in api.node(name).get("status", {}).get("conditions") or []:
        if condition["type"] == "NetworkUnavailable":
            return dict(condition)
    return None


def assert_flanneld_wrote(api: KubeApi, daemon: KubeFlanneld, cidr: str, backend_type: str,
                          backend_data: str, mtu: int) -> None:
    """The Node's flannel annotations (backend-data byte for byte), its NetworkUnavailable
    condition and subnet.env."""
    subnet = daemon.wait_subnet(timeout=30)
    network = ipaddress.IPv4Network(cidr)
    assert subnet == network
    assert daemon.subnet_env() == {
        "FLANNEL_NETWORK": CLUSTER_CIDR, "FLANNEL_SUBNET": f"{network.network_address + 1}/24",
        "FLANNEL_MTU": str(mtu), "FLANNEL_IPMASQ": "false"}
    condition = wait_for(lambda: network_condition(api, daemon.node_name), 20,
                         "NetworkUnavailable set")
    assert (condition["status"], condition["reason"]) == ("False", "FlannelIsUp"), condition
    annotations = flannel_annotations(api, daemon.node_name)
    assert annotations.keys() == {"kube-subnet-manager", "public-ip", "backend-type",
                                  "backend-data"}, annotations
    assert annotations["kube-subnet-manager"] == "true"
    assert annotations["public-ip"] == daemon.host.underlay_ip
    assert annotations["backend-type"] == backend_type
    assert annotations["backend-data"] == backend_data
    # flanneld adds to the kubelet's annotations, removes none.
    node_annotations = api.node(daemon.node_name)["metadata"]["annotations"]
    assert KUBELET_ANNOTATIONS.items() <= node_annotations.items()


@pytest.fixture
def flanneld_daemons() -> Iterator[list[KubeFlanneld]]:
    daemons: list[KubeFlanneld] = []
    yield daemons
    for daemon in daemons:
        daemon.stop()
        daemon.clean("flannel.1")


@pytest.mark.skipif(not os.path.exists(REFERENCE_FLANNELD),
                    reason=f"no reference flanneld at {REFERENCE_FLANNELD}")
def test_flanneld_vxlan_as_node_and_as_service_account(
        kube: tuple[Testbed, EtcdServer, KubeApi], flanneld_daemons: list[KubeFlanneld]) -> None:
    """Two flanneld, one with its node's kubelet certificate (the Node authorizer lets a node
    list and watch Nodes and patch its own Node's status) and one with a ServiceAccount token
    bound to kube-flannel.yml's ClusterRole: both write their annotations, the condition and
    subnet.env, and route to each other's podCIDR."""
    bed, _, api = kube
    by_node, by_account = bed.add_host(), bed.add_host()
    api.register_node("vx-node", by_node.underlay_ip)
    api.register_node("vx-account", by_account.underlay_ip)
    cidrs = {name: api.wait_pod_cidr(name) for name in ("vx-node", "vx-account")}
    account = api.service_account_files("kube-flannel", "flannel")
    api.bind_cluster_role("flannel", "kube-flannel", "flannel", FLANNEL_RULES)
    for host, name, kubeconfig in ((by_node, "vx-node", api.node_kubeconfig("vx-node")),
                                   (by_account, "vx-account", account.kubeconfig)):
        daemon = KubeFlanneld(bed, host, name, kubeconfig, "vxlan")
        flanneld_daemons.append(daemon)
        daemon.start()
    for daemon in flanneld_daemons:
        daemon.wait_subnet(timeout=30)
        mac = daemon.host.link("flannel.1")["address"]
        assert_flanneld_wrote(api, daemon, cidrs[daemon.node_name], "vxlan",
                              f'{{"VNI":1,"VtepMAC":"{mac}"}}', 1450)
    # Each routes the other's podCIDR through flannel.1, from the other's annotations.
    for daemon, peer in ((flanneld_daemons[0], "vx-account"), (flanneld_daemons[1], "vx-node")):
        wait_for(lambda d=daemon, p=peer: f"{cidrs[p]} via" in d.host.ip(
            "route", "show", "dev", "flannel.1").stdout, 10, f"a route to {peer}'s podCIDR")


@pytest.mark.skipif(not os.path.exists(REFERENCE_FLANNELD),
                    reason=f"no reference flanneld at {REFERENCE_FLANNELD}")
def test_flanneld_udp(kube: tuple[Testbed, EtcdServer, KubeApi],
                      flanneld_daemons: list[KubeFlanneld]) -> None:
    """The udp backend in kube mode: backend-type "" and backend-data null."""
    bed, _, api = kube
    host = bed.add_host()
    api.register_node("udp0", host.underlay_ip)
    cidr = api.wait_pod_cidr("udp0")
    daemon = KubeFlanneld(bed, host, "udp0", api.node_kubeconfig("udp0"), "udp")
    flanneld_daemons.append(daemon)
    daemon.start()
    assert_flanneld_wrote(api, daemon, cidr, "", "null", 1472)


@pytest.mark.skipif(not os.path.exists(REFERENCE_FLANNELD),
                    reason=f"no reference flanneld at {REFERENCE_FLANNELD}")
def test_flanneld_unbound_service_account_cannot_start(
        kube: tuple[Testbed, EtcdServer, KubeApi], flanneld_daemons: list[KubeFlanneld]) -> None:
    """A ServiceAccount with no role: its list of Nodes is forbidden, so flanneld waits for its
    informer's sync (up to 10 minutes) and writes nothing."""
    bed, _, api = kube
    host = bed.add_host()
    api.register_node("unbound0", host.underlay_ip)
    api.wait_pod_cidr("unbound0")
    account = api.service_account_files("kube-flannel", "unbound")
    daemon = KubeFlanneld(bed, host, "unbound0", account.kubeconfig, "vxlan")
    flanneld_daemons.append(daemon)
    daemon.start()
    wait_for(lambda: "is forbidden" in daemon.log(), 20, "a forbidden list logged")
    assert "Waiting 10m0s for node controller to sync" in daemon.log()
    assert not os.path.exists(daemon.subnet_file)
    assert flannel_annotations(api, "unbound0") == {}


@pytest.mark.skipif(not os.path.exists(REFERENCE_FLANNELD),
                    reason=f"no reference flanneld at {REFERENCE_FLANNELD}")
def test_flanneld_in_cluster_finds_its_node_from_its_pod(
        kube: tuple[Testbed, EtcdServer, KubeApi], flanneld_daemons: list[KubeFlanneld]) -> None:
    """As kube-flannel.yml runs it: no kubeconfig (the ServiceAccount's token and ca.crt at
    /var/run/secrets/kubernetes.io/serviceaccount, KUBERNETES_SERVICE_HOST/PORT), no NODE_NAME
    but POD_NAME and POD_NAMESPACE, whose Pod's spec.nodeName names the Node (pods get)."""
    bed, _, api = kube
    host = bed.add_host()
    api.register_node("pod0", host.underlay_ip)
    cidr = api.wait_pod_cidr("pod0")
    account = api.service_account_files("in-cluster", "flannel")
    api.bind_cluster_role("in-cluster-flannel", "in-cluster", "flannel", FLANNEL_RULES)
    api.request("POST", "/api/v1/namespaces/in-cluster/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kube-flannel-ds-pod0"},
        "spec": {"nodeName": "pod0", "serviceAccountName": "flannel",
                 "automountServiceAccountToken": False, "hostNetwork": True,
                 "containers": [{"name": "kube-flannel", "image": "flannel:v0.20.2"}]}})
    daemon = KubeFlanneld(bed, host, "pod0", None, "udp", api=api, in_cluster=account,
                          pod=("in-cluster", "kube-flannel-ds-pod0"))
    flanneld_daemons.append(daemon)
    daemon.start()
    assert_flanneld_wrote(api, daemon, cidr, "", "null", 1472)
    assert "Using the inClusterConfig" in daemon.log()
