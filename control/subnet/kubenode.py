"""Kubernetes Nodes as flannel leases, the way flanneld v0.20.2's kube subnet manager reads and
writes them (subnet/kube/{kube,annotations}.go; ../shared/kube-compat.md): pure functions over a
Node's JSON, no client.

A Node is a lease when its `<prefix>kube-subnet-manager` annotation is "true": its subnets are
its podCIDRs (one per family), its PublicIP and PublicIPv6 the `<prefix>public-ip` and
`public-ipv6` annotations, its backend the `backend-type`, `backend-data` and `backend-v6-data`
annotations. Such a Node becomes the same (subnets key name, lease value) pair that an etcd key
holds, so that the watch and the backends read both subnet managers alike.

Where flanneld falls over (a Node with no annotations at all, a PublicIP of the other family, a
podCIDR outside the Network), these functions raise NodeError, and the caller logs it and skips
that Node. A Node without an IPv6 podCIDR or public-ipv6 in a dual-stack network, where flanneld
drops it or panics, is a lease for IPv4 (the watch logs it).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

from control.subnet.config import NetworkConfig
from control.subnet.lease import PeerLease, Subnets, decode_lease, encode_lease

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

    @property
    def backend_v6_data(self) -> str:
        return self.prefix + "backend-v6-data"

    @property
    def public_ipv6(self) -> str:
        return self.prefix + "public-ipv6"

    @property
    def public_ipv6_overwrite(self) -> str:
        return self.prefix + "public-ipv6-overwrite"


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


def _pod_cidrs(node: Node) -> Subnets:
    """The Node's podCIDR of each family (the last of each wins, as in flanneld). NodeError
    when it has more than two."""
    cidrs = _cidrs(node)
    if len(cidrs) > 2:
        raise NodeError(f"node {node_name(node)!r} pod cidrs should be IPv4/IPv6 only or "
                        "dualstack")
    ipv4 = ipv6 = None
    for text in cidrs:
        parsed = _network(text, node)
        if isinstance(parsed, ipaddress.IPv4Network):
            ipv4 = parsed
        else:
            ipv6 = parsed
    return Subnets(ipv4, ipv6)


def pod_subnet(node: Node, config: NetworkConfig) -> Subnets:
    """This host's subnets from its own Node (flanneld's AcquireLease): its podCIDR of each
    family the config enables, None for one the Node has not been given yet. NodeError when
    it has more than two, or one outside the Network or IPv6Network. An IPv6 podCIDR where the
    config has no IPv6 is left alone: flanneld refuses the whole Node then, whatever
    EnableIPv6 says, so that a dual-stack cluster cannot run an IPv4 flannel
    (kubernetes#112167)."""
    cidrs = _pod_cidrs(node)
    ipv4 = cidrs.ipv4 if config.enable_ipv4 else None
    ipv6 = cidrs.ipv6 if config.enable_ipv6 else None
    for subnet, network, key in ((ipv4, config.network, "net config"),
                                 (ipv6, config.ipv6_network, "net config's IPv6Network")):
        if subnet is not None and (network is None
                                   or not subnet.subnet_of(network)):  # type: ignore[arg-type]
            raise NodeError(f"subnet {str(network)!r} specified in the flannel {key} doesn't "
                            f"contain {str(subnet)!r} PodCIDR of the {node_name(node)!r} node")
    return Subnets(ipv4, ipv6)


def is_lease(node: Node, keys: Annotations) -> bool:
    """Whether a flannel daemon has made this Node a lease (flanneld ignores the others)."""
    return _annotations(node).get(keys.subnet_manager) == "true"


def _json_annotation(annotations: dict[str, Any], key: str) -> str | None:
    """A backend-data annotation as compact JSON; None when absent, `null` or not JSON."""
    data = annotations.get(key)
    if isinstance(data, str) and data != "null":
        try:
            return json.dumps(json.loads(data), separators=(",", ":"))
        except json.JSONDecodeError:
            return None
    return None


def node_lease(node: Node, keys: Annotations) -> tuple[str, bytes]:
    """A peer's Node as an etcd lease would hold it: (subnets key name, lease value), for a
    Node that is_lease(). Its subnets are its first podCIDR of each family (flanneld's
    nodeToLease); the value carries its public-ip, public-ipv6, backend-type, backend-data and
    backend-v6-data annotations. NodeError when the Node has no podCIDR, or its public-ip is
    not an IPv4 address where it has an IPv4 podCIDR (flanneld panics on both). A public-ipv6
    that is not an IPv6 address is left out (its IPv6 subnet is not routed then), where
    flanneld drops the Node. A backend-data that is not JSON is left out of the value, where
    flanneld's vxlan backend skips the lease and its udp backend routes it: so do ours."""
    annotations = _annotations(node)
    first: dict[int, ipaddress.IPv4Network | ipaddress.IPv6Network] = {}
    for text in _cidrs(node):
        parsed = _network(text, node)
        first.setdefault(parsed.version, parsed)
    subnets = Subnets(first.get(4), first.get(6))  # type: ignore[arg-type]
    if subnets.ipv4 is None and subnets.ipv6 is None:
        raise NodeError(f"node {node_name(node)!r} has no podCIDR")
    text = annotations.get(keys.public_ip)
    public_ip = None
    if subnets.ipv4 is not None or text not in (None, "", "0.0.0.0"):
        try:
            if not isinstance(text, str):
                raise ValueError(text)
            public_ip = ipaddress.IPv4Address(text)
        except ValueError:
            raise NodeError(f"node {node_name(node)!r}: annotation {keys.public_ip} {text!r} "
                            "is not an IPv4 address") from None
    text6 = annotations.get(keys.public_ipv6)
    try:
        public_ipv6 = ipaddress.IPv6Address(text6) if isinstance(text6, str) else None
    except ValueError:
        public_ipv6 = None
    if subnets.ipv4 is None and public_ipv6 is None:
        raise NodeError(f"node {node_name(node)!r}: annotation {keys.public_ipv6} {text6!r} is "
                        "not an IPv6 address")
    backend_type = annotations.get(keys.backend_type)
    if not isinstance(backend_type, str):
        backend_type = ""
    return subnets.name, encode_lease(
        public_ip, backend_type, _json_annotation(annotations, keys.backend_data), public_ipv6,
        _json_annotation(annotations, keys.backend_v6_data) if public_ipv6 else None)


def wanted_annotations(node: Node, keys: Annotations, lease_value: bytes) -> dict[str, str]:
    """The annotations this host's Node should carry for the backend's lease value, as
    flanneld's AcquireLease writes them: backend-type, backend-data (its JSON, `null` when the
    backend has none), public-ip (the public-ip-overwrite annotation where one is set), and
    kube-subnet-manager "true"; with a PublicIPv6 also backend-v6-data and public-ipv6 (or
    public-ipv6-overwrite), alike. An IPv6-only vxlan host (no IPv4 device, so no
    backend-data) writes neither backend-data nor public-ip, as flanneld skips its IPv4 block
    then (its host-gw one writes `null` and 0.0.0.0)."""
    lease: PeerLease = decode_lease(lease_value)
    current = _annotations(node)

    def overwritten(address: object, key: str) -> str:
        overwrite = current.get(key)
        return overwrite if isinstance(overwrite, str) and overwrite else str(address)

    wanted = {keys.backend_type: lease.backend_type}
    if not (lease.backend_type == "vxlan" and lease.backend_data is None):
        wanted[keys.backend_data] = ("null" if lease.backend_data is None
                                     else lease.backend_data)
        wanted[keys.public_ip] = overwritten(lease.public_ip or "0.0.0.0",
                                             keys.public_ip_overwrite)
    if lease.public_ipv6 is not None:
        wanted[keys.backend_v6_data] = ("null" if lease.backend_v6_data is None
                                        else lease.backend_v6_data)
        wanted[keys.public_ipv6] = overwritten(lease.public_ipv6, keys.public_ipv6_overwrite)
    wanted[keys.subnet_manager] = "true"
    return wanted


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
