"""The network config: flanneld's defaults, overrides and every rejection rule."""

import ipaddress
import json

import pytest

from control.subnet.config import ConfigError, VxlanConfig, parse_config


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def ip(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def test_the_papers_figure_2_config() -> None:
    config = parse_config('{"Network": "10.0.0.0/8", "SubnetLen": 20, "SubnetMin": "10.10.0.0",'
                          ' "SubnetMax": "10.99.0.0", "Backend": {"Type": "udp", "Port": 7890}}')
    assert (config.network, config.subnet_len) == (net("10.0.0.0/8"), 20)
    assert (config.subnet_min, config.subnet_max) == (ip("10.10.0.0"), ip("10.99.0.0"))
    assert (config.backend_type, config.port) == ("udp", 7890)


def test_defaults_from_network_alone() -> None:
    config = parse_config('{"Network": "10.244.0.0/16"}')
    assert config.subnet_len == 24
    assert config.subnet_min == ip("10.244.1.0")      # the first subnet is skipped
    assert config.subnet_max == ip("10.244.255.0")
    assert (config.backend_type, config.port) == ("udp", 8285)


@pytest.mark.parametrize(("network", "subnet_len", "first", "last"), [
    ("10.0.0.0/22", 24, "10.0.1.0", "10.0.3.0"),       # /22 still gets /24s
    ("10.0.0.0/23", 25, "10.0.0.128", "10.0.1.128"),   # smaller: prefix + 2
    ("10.0.0.0/28", 30, "10.0.0.4", "10.0.0.12"),
    ("128.0.0.0/1", 24, "128.0.1.0", "255.255.255.0"),
])
def test_default_subnet_len_follows_the_network_size(network: str, subnet_len: int, first: str,
                                                     last: str) -> None:
    config = parse_config(f'{{"Network": "{network}"}}')
    assert (config.subnet_len, str(config.subnet_min), str(config.subnet_max)) == (
        subnet_len, first, last)


def test_go_decoding_rules() -> None:
    # Keys match case-insensitively, unknown keys are ignored, the last repeat wins, null is
    # "not set" for numbers, the Network is masked, and the backend type is lower-cased.
    config = parse_config('{"network": "10.1.2.3/16", "NETWORK": "10.5.0.0/16", "subnetlen": null,'
                          ' "Extra": [1, {"x": 2}], "backend": {"type": "UDP", "port": 9000}}')
    assert config.network == net("10.5.0.0/16")
    assert config.subnet_len == 24
    assert (config.backend_type, config.port) == ("udp", 9000)


def test_zero_subnet_min_and_max_mean_default() -> None:
    config = parse_config('{"Network": "10.244.0.0/16", "SubnetMin": "0.0.0.0",'
                          ' "SubnetMax": "0.0.0.0"}')
    assert (str(config.subnet_min), str(config.subnet_max)) == ("10.244.1.0", "10.244.255.0")


def test_alloc_backend_is_served() -> None:
    assert parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}}'
                        ).backend_type == "alloc"


def test_vxlan_keys_and_their_defaults() -> None:
    config = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "VXLAN"}}')
    assert config.backend_type == "vxlan"
    assert config.vxlan == VxlanConfig(vni=1, port=0, gbp=False, learning=False,
                                       direct_routing=False)
    # Go's decoder: any case, null leaves the default, unknown keys (later flannels' MTU and
    # MacPrefix among them) are ignored.
    config = parse_config('{"Network": "10.244.0.0/16", "Backend": {"type": "vxlan", "vni": 42,'
                          ' "PORT": 4789, "GBP": true, "Learning": null, "directrouting": true,'
                          ' "MTU": 1400, "MacPrefix": "0E:6A"}}')
    assert config.vxlan == VxlanConfig(vni=42, port=4789, gbp=True, learning=False,
                                       direct_routing=True)


@pytest.mark.parametrize(("port", "dst_port"), [
    (None, 0), (0, 0), (8472, 8472), (4789, 4789), (65535, 65535),
    # flanneld's netlink library sends uint16(Port) when Port > 0, else no port at all (the
    # kernel's default): flanneld v0.20.2's flannel.1 has dstport 4464 for 70000 and 8472
    # for -1 and for 65536.
    (70000, 4464), (65536, 0), (-1, 0), (-(1 << 63), 0)])
def test_any_vxlan_port_is_taken_as_flanneld_takes_it(port: int | None, dst_port: int) -> None:
    config = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Port": '
                          f'{json.dumps(port)}}}}}')
    assert config.vxlan is not None
    assert (config.vxlan.port, config.vxlan.dst_port) == (port or 0, dst_port)


