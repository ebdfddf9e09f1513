"""`make demo`: a three-host pyflannel cluster in network namespaces, with traffic across it.

With `--subnet-mgr etcd` (the default): etcd on its own host, the paper's Figure 2 config (its udp
backend, or --backend vxlan or host-gw), pyflanneld on three hosts. With `--subnet-mgr kube`: the
real kube-apiserver and controller manager v1.19.0 (tests/kubeapi.py, the reference builds of
../shared/reference/) instead of the etcd config, three Nodes registered as kubelets register
them, and pyflanneld --kube-subnet-mgr on each as deploy/kube-pyflannel.yml runs it: its
ServiceAccount bound to the manifest's ClusterRole, the manifest's net-conf.json (its backend
replaced by --backend), --ip-masq. Either way, on each host a container attached by the `flannel`
CNI plugin from its FLANNEL_SUBNET, which delegates to the real `bridge` plugin. Then every
container pings every other, iperf3 runs between two of them, and the leases (in etcd, or on the
Nodes) and each subnet.env are shown. Everything is torn down at the end, also on failure.

With `--ipv6 dual` the network is dual-stack (the config's EnableIPv6 and IPv6Network): hosts
get IPv6 addresses on the underlay (2001:db8:0:1::/64), containers an address of each family,
and the pings go over both. `--ipv6 only` turns IPv4 off (EnableIPv4 false).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import yaml

from tests import kubeapi
from tests.cluster import FIGURE_2_CONFIG, PREFIX, Flanneld, put_config, stop_all
from tests.etcd import EtcdServer
from tests.flanneld import REPO
from tests.testbed import Testbed

MANIFEST = os.path.join(REPO, "deploy", "kube-pyflannel.yml")
ANNOTATIONS = "flannel.alpha.coreos.com/"
IPV6_NETWORK = "fd00:10::/48"  # the demo's IPv6Network, cut into /64s


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def iperf3(server: Flanneld, client: Flanneld, address: str, seconds: int) -> float:
    """TCP throughput from client's container to server's (at `address`), in Gbit/s."""
    listener = subprocess.Popen(["ip", "netns", "exec", server.host.container_netns,
                                 "iperf3", "-s", "-1", "-B", address],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            result = client.host.in_container("iperf3", "-c", address, "-t",
                                              str(seconds), "-J", check=False)
            # iperf3 may exit 0 with only an "error" in its report ("Connection refused").
            report = json.loads(result.stdout) if result.stdout.strip() else {}
            if result.returncode == 0 and "sum_received" in report.get("end", {}):
                return report["end"]["sum_received"]["bits_per_second"] / 1e9
            time.sleep(0.1)  # the server was not listening yet
        raise RuntimeError(f"iperf3 failed: {result.stdout[-500:]}")
    finally:
        listener.kill()
        listener.wait()


def kube_reference_missing() -> str | None:
    """What --subnet-mgr kube lacks here (the reference Kubernetes builds), or None."""
    wanted = [os.path.join(kubeapi.REFERENCE, os.path.basename(binary))
              for binary in (kubeapi.KUBE_APISERVER, kubeapi.KUBE_CONTROLLER_MANAGER)]
    missing = [path for path in wanted if not os.access(path, os.X_OK)]
    if not missing:
        return None
    return ("SUBNET_MGR=kube runs the real Kubernetes API server and controller manager: the "
            f"reference builds kube-apiserver-v1.19.0 and kube-controller-manager-v1.19.0 in "
            f"{kubeapi.REFERENCE}, which are not on this machine (missing: "
            f"{', '.join(missing)}). Run `make demo` with the etcd subnet manager instead, or put "
            "the builds there (../shared/reference/README.md says how they are built).")


def manifest(kind: str) -> dict:
    with open(MANIFEST) as f:
        return next(doc for doc in yaml.safe_load_all(f) if doc and doc["kind"] == kind)


class Etcd:
    """The subnet manager of `--subnet-mgr etcd`: the config in etcd, leases in its keyspace."""

    def __init__(self, bed: Testbed, etcd: EtcdServer, api: str, backend: str,
                 ipv6: str) -> None:
        self.bed, self.etcd, self.api, self.ipv6 = bed, etcd, api, ipv6
        self.config: dict[str, object] = dict(FIGURE_2_CONFIG)
        if backend != "udp":
            self.config["Backend"] = {"Type": backend}
        if ipv6 != "none":
            self.config.update(EnableIPv6=True, IPv6Network=IPV6_NETWORK)
        if ipv6 == "only":
            self.config["EnableIPv4"] = False
        self.network = str(self.config["Network"])
        put_config(etcd, api, self.config)
        say(f"config at {PREFIX}/config ({api} API): {json.dumps(self.config)}")

    def daemon(self) -> Flanneld:
        return Flanneld(self.bed, self.bed.add_host(ipv6=self.ipv6 != "none"), self.etcd,
                        self.api)

    def show_leases(self) -> None:
        say(f"leases in etcd ({self.api} keyspace)")
        for key, value in self.etcd.get_prefix(f"{PREFIX}/subnets/", self.api).items():
            print(f"    {key} = {value}")

    def stop(self) -> None:
        pass


class Kube:
    """The subnet manager of `--subnet-mgr kube`: the API server, Nodes with podCIDRs, and
    pyflanneld under the manifest's ServiceAccount and ClusterRole."""

    def __init__(self, bed: Testbed, etcd: EtcdServer, backend: str) -> None:
        self.bed = bed
        net_conf = json.loads(manifest("ConfigMap")["data"]["net-conf.json"])
        net_conf["Backend"] = {"Type": backend}
        self.network = net_conf["Network"]
        self.api = kubeapi.KubeApi(bed, etcd, cluster_cidr=self.network)
        try:
            say(f"kube-apiserver v1.19.0 at {self.api.server} (host {self.api.host.netns}, "
                f"stored in etcd), controller manager: nodeipam --cluster-cidr={self.network}")
            subject = manifest("ClusterRoleBinding")["subjects"][0]
            namespace, account = subject["namespace"], subject["name"]
            self.account = self.api.service_account_files(namespace, account)
            self.api.bind_cluster_role(manifest("ClusterRole")["metadata"]["name"], namespace,
                                       account, manifest("ClusterRole")["rules"])
            rules = "; ".join(f"{','.join(rule['resources'])} {','.join(rule['verbs'])}"
                              for rule in manifest("ClusterRole")["rules"])
            say(f"ServiceAccount {namespace}/{account} bound to deploy/kube-pyflannel.yml's "
                f"ClusterRole flannel ({rules})")
            self.net_conf = os.path.join(bed.workdir, "net-conf.json")
            with open(self.net_conf, "w") as f:
                json.dump(net_conf, f)
            say(f"net-conf.json: {json.dumps(net_conf)}")
            self.nodes: list[str] = []
        except BaseException:
            self.api.stop()
            raise

    def daemon(self) -> Flanneld:
        host = self.bed.add_host()
        name = f"node{len(self.nodes) + 1}"
        self.api.register_node(name, host.underlay_ip)
        if not self.nodes:
            say("waiting for the controller manager's first podCIDR (its node IPAM starts "
                "after 10 s)")
        cidr = self.api.wait_pod_cidr(name)
        self.nodes.append(name)
        say(f"Node {name} ({host.underlay_ip}) registered, podCIDR {cidr}")
        return Flanneld(self.bed, host, None, "", "--kube-subnet-mgr", "--ip-masq",
                        f"--kubeconfig-file={self.account.kubeconfig}",
                        f"--net-config-path={self.net_conf}", environ={"NODE_NAME": name})

    def show_leases(self) -> None:
        say("leases on the Nodes (spec.podCIDR and flannel's annotations)")
        for node in self.api.nodes():
            annotations = {key.removeprefix(ANNOTATIONS): value for key, value
                           in (node["metadata"].get("annotations") or {}).items()
                           if key.startswith(ANNOTATIONS)}
            conditions = {c["type"]: c["status"] for c in node["status"].get("conditions") or []}
            print(f"    {node['metadata']['name']} {node['spec'].get('podCIDR')} "
                  f"NetworkUnavailable={conditions.get('NetworkUnavailable')} "
                  f"{json.dumps(annotations, sort_keys=True)}")

    def stop(self) -> None:
        self.api.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--etcd-api", choices=["v3", "v2"], default="v3",
                        help="etcd's API for --subnet-mgr etcd")
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--backend", choices=["udp", "vxlan", "host-gw"],
                        help="udp, or vxlan with --ipv6 only (udp then sends over IPv6)")
    parser.add_argument("--subnet-mgr", choices=["etcd", "kube"], default="etcd",
                        help="where the subnets are: etcd, or the Kubernetes API")
    parser.add_argument("--ipv6", choices=["none", "dual", "only"], default="none",
                        help="IPv6 in the network: none, dual-stack, or IPv6 only")
    args = parser.parse_args()
    if args.subnet_mgr == "kube" and args.ipv6 != "none":
        print("demo: --ipv6 runs with the etcd subnet manager", file=sys.stderr)
        return 2
    if args.backend is None:
        args.backend = "vxlan" if args.ipv6 == "only" else "udp"
    if args.subnet_mgr == "kube" and (missing := kube_reference_missing()):
        print(f"demo: {missing}", file=sys.stderr)
        return 2

    started = time.monotonic()
    with Testbed() as bed:
        say(f"testbed: underlay bridge in namespace {bed.underlay}, hosts on 198.18.0.0/24")
        etcd = EtcdServer(bed)
        daemons: list[Flanneld] = []
        manager: Etcd | Kube | None = None
        try:
            say(f"etcd on {etcd.endpoint} (host {etcd.host.netns})")
            manager = (Etcd(bed, etcd, args.etcd_api, args.backend, args.ipv6)
                       if args.subnet_mgr == "etcd" else Kube(bed, etcd, args.backend))
            for _ in range(args.hosts):
                daemons.append(manager.daemon().start())
            say(f"started pyflanneld on {', '.join(d.host.netns for d in daemons)}")
            for daemon in daemons:
                key = "FLANNEL_SUBNET" if args.ipv6 != "only" else "FLANNEL_IPV6_SUBNET"
                daemon.wait_env_subnet(key, timeout=40)
                env = daemon.subnet_env()
                mtu = int(env["FLANNEL_MTU"])
                bed.add_container(daemon.host, env.get("FLANNEL_SUBNET"), mtu,
                                  network=manager.network,
                                  ipv6_subnet=env.get("FLANNEL_IPV6_SUBNET"),
                                  ipv6_network=env.get("FLANNEL_IPV6_NETWORK"))
                leased = " and ".join(env[k] for k in ("FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET")
                                      if k in env)
                addresses = " and ".join(a for a in (daemon.host.container_ip,
                                                     daemon.host.container_ipv6) if a)
                say(f"{daemon.host.netns} ({daemon.host.underlay_ip}) leased {leased}; "
                    f"container {daemon.host.container_netns} at {addresses} (CNI bridge, "
                    f"MTU {mtu})")
            for daemon in daemons:
                daemon.wait_log("subnet added", count=len(daemons) - 1, timeout=20)

            say("ping from every container to every other")
            failures = 0
            for src in daemons:
                for dst in daemons:
                    if dst is src:
                        continue
                    pairs = [(a, b) for a, b in (
                        (src.host.container_ip, dst.host.container_ip),
                        (src.host.container_ipv6, dst.host.container_ipv6)) if a and b]
                    for source, destination in pairs:
                        result = src.host.in_container("ping", "-c", "3", "-i", "0.2", "-W",
                                                       "2", destination, check=False)
                        summary = (result.stdout.strip().splitlines()[-1] if result.stdout
                                   else "")
                        ok = result.returncode == 0
                        failures += not ok
                        print(f"    {source:>12} -> {destination:<12} "
                              f"{'ok ' if ok else 'FAIL'} {summary}")

            server = daemons[1].host.container_ip or daemons[1].host.container_ipv6
            client = daemons[0].host.container_ip or daemons[0].host.container_ipv6
            assert server and client
            say(f"iperf3, 3 s of TCP from {client} to {server}, through pyflannel's "
                f"{args.backend} backend")
            print(f"    {iperf3(daemons[1], daemons[0], server, 3):.2f} Gbit/s")

            manager.show_leases()
            for daemon in daemons:
                say(f"{daemon.subnet_file}")
                with open(daemon.subnet_file) as f:
                    print("".join(f"    {line}" for line in f))
        finally:
            say("tearing down: pyflanneld (SIGTERM), "
                + ("the API server and controller manager, " if args.subnet_mgr == "kube" else "")
                + "etcd, namespaces")
            stop_all(daemons)
            if manager is not None:
                manager.stop()
            etcd.stop()
    say(f"done in {time.monotonic() - started:.0f} s"
        + (f"; {failures} ping pair(s) FAILED" if failures else ": every container reached "
           "every other"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
