"""subnet.env: flanneld's exact text (flanneld v0.20.2 as the oracle where it runs), atomic
writes, and reading the previous subnets back."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from control.host.subnetenv import (
    PreviousSubnets,
    SubnetEnv,
    read_previous_subnets,
    write_subnet_env,
)
from control.subnet.config import go_ip6_text, parse_config
from tests.etcd import EtcdServer
from tests.test_config import flanneld_on, needs_flanneld
from tests.testbed import Testbed

ENV = SubnetEnv(ipaddress.IPv4Network("10.244.0.0/16"), ipaddress.IPv4Network("10.244.33.0/24"),
                1472, False)
DUAL = ENV._replace(ipv6_network=ipaddress.IPv6Network("fc00::/48"),
                    ipv6_subnet=ipaddress.IPv6Network("fc00:0:0:5::/64"), ip_masq=True)
IPV6_ONLY = DUAL._replace(network=None, subnet=None, mtu=1450)


def test_text_matches_flanneld_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "run" / "flannel" / "subnet.env"
    write_subnet_env(str(path), ENV)
    assert path.read_text() == ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.33.1/24\n"
                                "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")
    assert os.listdir(path.parent) == ["subnet.env"]  # the temp file was renamed over it


def test_dual_stack_and_ipv6_only_in_flanneld_order() -> None:
    # flanneld's WriteSubnetFile: IPv4's two lines with EnableIPv4, IPv6's two with EnableIPv6
    # (the subnet's first address, as for IPv4), then the one MTU and IPMASQ.
    assert DUAL.render() == ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.33.1/24\n"
                             "FLANNEL_IPV6_NETWORK=fc00::/48\n"
                             "FLANNEL_IPV6_SUBNET=fc00:0:0:5::1/64\n"
                             "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n")
    assert IPV6_ONLY.render() == ("FLANNEL_IPV6_NETWORK=fc00::/48\n"
                                  "FLANNEL_IPV6_SUBNET=fc00:0:0:5::1/64\n"
                                  "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")


def test_ipv6_text_is_gos() -> None:
    # flannel's ip.IP6 prints IPv4-mapped addresses, and those below 2^32 that fill 4 bytes,
    # dotted (flanneld v0.20.2 wrote FLANNEL_IPV6_SUBNET=192.0.0.1/98 for IPv6Network ::/96).
    env = IPV6_ONLY._replace(ipv6_network=ipaddress.IPv6Network("::/96"),
                             ipv6_subnet=ipaddress.IPv6Network("::c000:0/98"))
    assert env.render().splitlines()[:2] == ["FLANNEL_IPV6_NETWORK=::/96",
                                             "FLANNEL_IPV6_SUBNET=192.0.0.1/98"]
    env = IPV6_ONLY._replace(ipv6_network=ipaddress.IPv6Network("::ffff:0:0/96"),
                             ipv6_subnet=ipaddress.IPv6Network("::ffff:a00:0/120"))
    assert env.render().splitlines()[:2] == ["FLANNEL_IPV6_NETWORK=0.0.0.0/96",
                                             "FLANNEL_IPV6_SUBNET=10.0.0.1/120"]


def test_previous_subnets_are_read_back_masked(tmp_path: Path) -> None:
    path = tmp_path / "subnet.env"
    write_subnet_env(str(path), ENV)
    assert read_previous_subnets(str(path)) == PreviousSubnets(ENV.subnet, None)
    write_subnet_env(str(path), DUAL)
    assert read_previous_subnets(str(path)) == PreviousSubnets(DUAL.subnet, DUAL.ipv6_subnet)
    write_subnet_env(str(path), IPV6_ONLY)
    assert read_previous_subnets(str(path)) == PreviousSubnets(None, DUAL.ipv6_subnet)


def test_missing_or_garbled_file_gives_no_previous_subnet(tmp_path: Path) -> None:
    assert read_previous_subnets(str(tmp_path / "nope.env")) == PreviousSubnets(None, None)
    bad = tmp_path / "bad.env"
    bad.write_text("FLANNEL_SUBNET=banana\n")
    assert read_previous_subnets(str(bad)) == PreviousSubnets(None, None)
    # Each family on its own: a subnet without its length (Go's ParseCIDR wants one), or of
    # the other family, is no subnet; the other family's still counts.
    bad.write_text("FLANNEL_SUBNET=10.244.33.1/24\nFLANNEL_IPV6_SUBNET=fc00:0:0:5::1\n")
    assert read_previous_subnets(str(bad)) == PreviousSubnets(ENV.subnet, None)
    bad.write_text("FLANNEL_SUBNET=fc00::1/64\nFLANNEL_IPV6_SUBNET=fc00:0:0:5::1/64\n")
    assert read_previous_subnets(str(bad)) == PreviousSubnets(None, DUAL.ipv6_subnet)


# ---- beside flanneld v0.20.2: its file for its lease, ours for the same lease -----------------

FLANNELD_CASES = {
    "dual-stack": ('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fc00::/48"}',
                   ()),
    "dual-stack, ip-masq, unmasked IPv6Network": (
        '{"network": "10.244.0.0/16", "enableipv6": true, "ipv6network": "2001:cafe:42::7/56"}',
        ("--ip-masq",)),
    "/126 subnets": ('{"Network": "10.0.0.0/28", "EnableIPv6": true, "IPv6Network": "fc00::/124"}',
                     ()),
    # flanneld's udp backend panics without IPv4 before it writes the file; vxlan writes it.
    "IPv6 only (vxlan)": ('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fc00::/48",'
                          ' "Backend": {"Type": "vxlan"}}', ()),
    "a 4-byte IP6 is dotted": (
        '{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "::/96"}', ()),
    "IPv4-mapped is dotted": ('{"Network": "10.244.0.0/16", "EnableIPv6": true,'
                              ' "IPv6Network": "::ffff:0:0/96", "IPv6SubnetLen": 120}', ()),
}


def leased(key: str, network: ipaddress.IPv6Network | None
           ) -> tuple[ipaddress.IPv4Network | None, ipaddress.IPv6Network | None]:
    """The subnets of flanneld's lease key, "<a.b.c.d>-<len>[&<ipv6>-<len>]". Its IPv6 text is
    Go's: dotted for a 4-byte or an IPv4-mapped value, whichever is in `network`."""
    ipv4_text, _, ipv6_text = key.rsplit("/", 1)[1].partition("&")
    ipv4 = ipaddress.IPv4Network(ipv4_text.replace("-", "/"))
    if not ipv6_text:
        return ipv4, None
    address, length = ipv6_text.rsplit("-", 1)
    if ":" in address:
        candidates = [ipaddress.IPv6Address(address)]
    else:
        value = int(ipaddress.IPv4Address(address))
        candidates = [ipaddress.IPv6Address(value), ipaddress.IPv6Address((0xFFFF << 32) | value)]
    assert network is not None
    ipv6 = next(ipaddress.IPv6Network((candidate, int(length))) for candidate in candidates
                if candidate in network)
    assert go_ip6_text(ipv6.network_address) == address
    return (ipv4 if ipv4.prefixlen else None), ipv6