def test_host_gw_has_no_keys_of_its_own() -> None:
    config = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw",'
                          ' "Port": "ignored"}}')
    assert (config.backend_type, config.vxlan) == ("host-gw", None)


def test_subnets_are_listed_lazily_in_order() -> None:
    config = parse_config('{"Network": "10.0.0.0/8", "SubnetLen": 30}')
    subnets = config.subnets()
    assert [str(next(subnets)) for _ in range(2)] == ["10.0.0.4/30", "10.0.0.8/30"]


@pytest.mark.parametrize(("text", "reason"), [
    ("", "invalid JSON"),
    ("{", "invalid JSON"),
    ('{"Network": "10.244.0.0/16",}', "invalid JSON"),
    ("[]", "cannot unmarshal array"),
    ("null", "cannot unmarshal null"),
    ("{}", "please define a correct Network"),
    ('{"Network": "0.0.0.0/0"}', "please define a correct Network"),
    ('{"SubnetLen": 24}', "please define a correct Network"),
    ('{"Network": null}', "invalid CIDR address: null"),
    ('{"Network": 10}', "invalid CIDR address"),
    ('{"Network": "10.244.0.0"}', "invalid CIDR address"),
    ('{"Network": "10.244.0.0/33"}', "invalid CIDR address"),
    ('{"Network": "fd00::/64"}', "not an IPv4 network"),
    ('{"Network": "10.244.0.0/16", "SubnetLen": 31}', "SubnetLen must be less than /31"),
    ('{"Network": "10.244.0.0/16", "SubnetLen": 17}', "at least four subnets"),
    ('{"Network": "10.244.0.0/16", "SubnetLen": -1}', "into uint"),
    ('{"Network": "10.244.0.0/16", "SubnetLen": 24.0}', "into uint"),
    ('{"Network": "10.244.0.0/16", "SubnetLen": "24"}', "into uint"),
    ('{"Network": "10.244.0.0/16", "SubnetLen": true}', "into uint"),
    ('{"Network": "10.0.0.0/29"}', "network is too small"),
    ('{"Network": "10.244.0.0/16", "SubnetMin": "10.245.0.0"}', "SubnetMin is not in the range"),
    ('{"Network": "10.244.0.0/16", "SubnetMax": "10.243.255.0"}',
     "SubnetMax is not in the range"),
    ('{"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.128"}',
     "SubnetMin is not on a SubnetLen boundary"),
    ('{"Network": "10.244.0.0/16", "SubnetMax": "10.244.9.1"}',
     "SubnetMax is not on a SubnetLen boundary"),
    ('{"Network": "10.244.0.0/16", "SubnetMin": "banana"}', "invalid IP address format"),
    ('{"Network": "10.244.0.0/16", "SubnetMin": null}', "invalid IP address format"),
    ('{"Network": "10.244.0.0/16", "EnableIPv6": true}', "IPv4 only"),
    ('{"Network": "10.244.0.0/16", "EnableIPv4": false}', "IPv4 only"),
    ('{"Network": "10.244.0.0/16", "EnableIPv4": "yes"}', "into bool"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "ipip"}}', "'ipip' is not served"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Port": 7890}}', "is not served"),
    ('{"Network": "10.244.0.0/16", "Backend": {}}', "is not served"),
    ('{"Network": "10.244.0.0/16", "Backend": null}', "is not served"),
    ('{"Network": "10.244.0.0/16", "Backend": "udp"}', "error decoding Backend"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": 1}}', "error decoding Backend"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": "80"}}',
     "error decoding UDP backend config"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": "1"}}',
     "error decoding VXLAN backend config: cannot unmarshal string"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 1.5}}',
     "error decoding VXLAN backend config"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 16777216}}',
     "VNI 16777216 is out of range"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": -1}}', "out of range"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Port": 9223372036854775808}}',
     "error decoding VXLAN backend config: cannot unmarshal number"),  # past a Go int
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "GBP": "yes"}}',
     "error decoding VXLAN backend config: GBP"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": 0}}', "not a UDP port"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": 65536}}', "not a UDP port"),
])
def test_rejections_say_why(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_config(text)


def test_bytes_that_are_not_utf8_are_rejected() -> None:
    with pytest.raises(ConfigError, match="invalid JSON"):
        parse_config(b'{"Network": "\xff"}')
