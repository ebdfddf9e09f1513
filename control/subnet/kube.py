"""The Kubernetes API as a subnet manager (`--kube-subnet-mgr`), as flanneld v0.20.2 uses it: this
host's subnet is its Node's podCIDR, its lease the annotations it writes on its Node, its peers
the other Nodes that carry such annotations (kubenode.py reads and writes them).

KubeRegistry serves the same interface as etcd's registries to the watch: each Node that is a
lease is one entry named by its subnet, its value the lease an etcd key would hold, so the watch
and the backends read both alike. NodeLease takes the place of the etcd lease policy: there is
nothing to pick or renew, only a podCIDR to wait for and annotations to write.

Where flanneld falls over, this goes on: it waits for its Node and its podCIDR (saying so once)
where flanneld exits and crash-loops (flannel 728, 1344, 1558); a peer Node it cannot read is
logged once and skipped where flanneld panics (818, 1789, 2115); it lists in pages and keeps
only each Node's lease, with no event queue to fill (2252); a restarted API server or a broken
connection is a resumed watch, a 410 Gone a new listing, so no event is lost.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable

from control.subnet.config import ConfigError, NetworkConfig
from control.subnet.kubeclient import (
    KubeApiError,
    KubeClient,
    KubeConfigError,
    WatchExpired,
    find_api,
)
from control.subnet.kubenode import (
    Annotations,
    Node,
    NodeError,
    annotations_patch,
    is_lease,
    network_available_patch,
    node_lease,
    node_name,
    pod_subnet,
    wanted_annotations,
)
from control.subnet.lease import Subnets
from control.subnet.registry import Change, Entry, EtcdCounts, HistoryLostError, RegistryError

log = logging.getLogger("pyflanneld.kube")

LIST_PAGE = 50  # Nodes a listing holds at once (docs/kube-client.md: 44.7 MiB at 1000 Nodes)
WATCH_SECONDS = (300, 600)  # the server ends a watch after a random time in this range, as
                            # client-go's reflector asks; it is resumed where it ended
RETRY_SECONDS = 1.0


class KubeRegistry:
    """The Nodes as lease entries (subnet name, lease value), listed and watched; the network
    config from the file at --net-config-path."""

    def __init__(self, client: KubeClient, keys: Annotations, net_config_path: str,
                 pod: tuple[str, str] | None = None) -> None:
        """pod: (namespace, name) of this daemon's Pod, where it runs in one."""
        self.client = client
        self.pod = pod
        self.keys = keys
        self.config_source = net_config_path
        self.counts = EtcdCounts()  # the same counts, the API server's here
        # Each known Node's entry, or why it is none: a change is one only where this changes
        # (kubelets rewrite their Node's status all the time), and a problem is logged once.
        self._nodes: dict[str, Entry | str] = {}
        self._version = 0  # the last resourceVersion seen: of a listing, an event or a bookmark

    async def get_config(self) -> bytes:
        """The net-conf file, read again at every call (flanneld reads it once and exits on a
        problem; here the daemon logs it and asks again)."""
        try:
            with open(self.config_source, "rb") as f:
                return f.read()
        except OSError as err:
            raise ConfigError(f"failed to read net conf: {err}") from None

    async def list_subnets(self) -> tuple[list[Entry], int]:
        nodes: dict[str, Entry | str] = {}
        version = ""
        try:
            async for item in self.client.list_nodes(LIST_PAGE):
                if isinstance(item, str):
                    version = item
                else:
                    name = node_name(item)
                    nodes[name] = self._read(item, self._nodes.get(name))
        except KubeApiError as err:
            self.counts.failed("list_subnets")
            raise RegistryError(f"listing Nodes: {err}") from None
        self.counts.answered(self.client.server)
        self._nodes = nodes
        self._version = _version(version)
        return [entry for entry in nodes.values() if isinstance(entry, Entry)], self._version

    async def watch_subnets(self, after_revision: int) -> AsyncIterator[Change]:
        """Resumed by itself when the server ends a watch; HistoryLostError on 410 Gone (the
        API server restarted, or the version is compacted), RegistryError when it breaks."""
        self._version = max(self._version, after_revision)
        while True:
            try:
                async for kind, node in self.client.watch_nodes(
                        str(self._version), random.randint(*WATCH_SECONDS)):
                    version = _version(node.get("metadata", {}).get("resourceVersion", ""))
                    if kind == "BOOKMARK":
                        self._version = max(self._version, version)
                        continue
                    for change in self._changes(kind, node, version):
                        yield change
                    self._version = max(self._version, version)
            except WatchExpired as err:
                self.counts.failed("watch_subnets")
                raise HistoryLostError(str(err)) from None
            except KubeApiError as err:
                self.counts.failed("watch_subnets")
                raise RegistryError(str(err)) from None
            self.counts.answered(self.client.server)

    def _changes(self, kind: str, node: Node, version: int) -> list[Change]:
        name = node_name(node)
        old = self._nodes.get(name)
        new: Entry | str | None = None if kind == "DELETED" else self._read(node, old)
        if new is None:
            self._nodes.pop(name, None)
        else:
            self._nodes[name] = new
        if new == old:
            return []
        changes = []
        if isinstance(old, Entry) and not (isinstance(new, Entry) and new.name == old.name):
            changes.append(Change(old.name, None, version))  # gone, or its subnet moved
        if isinstance(new, Entry):
            changes.append(Change(new.name, new.value, version))
        return changes

    def _read(self, node: Node, old: Entry | str | None = None) -> Entry | str:
        """The Node's entry; else why it is none, logged when that reason is new."""
        if not is_lease(node, self.keys):
            return "no lease"  # not flannel's, or not yet: silently, as flanneld
        try:
            return Entry(*node_lease(node, self.keys))
        except NodeError as err:
            reason = str(err)
            if reason != old:
                log.warning("skipping node %s: %s", node_name(node), reason)
            return reason

    async def close(self) -> None:
        await self.client.close()


