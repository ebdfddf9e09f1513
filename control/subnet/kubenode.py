"""Kubernetes Nodes as flannel leases, the way flanneld v0.20.2's kube subnet manager reads and
writes them (subnet/kube/{kube,annotations}.go; ../shared/kube-compat.md): pure functions over a
Node's JSON, no client.

A Node is a lease when its `<prefix>kube-subnet-manager` annotation is "true": its subnet is its
podCIDR, its PublicIP the `<prefix>public-ip` annotation, its backend the `backend-type` and
`backend-data` annotations. Such a Node becomes the same (subnet, lease value) pair that an etcd
key holds, so that the watch and the backends read both subnet managers alike.

Where flanneld falls over (a Node with no annotations at all, a PublicIP of the other family, a
podCIDR of IPv6 only or outside the Network), these functions raise NodeError, and the caller
logs it and skips that Node.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

from control.subnet.lease import PeerLease, decode_lease, encode_lease, subnet_name

# flanneld's check of the prefix once completed (annotations.go): unanchored at the start.
PREFIX_FORMAT = re.compile(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$")

Node = dict[str, Any]  # a Node object as the API serves it, decoded from JSON


class NodeError(ValueError):
    """A Node that cannot be read as a lease; the message says why."""


@dataclass(frozen=True)
class Annotations:
    """The annotation keys for one prefix, e.g. flannel.alpha.coreos.com/public-ip."""

    prefix: str  # as completed: ends in "/" or "-"

    @classmethod
    def for_prefix(cls, prefix: str) -> Annotations:
        """flanneld's newAnnotations: at most one "/", completed with "/" and then "-" as
        needed, then checked against its format. ValueError with flanneld's text."""
        if prefix.count("/") > 1:
            raise ValueError("subnet/kube: prefix can contain at most single slash")
        if "/" not in prefix:
            prefix += "/"
        if not prefix.endswith(("/", "-")):
            prefix += "-"
        if not PREFIX_FORMAT.search(prefix):
            raise ValueError("subnet/kube: prefix must be in a format: fqdn/[0-9a-z-_]*")
        return cls(prefix)

    @property
    def subnet_manager(self) -> str:
        return self.prefix + "kube-subnet-manager"

    @property
    def backend_type(self) -> str:
        return self.prefix + "backend-type"

    @property
    def backend_data(self) -> str:
        return self.prefix + "backend-data"

    @property
    def public_ip(self) -> str:
        return self.prefix + "public-ip"

    @property
    def public_ip_overwrite(self) -> str:
        return self.prefix + "public-ip-overwrite"


def node_name(node: Node) -> str:
    name = node.get("metadata", {}).get("name")
    return name if isinstance(name, str) else "?"


def _annotations(node: Node) -> dict[str, Any]:
    annotations = node.get("metadata", {}).get("annotations")
    return annotations if isinstance(annotations, dict) else {}


def _cidrs(node: Node) -> list[str]:
    """spec.podCIDRs, or spec.podCIDR alone where podCIDRs is empty (as flanneld reads them)."""
    spec = node.get("spec")
    if not isinstance(spec, dict):
        return []
    cidrs = spec.get("podCIDRs")
    if isinstance(cidrs, list) and cidrs:
        return [cidr for cidr in cidrs if isinstance(cidr, str)]
    single = spec.get("podCIDR")
    return [single] if isinstance(single, str) and single else []


def _network(text: str, node: Node) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        if "/" not in text:
            raise ValueError(text)
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise NodeError(f"node {node_name(node)!r}: invalid CIDR address: {text}") from None


def pod_subnet(node: Node, network: ipaddress.IPv4Network) -> ipaddress.IPv4Network | None:
    """This host's subnet from its own Node (flanneld's AcquireLease): the IPv4 podCIDR, None
    while the Node has none yet. NodeError when it has more than two, or one outside the
    Network; an IPv6 podCIDR beside it is left to the IPv6 work, where flanneld refuses the
    whole Node unless its config has an IPv6Network (kubernetes#112167)."""
    cidrs = _cidrs(node)
    if len(cidrs) > 2:
        raise NodeError(f"node {node_name(node)!r} pod cidrs should be IPv4/IPv6 only or "
                        "dualstack")
    subnet = None
    for text in cidrs:  # the last of each family wins, as in flanneld
        parsed = _network(text, node)
        if parsed.version == 4:
            subnet = parsed
    if subnet is not None and not subnet.subnet_of(network):
        raise NodeError(f"subnet {str(network)!r} specified in the flannel net config doesn't "
                        f"contain {str(subnet)!r} PodCIDR of the {node_name(node)!r} node")
    return subnet


