"""control.subnet.kubenode: Nodes as leases, as flanneld v0.20.2's kube subnet manager reads and
writes them (../shared/kube-compat.md), and where it falls over, a NodeError instead."""

from __future__ import annotations

import datetime
import ipaddress
import json
from typing import Any

import pytest

from control.service.options import KUBE_ANNOTATION_PREFIX
from control.subnet.config import parse_config
from control.subnet.kubenode import (
    Annotations,
    NodeError,
    annotations_patch,
    is_lease,
    network_available_patch,
    node_lease,
    pod_subnet,
    wanted_annotations,
)
from control.subnet.lease import PeerLease, Subnets, decode_lease, encode_lease

KEYS = Annotations.for_prefix(KUBE_ANNOTATION_PREFIX)
NETWORK = parse_config(b'{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
DUAL = parse_config(b'{"Network": "10.244.0.0/16", "EnableIPv6": true, '
                         b'"IPv6Network": "fd00::/48", "Backend": {"Type": "vxlan"}}')
ONLY6 = parse_config(b'{"EnableIPv4": false, "EnableIPv6": true, '
                          b'"IPv6Network": "fd00::/48", "Backend": {"Type": "vxlan"}}')
V4 = Subnets(ipaddress.IPv4Network("10.244.3.0/24"))
V6 = ipaddress.IPv6Network("fd00:0:0:3::/64")
ME6 = ipaddress.IPv6Address("2001:db8::5")
VXLAN_DATA = '{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:00"}'


def node(name: str = "n1", *, cidrs: list[str] | None = None, cidr: str | None = None,
         annotations: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if cidr is not None:
        spec["podCIDR"] = cidr
    if cidrs is not None:
        spec["podCIDRs"] = cidrs
    metadata: dict[str, Any] = {"name": name}
    if annotations is not None:
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": spec}


def flannel(public_ip: str = "198.18.0.2", backend_type: str = "vxlan",
            backend_data: str = VXLAN_DATA) -> dict[str, str]:
    return {KEYS.subnet_manager: "true", KEYS.public_ip: public_ip,
            KEYS.backend_type: backend_type, KEYS.backend_data: backend_data}


@pytest.mark.parametrize(("prefix", "backend_type_key"), [
    ("flannel.alpha.coreos.com", "flannel.alpha.coreos.com/backend-type"),
    ("org.com/9", "org.com/9-backend-type"),
    ("org.com/", "org.com/backend-type"),
    ("a.b.c/x-", "a.b.c/x-backend-type"),
])
def test_an_annotation_prefix_is_completed_as_flanneld_completes_it(
        prefix: str, backend_type_key: str) -> None:
    assert Annotations.for_prefix(prefix).backend_type == backend_type_key


@pytest.mark.parametrize(("prefix", "message"), [
    ("org", "prefix must be in a format: fqdn/[0-9a-z-_]*"),
    ("org.COM", "prefix must be in a format: fqdn/[0-9a-z-_]*"),
    ("a.b/c/d", "prefix can contain at most single slash"),
])
def test_a_bad_annotation_prefix_is_refused_with_flanneld_s_words(prefix: str,
                                                                 message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("*", r"\*")):
        Annotations.for_prefix(prefix)


def test_the_own_subnet_is_the_ipv4_pod_cidr_and_none_while_there_is_none() -> None:
    assert pod_subnet(node(cidr="10.244.3.0/24"), NETWORK) == V4
    # an IPv6 podCIDR is left alone where the config has no IPv6 (flanneld refuses the Node)
    assert pod_subnet(node(cidr="10.244.3.0/24", cidrs=["fd00:0:0:3::/64", "10.244.3.0/24"]),
                      NETWORK) == V4
    assert pod_subnet(node(), NETWORK) == Subnets(None)
    assert pod_subnet(node(cidrs=["fd00::/64"]), NETWORK) == Subnets(None)


def test_the_own_subnets_in_dual_stack_and_ipv6_only_are_the_pod_cidrs_of_each_family() -> None:
    both = node(cidrs=["10.244.3.0/24", "fd00:0:0:3::/64"])
    assert pod_subnet(both, DUAL) == Subnets(V4.ipv4, V6)
    assert pod_subnet(both, ONLY6) == Subnets(None, V6)
    assert pod_subnet(node(cidr="10.244.3.0/24"), DUAL) == V4  # no IPv6 one yet: waited for
    with pytest.raises(NodeError, match="IPv6Network doesn't contain 'fd01:0:0:3::/64'"):
        pod_subnet(node(cidrs=["10.244.3.0/24", "fd01:0:0:3::/64"]), DUAL)


def test_an_own_pod_cidr_outside_the_network_or_three_of_them_is_an_error() -> None:
    with pytest.raises(NodeError, match="doesn't contain '10.99.0.0/24' PodCIDR of the 'n1'"):
        pod_subnet(node(cidr="10.99.0.0/24"), NETWORK)
    with pytest.raises(NodeError, match="IPv4/IPv6 only or dualstack"):
        pod_subnet(node(cidrs=["10.244.1.0/24", "10.244.2.0/24", "fd00::/64"]), NETWORK)
    with pytest.raises(NodeError, match="invalid CIDR address: garbage"):
        pod_subnet(node(cidr="garbage"), NETWORK)


def test_a_peer_node_becomes_the_lease_an_etcd_key_would_hold() -> None:
    peer = node(cidrs=["10.244.7.0/24"], annotations=flannel())
    assert is_lease(peer, KEYS)
    name, value = node_lease(peer, KEYS)
    assert name == "10.244.7.0-24"
    assert value == encode_lease(ipaddress.IPv4Address("198.18.0.2"), "vxlan", VXLAN_DATA)
    assert value == (b'{"PublicIP":"198.18.0.2","PublicIPv6":null,"BackendType":"vxlan",'
                     b'"BackendData":{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:00"}}')


def test_a_udp_or_host_gw_node_has_no_backend_data() -> None:
    udp = node(cidr="10.244.8.0/24", annotations=flannel(backend_type="", backend_data="null"))
    assert node_lease(udp, KEYS)[1] == b'{"PublicIP":"198.18.0.2","PublicIPv6":null}'
    lease = decode_lease(node_lease(udp, KEYS)[1])
    assert lease.backend_type == "" and lease.backend_data is None


def test_nodes_that_are_no_lease_are_not_read_as_one() -> None:
    assert not is_lease(node(cidr="10.244.1.0/24"), KEYS)  # no annotations at all (818)
    assert not is_lease(node(cidr="10.244.1.0/24", annotations={}), KEYS)
    foreign = {KEYS.subnet_manager.replace("flannel.alpha", "other"): "true"}
    assert not is_lease(node(cidr="10.244.1.0/24", annotations=foreign), KEYS)
    assert not is_lease(node(annotations={KEYS.subnet_manager: "True"}), KEYS)


@pytest.mark.parametrize(("peer", "reason"), [
    (node(annotations=flannel()), "has no podCIDR"),
    (node(cidrs=["fd00:0:0:7::/64"], annotations=flannel()), "public-ipv6 None is not an IPv6"),
    (node(cidr="10.244.7.0/24", annotations=flannel(public_ip="fd00::7")),
     "is not an IPv4 address"),
    (node(cidr="10.244.7.0/24", annotations=flannel(public_ip="")), "is not an IPv4 address"),
    (node(cidr="10.244.7.0/24", annotations={KEYS.subnet_manager: "true"}),
     "is not an IPv4 address"),
    (node(cidr="not a cidr", annotations=flannel()), "invalid CIDR address"),
])
def test_a_node_flanneld_panics_on_is_an_error_that_says_why(peer: dict[str, Any],
                                                             reason: str) -> None:
    with pytest.raises(NodeError, match=reason):
        node_lease(peer, KEYS)


def test_a_dual_stack_peer_node_becomes_flanneld_s_dual_stack_lease() -> None:
    data6 = '{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:01"}'
    peer = node(cidrs=["10.244.7.0/24", "fd00:0:0:7::/64"], annotations={
        **flannel(), KEYS.public_ipv6: "2001:db8::2", KEYS.backend_v6_data: data6})
    name, value = node_lease(peer, KEYS)
    assert name == "10.244.7.0-24&fd00:0:0:7::-64"
    assert value == encode_lease(ipaddress.IPv4Address("198.18.0.2"), "vxlan", VXLAN_DATA,
                                 ipaddress.IPv6Address("2001:db8::2"), data6)
    # without public-ipv6 (flanneld drops the Node): a lease for IPv4, the watch says so
    lone = node(cidrs=["10.244.7.0/24", "fd00:0:0:7::/64"], annotations=flannel())
    assert decode_lease(node_lease(lone, KEYS)[1]).public_ipv6 is None
    # IPv6-only: PublicIP 0.0.0.0, as flanneld's zero address
    only = node(cidrs=["fd00:0:0:7::/64"], annotations={
        **flannel(public_ip="0.0.0.0", backend_type="host-gw", backend_data="null"),
        KEYS.public_ipv6: "2001:db8::2"})
    assert node_lease(only, KEYS) == ("0.0.0.0-0&fd00:0:0:7::-64", b'{"PublicIP":"0.0.0.0",'
                                      b'"PublicIPv6":"2001:db8::2","BackendType":"host-gw"}')


def test_the_own_dual_stack_node_announces_its_ipv6_as_flanneld_does() -> None:
    value = encode_lease(ipaddress.IPv4Address("198.18.0.5"), "host-gw", public_ipv6=ME6)
    wanted = wanted_annotations(node(annotations={}), KEYS, value)
    assert wanted == {KEYS.backend_type: "host-gw", KEYS.backend_data: "null",
                      KEYS.public_ip: "198.18.0.5", KEYS.backend_v6_data: "null",
                      KEYS.public_ipv6: "2001:db8::5", KEYS.subnet_manager: "true"}
    own = node(annotations={KEYS.public_ipv6_overwrite: "2001:db8::99"})
    assert wanted_annotations(own, KEYS, value)[KEYS.public_ipv6] == "2001:db8::99"
    assert decode_lease(value) == PeerLease(ipaddress.IPv4Address("198.18.0.5"), "host-gw",
                                            None, ME6)


def test_the_own_ipv6_only_vxlan_node_writes_no_ipv4_annotations_as_flanneld() -> None:
    value = encode_lease(None, "vxlan", None, ME6, VXLAN_DATA)
    assert wanted_annotations(node(annotations={}), KEYS, value) == {
        KEYS.backend_type: "vxlan", KEYS.backend_v6_data: VXLAN_DATA,
        KEYS.public_ipv6: "2001:db8::5", KEYS.subnet_manager: "true"}
    # host-gw writes them: its backend-data is always null
    value = encode_lease(None, "host-gw", public_ipv6=ME6)
    wanted = wanted_annotations(node(annotations={}), KEYS, value)
    assert (wanted[KEYS.backend_data], wanted[KEYS.public_ip]) == ("null", "0.0.0.0")


def test_backend_data_that_is_not_json_is_left_out_of_the_lease() -> None:
    peer = node(cidr="10.244.7.0/24", annotations=flannel(backend_data="{not json"))
    lease = decode_lease(node_lease(peer, KEYS)[1])
    assert lease.backend_type == "vxlan" and lease.backend_data is None


def test_the_own_node_gets_only_the_annotations_that_differ() -> None:
    value = encode_lease(ipaddress.IPv4Address("198.18.0.5"), "vxlan", VXLAN_DATA)
    fresh = node(cidr="10.244.5.0/24", annotations={"node.alpha.kubernetes.io/ttl": "0"})
    wanted = wanted_annotations(fresh, KEYS, value)
    assert wanted == {KEYS.backend_type: "vxlan", KEYS.backend_data: VXLAN_DATA,
                      KEYS.public_ip: "198.18.0.5", KEYS.subnet_manager: "true"}
    assert annotations_patch(fresh, wanted) == {"metadata": {"annotations": wanted}}
    done = node(cidr="10.244.5.0/24", annotations={**fresh["metadata"]["annotations"], **wanted})
    assert annotations_patch(done, wanted) is None
    moved = {**done["metadata"]["annotations"], KEYS.public_ip: "198.18.0.9"}
    assert annotations_patch(node(annotations=moved), wanted) == {
        "metadata": {"annotations": {KEYS.public_ip: "198.18.0.5"}}}


def test_udp_writes_an_empty_backend_type_and_null_data_as_flanneld_does() -> None:
    value = encode_lease(ipaddress.IPv4Address("198.18.0.5"))
    wanted = wanted_annotations(node(annotations={}), KEYS, value)
    assert wanted[KEYS.backend_type] == "" and wanted[KEYS.backend_data] == "null"


def test_a_public_ip_overwrite_is_what_the_node_announces() -> None:
    value = encode_lease(ipaddress.IPv4Address("198.18.0.5"))
    own = node(annotations={KEYS.public_ip_overwrite: "203.0.113.5"})
    assert wanted_annotations(own, KEYS, value)[KEYS.public_ip] == "203.0.113.5"


def test_the_network_available_condition_is_flanneld_s() -> None:
    now = datetime.datetime(2026, 12, 7, 5, 6, 7, 891, tzinfo=datetime.UTC)
    patch = network_available_patch(now)
    assert json.dumps(patch, separators=(",", ":")) == (
        '{"status":{"conditions":[{"type":"NetworkUnavailable","status":"False",'
        '"lastHeartbeatTime":"2026-12-07T05:06:07Z","lastTransitionTime":"2026-12-07T05:06:07Z",'
        '"reason":"FlannelIsUp","message":"Flannel is running on this node"}]}}')