def _version(text: str) -> int:
    """A resourceVersion: opaque to clients, an etcd revision on every API server there is."""
    try:
        return int(text)
    except ValueError:
        raise RegistryError(f"resourceVersion {text!r} is not a number") from None


async def find_node_name(client: KubeClient, environ: dict[str, str]) -> str:
    """flanneld's order: NODE_NAME; else the Node of the Pod POD_NAMESPACE/POD_NAME."""
    if environ.get("NODE_NAME"):
        return environ["NODE_NAME"]
    pod, namespace = environ.get("POD_NAME"), environ.get("POD_NAMESPACE")
    if not pod or not namespace:
        raise KubeConfigError("env variables POD_NAME and POD_NAMESPACE must be set")
    return await client.pod_node_name(namespace, pod)


class NodeLease:
    """This host's lease in Kubernetes: its Node's podCIDR, announced by the annotations this
    writes on the Node (one strategic-merge PATCH of nodes/<name>/status, only of what
    differs) and, once the host serves it, the NetworkUnavailable condition set to False.
    Nothing expires: the lease lives as long as the Node. When the watch sees the Node's
    annotations differ or the Node gone, it is taken again: written again, or waited for."""

    def __init__(self, registry: KubeRegistry, node: str, config: NetworkConfig, value: bytes,
                 *, set_network_unavailable: bool) -> None:
        self._client = registry.client
        self._keys = registry.keys
        self._pod = registry.pod
        self.node = node
        self._config = config
        self._backend_value = value  # what the backend announces (etcd's lease value)
        self._set_network_unavailable = set_network_unavailable
        self._lost = asyncio.Event()
        self._said = ""  # the last reason for waiting that was logged
        self.subnet: Subnets | None = None
        self.value = value  # the lease as KubeRegistry reads this Node: the watch compares
        self.errors = 0  # failed requests to the API server

    @property
    def held(self) -> bool:
        return self.subnet is not None and not self._lost.is_set()

    def expires_in(self) -> float:
        return float("inf") if self.held else 0.0

    def lost(self) -> None:
        self._lost.set()

    def give_way(self) -> None:
        """The controller manager gives each Node its podCIDR: this host cannot take another."""
        log.error("node %s's podCIDR %s is another Node's too: its podCIDRs are the controller "
                  "manager's to change", self.node, self.subnet)

    async def acquire(self) -> Subnets:
        """The Node's podCIDR, once the Node and its podCIDR are there (waited for, said once
        in the log), with this host's annotations written."""
        while True:
            try:
                subnet = await self._try_acquire()
            except KubeApiError as err:
                self.errors += 1
                self._wait_said(f"the API server: {err}", logging.ERROR)
                subnet = None
            if subnet is not None:
                self._lost.clear()
                self.subnet = subnet
                self._said = ""
                return subnet
            await asyncio.sleep(RETRY_SECONDS)

    async def _try_acquire(self) -> Subnets | None:
        node = await self._client.get_node(self.node)
        if node is None:
            self._wait_said(f"node {self.node!r} is not registered yet")
            return None
        config = self._config
        try:
            subnet = pod_subnet(node, config)
        except NodeError as err:
            self._wait_said(str(err), logging.ERROR)
            return None
        if config.enable_ipv4 and subnet.ipv4 is None:
            self._wait_said(f"node {self.node!r} has no podCIDR yet (the controller manager "
                            "assigns them with --allocate-node-cidrs and --cluster-cidr)")
            return None
        if config.enable_ipv6 and subnet.ipv6 is None:
            self._wait_said(f"node {self.node!r} has no IPv6 podCIDR yet (the controller "
                            "manager assigns one of each family with --allocate-node-cidrs and "
                            "--cluster-cidr=<IPv4 CIDR>,<IPv6 CIDR>)")
            return None
        for cidr, length, key, flag in (
                (subnet.ipv4, config.subnet_len, "SubnetLen", "--node-cidr-mask-size-ipv4"),
                (subnet.ipv6, config.ipv6_subnet_len, "IPv6SubnetLen",
                 "--node-cidr-mask-size-ipv6")):
            if cidr is not None and cidr.prefixlen != length:
                self._wait_said(f"podCIDR {cidr} of node {self.node!r} is not a /{length}, the "
                                f"net-conf's {key}: set {key} to the controller manager's "
                                f"{flag}", logging.ERROR)
                return None
        wanted = wanted_annotations(node, self._keys, self._backend_value)
        patch = annotations_patch(node, wanted)
        if patch is not None:
            node = await self._client.patch_node_status(self.node, patch)
        self.value = node_lease(node, self._keys)[1]
        log.info("node %s: podCIDR %s, annotations %s", self.node, subnet,
                 "written" if patch is not None else "as they were")
        return subnet

    def _wait_said(self, reason: str, level: int = logging.INFO) -> None:
        if reason != self._said:
            log.log(level, "waiting for this host's lease: %s", reason)
            self._said = reason

    async def complete(self) -> None:
        """flanneld's CompleteLease, once subnet.env is written: the Node's NetworkUnavailable
        condition False (with --set-node-network-unavailable). Tried until it goes through."""
        if not self._set_network_unavailable:
            return
        while True:
            try:
                await self._client.patch_node_status(
                    self.node, network_available_patch(datetime.datetime.now(datetime.UTC)))
                return
            except KubeApiError as err:
                self.errors += 1
                log.error("setting NetworkUnavailable=False on node %s failed, trying again "
                          "in %gs: %s", self.node, RETRY_SECONDS, err)
                await asyncio.sleep(RETRY_SECONDS)

    async def leaving(self) -> bool:
        """Whether this daemon's Pod is being deleted (its DaemonSet removed or replaced, as
        by kube-flannel.yml applied over it, or its node drained), not restarted in place;
        without a Pod, or when the API server does not say, a stop is a restart."""
        if self._pod is None:
            return False
        try:
            pod = await self._client.get_pod(*self._pod)
        except KubeApiError as err:
            log.warning("cannot tell whether Pod %s/%s is deleted (%s): taking this stop for a "
                        "restart", *self._pod, err)
            return False
        return pod is None or bool(pod.get("metadata", {}).get("deletionTimestamp"))

    async def keep(self, on_change: Callable[[Subnets], Awaitable[None]]) -> None:
        """Take the lease again whenever it is lost. Runs until cancelled."""
        while True:
            await self._lost.wait()
            old = self.subnet
            log.warning("the annotations of node %s differ from this host's, or it is gone; "
                        "writing them again", self.node)
            new = await self.acquire()
            if new != old:
                await on_change(new)


async def open_kube(kubeconfig: str | None, api_url: str | None, prefix: str,
                    net_config_path: str, environ: dict[str, str] | None = None
                    ) -> tuple[KubeRegistry, str]:
    """The registry on the API server, and this host's Node name. KubeConfigError, ValueError
    (the annotation prefix) or KubeApiError (the Pod lookup) when there is none."""
    environ = dict(os.environ if environ is None else environ)
    keys = Annotations.for_prefix(prefix)
    client = KubeClient(find_api(kubeconfig, api_url, environ))
    try:
        node = await find_node_name(client, environ)
    except BaseException:
        await client.close()
        raise
    pod = (environ["POD_NAMESPACE"], environ["POD_NAME"]) if environ.get("POD_NAME") and \
        environ.get("POD_NAMESPACE") else None
    return KubeRegistry(client, keys, net_config_path, pod), node