def is_lease(node: Node, keys: Annotations) -> bool:
    """Whether a flannel daemon has made this Node a lease (flanneld ignores the others)."""
    return _annotations(node).get(keys.subnet_manager) == "true"


def node_lease(node: Node, keys: Annotations) -> tuple[str, bytes]:
    """A peer's Node as an etcd lease would hold it: (subnet key name, lease value), for a Node
    that is_lease(). Its subnet is its first IPv4 podCIDR (flanneld's nodeToLease); the value
    carries its public-ip, backend-type and backend-data annotations. NodeError when the Node
    has no IPv4 podCIDR, or its public-ip is not an IPv4 address (flanneld panics on both). A
    backend-data that is not JSON is left out of the value, where flanneld's vxlan backend
    skips the lease and its udp backend routes it: so do ours."""
    annotations = _annotations(node)
    subnet = next((parsed for parsed in (_network(text, node) for text in _cidrs(node))
                   if parsed.version == 4), None)
    if subnet is None:
        raise NodeError(f"node {node_name(node)!r} has no IPv4 podCIDR")
    text = annotations.get(keys.public_ip)
    try:
        if not isinstance(text, str):
            raise ValueError(text)
        public_ip = ipaddress.IPv4Address(text)
    except ValueError:
        raise NodeError(f"node {node_name(node)!r}: annotation {keys.public_ip} {text!r} is "
                        "not an IPv4 address") from None
    backend_type = annotations.get(keys.backend_type)
    if not isinstance(backend_type, str):
        backend_type = ""
    data = annotations.get(keys.backend_data)
    backend_data = None
    if isinstance(data, str) and data != "null":
        try:
            backend_data = json.dumps(json.loads(data), separators=(",", ":"))
        except json.JSONDecodeError:
            backend_data = None
    return subnet_name(subnet), encode_lease(public_ip, backend_type, backend_data)


def wanted_annotations(node: Node, keys: Annotations, lease_value: bytes) -> dict[str, str]:
    """The annotations this host's Node should carry for the backend's lease value, as
    flanneld's AcquireLease writes them: backend-type, backend-data (its JSON, `null` when the
    backend has none), public-ip (the public-ip-overwrite annotation where one is set), and
    kube-subnet-manager "true"."""
    lease: PeerLease = decode_lease(lease_value)
    public_ip = str(lease.public_ip)
    overwrite = _annotations(node).get(keys.public_ip_overwrite)
    if isinstance(overwrite, str) and overwrite:
        public_ip = overwrite
    return {keys.backend_type: lease.backend_type,
            keys.backend_data: "null" if lease.backend_data is None else lease.backend_data,
            keys.public_ip: public_ip,
            keys.subnet_manager: "true"}


def annotations_patch(node: Node, wanted: dict[str, str]) -> dict[str, Any] | None:
    """The strategic-merge patch of nodes/<name>/status that flanneld sends: only the
    annotations that differ; None when none does (no request then)."""
    current = _annotations(node)
    changed = {key: value for key, value in wanted.items() if current.get(key) != value}
    return {"metadata": {"annotations": changed}} if changed else None


def network_available_patch(now: datetime.datetime) -> dict[str, Any]:
    """flanneld's CompleteLease: the NetworkUnavailable condition False, reason FlannelIsUp,
    both times now (RFC 3339, seconds, UTC), merged into the conditions by its type."""
    stamp = now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"status": {"conditions": [{
        "type": "NetworkUnavailable", "status": "False", "lastHeartbeatTime": stamp,
        "lastTransitionTime": stamp, "reason": "FlannelIsUp",
        "message": "Flannel is running on this node"}]}}