@needs_flanneld
@pytest.mark.parametrize(("text", "flags"), FLANNELD_CASES.values(), ids=FLANNELD_CASES.keys())
def test_our_subnet_env_is_flanneld_v0_20_2s_for_its_lease(
        bed_and_etcd: tuple[Testbed, EtcdServer], text: str, flags: tuple[str, ...]) -> None:
    bed, etcd = bed_and_etcd
    host = bed.add_host()  # a host of its own: the vxlan case leaves flannel-v6.1 behind
    tag = f"env{list(FLANNELD_CASES.values()).index((text, flags))}"
    theirs = flanneld_on(bed, etcd, host, text, tag, *flags, subnet_env=True).subnet_env
    assert theirs is not None
    (key,) = etcd.get_prefix(f"/cfg-{tag}/subnets/", "v3")
    config = parse_config(text)
    ipv4, ipv6 = leased(key, config.ipv6_network)
    mtu = int(theirs.split("FLANNEL_MTU=")[1].split()[0])  # the backend's, not subnet.env's
    ours = SubnetEnv(config.network, ipv4, mtu, bool(flags), config.ipv6_network, ipv6).render()
    assert ours == theirs
    # And read back, as flanneld reads it, for the next run's lease: a dotted IPv6 subnet
    # (192.0.0.1/98) is no CIDR to Go's ParseCIDR either, so neither reuses it.
    path = os.path.join(bed.workdir, f"{tag}.env")
    readable = ipv6 is not None and ":" in go_ip6_text(ipv6.network_address)
    assert read_previous_subnets(path) == PreviousSubnets(ipv4, ipv6 if readable else None)
