"""The network config: flanneld's defaults, overrides and every rejection rule, for IPv4 and
IPv6; the IPv6 and family cases also through flanneld v0.20.2 (../shared/reference/), whose
verdict and message pyflanneld's must be, where that build is present."""

import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass

import pytest

from control.subnet.config import (
    ConfigError,
    VxlanConfig,
    go_ip6_text,
    go_ip6net_text,
    parse_config,
)
from tests.cluster import put_config
from tests.etcd import EtcdServer
from tests.flanneld import REFERENCE_FLANNELD
from tests.testbed import Host, Testbed, end_process

needs_flanneld = pytest.mark.skipif(not os.path.exists(REFERENCE_FLANNELD),
                                    reason=f"no reference flanneld at {REFERENCE_FLANNELD}")


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
    ('{"Network": "10.244.0.0/16", "SubnetLen": -1}',
     "^json: cannot unmarshal number -1 into Go struct field Config.SubnetLen of type uint$"),
    ('{"Network": "10.244.0.0/16", "SubnetLen": 24.0}', "number 24.0 into .* of type uint"),
    ('{"Network": "10.244.0.0/16", "SubnetLen": -0}', "number -0 into .* of type uint"),
    ('{"Network": "10.244.0.0/16", "SubnetLen": "24"}', "string into .* of type uint"),
    ('{"Network": "10.244.0.0/16", "SubnetLen": true}', "bool into .* of type uint"),
    ('{"Network": "10.0.0.0/29"}', "network is too small"),
    ('{"Network": "10.244.0.0/16", "SubnetMin": "10.245.0.0"}', "SubnetMin is not in the range"),
    ('{"Network": "10.244.0.0/16", "SubnetMax": "10.243.255.0"}',
     "SubnetMax is not in the range"),
    ('{"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.128"}',
     "SubnetMin is not on a SubnetLen boundary"),
    ('{"Network": "10.244.0.0/16", "SubnetMax": "10.244.9.1"}',
     "SubnetMax is not on a SubnetLen boundary"),
    ('{"Network": "10.244.0.0/16", "SubnetMin": "banana"}', "Invalid IP address format"),
    ('{"Network": "10.244.0.0/16", "SubnetMin": null}', "Invalid IP address format"),
    ('{"Network": "10.244.0.0/16", "EnableIPv4": "yes"}',
     "^json: cannot unmarshal string into Go struct field Config.EnableIPv4 of type bool$"),
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
     "^error decoding VXLAN backend config: json: cannot unmarshal string into Go struct "
     "field .GBP of type bool$"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": 0}}', "not a UDP port"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": 65536}}', "not a UDP port"),
])
def test_rejections_say_why(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_config(text)


def test_bytes_that_are_not_utf8_are_rejected() -> None:
    with pytest.raises(ConfigError, match="invalid JSON"):
        parse_config(b'{"Network": "\xff"}')


# ---- IPv6 and the two families ----------------------------------------------------------------

def net6(text: str) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(text)


def ip6(text: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(text)


def test_flannels_ipv6_defaults_test_case() -> None:
    """flannel's own subnet/config_test.go TestIPv6ConfigDefaults, with its lower-case keys."""
    config = parse_config('{"enableIPv6": true, "ipv6Network": "fc00::/48", "enableIPv4": false}')
    assert (config.enable_ipv4, config.enable_ipv6) == (False, True)
    assert (config.ipv6_network, config.ipv6_subnet_len) == (net6("fc00::/48"), 64)
    assert (config.ipv6_subnet_min, config.ipv6_subnet_max) == (ip6("fc00:0:0:1::"),
                                                                ip6("fc00:0:0:ffff::"))
    # IPv4 off: flanneld's zero values, and no IPv4 subnet fits or is listed.
    assert (config.network, config.subnet_len) == (None, 0)
    assert (config.subnet_min, config.subnet_max) == (ip("0.0.0.0"), ip("0.0.0.0"))
    assert not config.subnet_fits(net("10.244.1.0/24"))
    assert list(config.subnets()) == []


def test_flannels_ipv6_overrides_test_case() -> None:
    config = parse_config('{"EnableIPv6": true, "IPv6Network": "fc00::/48", "IPv6SubnetMin": '
                          '"fc00:0:0:1::", "IPv6SubnetMax": "fc00:0:0:f::", "IPv6SubnetLen": 124,'
                          ' "enableIPv4": false}')
    assert config.ipv6_subnet_len == 124
    assert (str(config.ipv6_subnet_min), str(config.ipv6_subnet_max)) == ("fc00:0:0:1::",
                                                                          "fc00:0:0:f::")


@pytest.mark.parametrize(("network", "subnet_len", "first", "last"), [
    ("fc00::/62", 64, "fc00:0:0:1::", "fc00:0:0:3::"),     # /62 still gets /64s
    ("fc00::/63", 65, "fc00::8000:0:0:0", "fc00:0:0:1:8000::"),  # smaller: prefix + 2
    ("fc00::/124", 126, "fc00::4", "fc00::c"),
    ("fc00::1:2:3/16", 64, "fc00:0:0:1::", "fc00:ffff:ffff:ffff::"),  # masked
])
def test_default_ipv6_subnet_len_follows_the_network_size(network: str, subnet_len: int,
                                                          first: str, last: str) -> None:
    config = parse_config('{"Network": "10.244.0.0/16", "EnableIPv6": true, '
                          f'"IPv6Network": "{network}"}}')
    assert (config.ipv6_subnet_len, str(config.ipv6_subnet_min),
            str(config.ipv6_subnet_max)) == (subnet_len, first, last)
    # Dual-stack: the IPv4 part is what it is alone.
    assert (config.network, config.subnet_len) == (net("10.244.0.0/16"), 24)


def test_ipv4_only_by_default_with_the_ipv6_keys_decoded_but_unused() -> None:
    # IPv6SubnetLen 127 would be refused with EnableIPv6: off, it is not checked.
    config = parse_config('{"Network": "10.244.0.0/16", "IPv6Network": "fc00::/48",'
                          ' "IPv6SubnetLen": 127}')
    assert (config.enable_ipv4, config.enable_ipv6) == (True, False)
    assert (config.ipv6_network, config.ipv6_subnet_len) == (None, 0)
    assert (config.ipv6_subnet_min, config.ipv6_subnet_max) == (None, None)
    assert list(config.ipv6_subnets()) == []
    # flanneld's isIPv6SubnetConfigCompat: without IPv6 only a lease without an IPv6 part fits.
    assert config.ipv6_subnet_fits(None)
    assert not config.ipv6_subnet_fits(net6("fc00:0:0:1::/64"))


def test_ipv6_subnets_fit_and_are_listed_lazily_in_order() -> None:
    config = parse_config('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fc00::/16",'
                          ' "IPv6SubnetLen": 126}')
    subnets = config.ipv6_subnets()  # 2^110 of them: lazily
    assert [str(next(subnets)) for _ in range(2)] == ["fc00::4/126", "fc00::8/126"]
    assert config.ipv6_subnet_fits(net6("fc00::4/126"))
    assert config.ipv6_subnet_fits(net6("fc00:ffff:ffff:ffff:ffff:ffff:ffff:fffc/126"))
    assert not config.ipv6_subnet_fits(net6("fc00::/126"))        # below IPv6SubnetMin
    assert not config.ipv6_subnet_fits(net6("fc01::/126"))        # above IPv6SubnetMax
    assert not config.ipv6_subnet_fits(net6("fc00::/64"))         # not IPv6SubnetLen
    assert not config.ipv6_subnet_fits(None)                      # a lease without IPv6


def test_ipv6_go_decoding_rules() -> None:
    # Case-insensitive keys, the last repeat wins, null or :: for IPv6SubnetMin/Max is the
    # default (a Go pointer), null for a bool leaves it as it was, Networks and IPv6Networks
    # are kept as given.
    config = parse_config('{"network": "10.244.0.0/16", "ENABLEIPV6": true, "enableipv6": null,'
                          ' "ipv6network": "fd00::/56", "IPv6Network": "fc00::/48",'
                          ' "IPv6SubnetMin": "fc00:0:0:2::", "ipv6subnetmin": null,'
                          ' "IPv6SubnetMax": "::", "Networks": ["10.1.0.0/16"],'
                          ' "IPv6Networks": ["fd00::1/64"]}')
    assert config.enable_ipv6 and config.ipv6_network == net6("fc00::/48")
    assert (str(config.ipv6_subnet_min), str(config.ipv6_subnet_max)) == ("fc00:0:0:1::",
                                                                          "fc00:0:0:ffff::")
    assert (config.networks, config.ipv6_networks) == ((net("10.1.0.0/16"),),
                                                       (net6("fd00::/64"),))


def test_ipv4_checks_are_skipped_without_ipv4() -> None:
    config = parse_config('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fc00::/48",'
                          ' "Network": "10.0.0.0/30", "SubnetLen": 31}')
    assert (config.network, config.subnet_len, config.ipv6_subnet_len) == (None, 0, 64)


def test_go_text_of_ipv6_addresses() -> None:
    # Python's text, but for what Go's net.IP prints dotted: IPv4-mapped addresses, and the
    # 4-byte integers flannel's ip.IP6 turns into a 4-byte net.IP.
    assert go_ip6_text(ip6("fc00:0:0:5::")) == "fc00:0:0:5::"
    assert go_ip6_text(ip6("::")) == "::"
    assert go_ip6_text(ip6("::ffff:a00:1")) == "10.0.0.1"
    assert go_ip6_text(ip6("::a00:1")) == "10.0.0.1"
    assert go_ip6_text(ip6("::ff:ffff")) == "::ff:ffff"            # 3 bytes: IPv6 text
    assert go_ip6_text(ip6("::1:0:0")) == "::1:0:0"                # 5 bytes: IPv6 text
    assert go_ip6net_text(net6("2001:cafe:42::/56")) == "2001:cafe:42::/56"


@pytest.mark.parametrize(("text", "reason"), [
    # Go's other family: flanneld makes an IPv4-mapped network no lease is in (an IPv4
    # IPv6Network) or panics (an IPv6 element of Networks); both are refused here.
    ('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "10.0.0.0/8"}',
     "IPv6Network: 10.0.0.0/8 is not an IPv6 network"),
    ('{"Network": "10.244.0.0/16", "Networks": ["fd00::/64"]}',
     "Networks: fd00::/64 is not an IPv4 network"),
    ('{"Network": "10.244.0.0/16", "IPv6Networks": ["10.1.0.0/16"]}',
     "IPv6Networks: 10.1.0.0/16 is not an IPv6 network"),
])
def test_the_other_family_is_refused(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=f"^{reason}$"):
        parse_config(text)


# ---- the same configs through flanneld v0.20.2 --------------------------------------------------

V4 = '"Network": "10.244.0.0/16", '
V6 = '"EnableIPv6": true, "IPv6Network": "fc00::/48"'
# Configs whose verdict and message pyflanneld and flanneld must share: None where both take
# it, else flanneld's message (pyflanneld's is the same, maybe with the key before it and the
# value after it, or for "none defined stack" why).
DIFFERENTIAL_CASES: dict[str, tuple[str, str | None]] = {
    "dual-stack defaults": (f'{{{V4}{V6}}}', None),
    "IPv6 only": ('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fc00::/48"}', None),
    "flannel's overrides test": (
        '{"EnableIPv6": true, "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc00:0:0:1::",'
        ' "IPv6SubnetMax": "fc00:0:0:f::", "IPv6SubnetLen": 124, "enableIPv4": false}', None),
    "lower-case keys, unmasked network": (
        '{"network": "10.244.0.0/16", "enableipv6": true, "ipv6network": "fc00::1/48"}', None),
    "/124 network, /126 subnets": (f'{{{V4}"EnableIPv6": true, "IPv6Network": "fc00::/124"}}',
                                   None),
    "IPv4 keys unchecked without IPv4": (
        '{"EnableIPv4": false, "SubnetLen": 31, "Network": "10.0.0.0/30", ' + V6 + '}', None),
    "IPv6 keys unchecked without IPv6": (f'{{{V4}"IPv6SubnetLen": 127, "IPv6SubnetMin": "::1"}}',
                                         None),
    "null and :: are the default min and max": (
        f'{{{V4}{V6}, "IPv6SubnetMin": "fc00:0:0:9::", "IPv6SubnetMin": null,'
        ' "IPv6SubnetMax": "::"}', None),
    "Networks and IPv6Networks": (
        f'{{{V4}{V6}, "Networks": ["10.1.0.0/16"], "IPv6Networks": ["fd00::/64"]}}', None),
    "null EnableIPv6 keeps the default": (f'{{{V4}"EnableIPv6": null}}', None),
    "no IPv6Network": (f'{{{V4}"EnableIPv6": true}}',
                       "please define a correct IPv6Network parameter in the flannel config"),
    "::/0": (f'{{{V4}"EnableIPv6": true, "IPv6Network": "::/0"}}',
             "please define a correct IPv6Network parameter in the flannel config"),
    "no prefix length": (f'{{{V4}"EnableIPv6": true, "IPv6Network": "fc00::"}}',
                         "invalid CIDR address: fc00::"),
    "null IPv6Network": (f'{{{V4}"EnableIPv6": true, "IPv6Network": null}}',
                         "invalid CIDR address: null"),
    "bad IPv6Network without IPv6": (f'{{{V4}"IPv6Network": "banana/64"}}',
                                     "invalid CIDR address: banana/64"),
    "IPv6SubnetLen 127": (f'{{{V4}{V6}, "IPv6SubnetLen": 127}}',
                          "SubnetLen must be less than /127"),
    "three subnets": (f'{{{V4}{V6}, "IPv6SubnetLen": 49}}',
                      "network must be able to accommodate at least four subnets"),
    "/125 network": (f'{{{V4}"EnableIPv6": true, "IPv6Network": "fc00::/125"}}',
                     "IPv6Network is too small. Minimum useful network prefix is /124"),
    "min outside": (f'{{{V4}{V6}, "IPv6SubnetMin": "fc01::"}}',
                    "IPv6SubnetMin is not in the range of the IPv6Network"),
    "max outside": (f'{{{V4}{V6}, "IPv6SubnetMax": "fb00::"}}',
                    "IPv6SubnetMax is not in the range of the IPv6Network"),
    "min off the boundary": (f'{{{V4}{V6}, "IPv6SubnetMin": "fc00:0:0:1::1"}}',
                             "IPv6SubnetMin is not on a SubnetLen boundary: fc00:0:0:1::1"),
    "max off the boundary": (f'{{{V4}{V6}, "IPv6SubnetMax": "fc00:0:0:7:8000::"}}',
                             "IPv6SubnetMax is not on a SubnetLen boundary: fc00:0:0:7:8000::"),
    "Go prints a 4-byte IP6 dotted": (
        f'{{{V4}"EnableIPv6": true, "IPv6Network": "::/96", "IPv6SubnetMin": "::a00:1"}}',
        "IPv6SubnetMin is not on a SubnetLen boundary: 10.0.0.1"),
    "IPv4 text is IPv4-mapped": (
        f'{{{V4}"EnableIPv6": true, "IPv6Network": "::ffff:0:0/96", "IPv6SubnetLen": 100,'
        ' "IPv6SubnetMax": "10.0.0.1"}', "IPv6SubnetMax is not on a SubnetLen boundary: 10.0.0.1"),
    "min not an address": (f'{{{V4}{V6}, "IPv6SubnetMin": "banana"}}',
                           "Invalid IP address format"),
    "min with a zone": (f'{{{V4}{V6}, "IPv6SubnetMin": "fc00:0:0:1::%eth0"}}',
                        "Invalid IP address format"),
    "IPv6SubnetLen a string": (
        f'{{{V4}{V6}, "IPv6SubnetLen": "64"}}',
        "json: cannot unmarshal string into Go struct field Config.IPv6SubnetLen of type uint"),
    "IPv6SubnetLen negative": (
        f'{{{V4}{V6}, "IPv6SubnetLen": -64}}',
        "json: cannot unmarshal number -64 into Go struct field Config.IPv6SubnetLen of type "
        "uint"),
    "IPv6SubnetLen a fraction": (
        f'{{{V4}{V6}, "IPv6SubnetLen": 64.50}}',
        "json: cannot unmarshal number 64.50 into Go struct field Config.IPv6SubnetLen of type "
        "uint"),
    "EnableIPv6 a string": (
        f'{{{V4}"EnableIPv6": "true", "IPv6Network": "fc00::/48"}}',
        "json: cannot unmarshal string into Go struct field Config.EnableIPv6 of type bool"),
    "EnableIPv4 a number": (
        f'{{{V4}"EnableIPv4": 1}}',
        "json: cannot unmarshal number into Go struct field Config.EnableIPv4 of type bool"),
    "Networks a string": (
        f'{{{V4}"Networks": "10.1.0.0/16"}}',
        "json: cannot unmarshal string into Go struct field Config.Networks of type []ip.IP4Net"),
    "IPv6Networks an object": (
        f'{{{V4}"IPv6Networks": {{"a": 1}}}}',
        "json: cannot unmarshal object into Go struct field Config.IPv6Networks of type "
        "[]ip.IP6Net"),
    "bad IPv6Networks element": (f'{{{V4}"IPv6Networks": ["fd00::/64", "bogus"]}}',
                                 "invalid CIDR address: bogus"),
    "no family": ('{"EnableIPv4": false, "EnableIPv6": false}', "none defined stack"),
    "no family, the last repeat winning": (
        '{"EnableIPv4": false, "EnableIPv4": null, "Network": "banana/8"}',
        "invalid CIDR address: banana/8"),
    "no family after null": ('{"EnableIPv4": false, "EnableIPv4": null}', "none defined stack"),
    "the IPv4 checks come first": ('{"Network": "10.0.0.0/8", "SubnetLen": 31, "EnableIPv6": true}',
                                   "SubnetLen must be less than /31"),
    "a parser's error beats an earlier type error": (
        f'{{{V4}"IPv6SubnetLen": "x", "EnableIPv6": true, "IPv6Network": "bogus"}}',
        "invalid CIDR address: bogus"),
    "an earlier repeat's parser error": (
        f'{{{V4}"EnableIPv6": true, "IPv6Network": "bogus/1", "IPv6Network": "fc00::/48"}}',
        "invalid CIDR address: bogus/1"),
    "IPv4: no Network": ('{"SubnetLen": 24}',
                         "please define a correct Network parameter in the flannel config"),
    "IPv4: SubnetMin not an address": ('{"Network": "10.244.0.0/16", "SubnetMin": "banana"}',
                                       "Invalid IP address format"),
    "IPv4: SubnetLen a string": (
        '{"Network": "10.244.0.0/16", "SubnetLen": "24"}',
        "json: cannot unmarshal string into Go struct field Config.SubnetLen of type uint"),
    "IPv4: SubnetLen -0": (
        '{"Network": "10.244.0.0/16", "SubnetLen": -0}',
        "json: cannot unmarshal number -0 into Go struct field Config.SubnetLen of type uint"),
    "IPv4: SubnetMax off the boundary": ('{"Network": "10.244.0.0/16", "SubnetMax": "10.244.9.1"}',
                                         "SubnetMax is not on a SubnetLen boundary: 10.244.9.1"),
    "an earlier repeat's type error": (
        f'{{{V4}{V6}, "IPv6SubnetLen": true, "IPv6SubnetLen": 64}}',
        "json: cannot unmarshal bool into Go struct field Config.IPv6SubnetLen of type uint"),
}


def test_differential_cases_get_the_verdicts_listed() -> None:
    """The table on its own (where flanneld is absent): each verdict is pyflanneld's."""
    for name, (text, message) in DIFFERENTIAL_CASES.items():
        assert same_message(pyflanneld_verdict(text), message), name


def pyflanneld_verdict(text: str) -> str | None:
    try:
        parse_config(text)
    except ConfigError as err:
        return str(err)
    return None


def same_message(ours: str | None, flanneld: str | None) -> bool:
    """Whether pyflanneld says what flanneld says: the same words, maybe after the key
    ("IPv6Network: ") and before more (": banana", ": EnableIPv4 and EnableIPv6 are both
    false")."""
    if ours is None or flanneld is None:
        return ours is flanneld
    return re.fullmatch(rf"(\w+: )?{re.escape(flanneld)}(: .*)?", ours) is not None


@dataclass
class FlanneldRun:
    """What flanneld v0.20.2 made of a config: its refusal (None: it took it) and, where it
    got as far, the subnet.env it wrote."""
    refusal: str | None
    subnet_env: str | None


def flanneld_on(bed: Testbed, etcd: EtcdServer, host: Host, text: str, tag: str,
                *flags: str, subnet_env: bool = False) -> FlanneldRun:
    """Run flanneld on `text` (its own etcd prefix, `tag`) on `host` until its verdict, and
    with subnet_env until it writes its subnet.env; then stop it."""
    prefix = f"/cfg-{tag}"
    put_config(etcd, "v3", text, prefix)
    env = os.path.join(bed.workdir, f"{tag}.env")
    log_path = os.path.join(bed.workdir, f"{tag}.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, REFERENCE_FLANNELD,
             f"--etcd-endpoints={etcd.endpoint}", f"--etcd-prefix={prefix}", "--iface=eth0",
             f"--subnet-file={env}", *etcd.client_flags(), *flags],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with open(log_path, errors="replace") as f:
                logged = f.read()
            refused = re.search(r"Couldn't fetch network config: (.*)|\] (none defined stack)",
                                logged)
            if refused:
                return FlanneldRun(refused[1] or refused[2], None)
            found = logged.find("Found network config")
            # The families are checked at once after the config is found: any line after it
            # says they passed.
            taken = found >= 0 and "\n" in logged[found:].rstrip("\n")
            if taken and not subnet_env:
                return FlanneldRun(None, None)
            if taken and os.path.exists(env):
                with open(env) as f:
                    return FlanneldRun(None, f.read())
            if process.poll() is not None and found < 0:
                break
            time.sleep(0.02)
        raise AssertionError(f"flanneld on {text}: no verdict; its log:\n{logged[-3000:]}")
    finally:
        end_process(process, signal.SIGKILL)  # its verdict is in: nothing to wait for


@pytest.fixture(scope="module")
def flanneld_host(bed_and_etcd: tuple[Testbed, EtcdServer]) -> tuple[Testbed, EtcdServer, Host]:
    bed, etcd = bed_and_etcd
    return bed, etcd, bed.add_host()


@needs_flanneld
def test_ipv6_configs_get_flanneld_v0_20_2s_verdict_and_message(
        flanneld_host: tuple[Testbed, EtcdServer, Host]) -> None:
    bed, etcd, host = flanneld_host
    differ = {}
    for i, (name, (text, listed)) in enumerate(DIFFERENTIAL_CASES.items()):
        theirs = flanneld_on(bed, etcd, host, text, f"v6-{i}").refusal
        ours = pyflanneld_verdict(text)
        if theirs != listed or not same_message(ours, theirs):
            differ[name] = (text, theirs, ours)
    assert not differ, differ
