"""Lease keys, values and the choice of a subnet, against flanneld's rules."""

import ipaddress
import random

import pytest

from control.subnet.config import parse_config
from control.subnet.lease import (
    PICK_FROM,
    Choice,
    LeaseError,
    OutOfSubnetsError,
    PeerLease,
    Subnets,
    choose_subnet,
    decode_lease,
    encode_lease,
    readable_leases,
    shares_a_subnet,
    taken_first,
)
from control.subnet.registry import Entry

CONFIG = parse_config('{"Network": "10.244.0.0/16", "SubnetMin": "10.244.10.0",'
                      ' "SubnetMax": "10.244.20.0"}')
DUAL = parse_config('{"Network": "10.244.0.0/16", "SubnetMin": "10.244.10.0",'
                    ' "SubnetMax": "10.244.20.0", "EnableIPv6": true, "IPv6Network": "fc00::/48",'
                    ' "IPv6SubnetMin": "fc00:0:0:10::", "IPv6SubnetMax": "fc00:0:0:14::"}')
ONLY6 = parse_config('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fc00::/48",'
                     ' "IPv6SubnetMin": "fc00:0:0:10::", "IPv6SubnetMax": "fc00:0:0:14::"}')
ME = ipaddress.IPv4Address("198.18.0.41")
OTHER = ipaddress.IPv4Address("198.18.0.42")
ME6 = ipaddress.IPv6Address("2001:db8::41")
OTHER6 = ipaddress.IPv6Address("2001:db8::42")


def net(text: str) -> Subnets:
    """An IPv4 lease's subnets."""
    return Subnets(ipaddress.IPv4Network(text))


def dual(text: str, text6: str) -> Subnets:
    return Subnets(ipaddress.IPv4Network(text), ipaddress.IPv6Network(text6))


def only6(text6: str) -> Subnets:
    return Subnets(None, ipaddress.IPv6Network(text6))


def held(public_ip: ipaddress.IPv4Address | None,
         public_ipv6: ipaddress.IPv6Address | None = None) -> PeerLease:
    return PeerLease(public_ip, "", None, public_ipv6)


def test_values_are_flanneld_s_byte_for_byte() -> None:
    assert encode_lease(ME) == b'{"PublicIP":"198.18.0.41","PublicIPv6":null}'
    assert encode_lease(ME, "host-gw") == (
        b'{"PublicIP":"198.18.0.41","PublicIPv6":null,"BackendType":"host-gw"}')
    assert encode_lease(ME, "vxlan", '{"VNI":1,"VtepMAC":"1a:fd:f4:c0:3d:3b"}') == (
        b'{"PublicIP":"198.18.0.41","PublicIPv6":null,"BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"1a:fd:f4:c0:3d:3b"}}')


@pytest.mark.parametrize("value", [
    b'{"PublicIP":"198.18.0.41","PublicIPv6":null}',
    b'{"PublicIP":"198.18.0.41","PublicIPv6":null,"BackendType":"vxlan",'
    b'"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}',
    b'{"publicip":"198.18.0.41","SomethingNew":true}',
])
def test_values_of_every_backend_are_read(value: bytes) -> None:
    assert decode_lease(value).public_ip == ME


def test_the_backend_s_fields_are_kept() -> None:
    assert decode_lease(b'{"PublicIP":"198.18.0.41","PublicIPv6":null}') == PeerLease(ME, "")
    assert decode_lease(b'{"publicIP":"198.18.0.41","backendtype":"vxlan","BackendData":'
                        b'{"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"}}') == PeerLease(
        ME, "vxlan", '{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}')


@pytest.mark.parametrize("value", [
    b"not json", b"[1]", b"{}", b'{"PublicIP":"banana"}', b'{"PublicIP":"0.0.0.0"}',
    b'{"PublicIP":null}', b'{"PublicIP":7}', b"\xff",
    b'{"PublicIP":"198.18.0.41","BackendType":7}'])
def test_malformed_values_are_refused(value: bytes) -> None:
    with pytest.raises(LeaseError):
        decode_lease(value)


def test_key_names_round_trip() -> None:
    assert net("10.244.33.0/24").name == "10.244.33.0-24"
    assert Subnets.parse("10.244.33.0-24") == net("10.244.33.0/24")
    # flanneld's dual-stack key (its subnet_test.go) and an IPv6-only one, IPv4 part 0.0.0.0-0
    both = dual("10.12.13.0/24", "fd00:12:13::/56")
    assert both.name == "10.12.13.0-24&fd00:12:13::-56" and Subnets.parse(both.name) == both
    assert only6("fc00:0:0:5::/64").name == "0.0.0.0-0&fc00:0:0:5::-64"
    assert Subnets.parse("0.0.0.0-0&fc00:0:0:5::-64") == only6("fc00:0:0:5::/64")
    assert str(both) == "10.12.13.0/24, fd00:12:13::/56"


@pytest.mark.parametrize("name", ["10.244.33.0", "10.244.33.1-24", "banana-24", "10.244.33.0-x",
                                  "10.244.33.0-33", "", "10.244.33.0-32", "0.0.0.0-0",
                                  "10.244.33.0-24&fc00::-128", "10.244.33.0-24&fc00::1-64",
                                  "10.244.33.0-24&FC00::-64", "10.244.33.0-24&"])
def test_bad_key_names_are_refused(name: str) -> None:
    """flanneld reads prefix lengths as 5- and 7-bit numbers (no /32, no /128) and IPv6 text
    in lower case only."""
    with pytest.raises(LeaseError):
        Subnets.parse(name)


def test_this_hosts_fitting_lease_is_reused() -> None:
    choice = choose_subnet(CONFIG, [(net("10.244.11.0/24"), held(OTHER)),
                                    (net("10.244.15.0/24"), held(ME))],
                           ME, None, net("10.244.12.0/24"),
                           random.Random(1))
    assert (choice.subnets, choice.reuse, choice.stale) == (net("10.244.15.0/24"), True, None)


def test_this_hosts_lease_outside_the_range_is_replaced_and_deleted() -> None:
    stale = net("10.244.99.0/24")
    choice = choose_subnet(CONFIG, [(stale, held(ME))], ME, None, None, random.Random(1))
    assert choice.stale == stale and not choice.reuse
    assert CONFIG.subnet_fits(choice.subnets.ipv4)


def test_previous_subnet_is_taken_back_when_free() -> None:
    choice = choose_subnet(CONFIG, [(net("10.244.11.0/24"), held(OTHER))], ME, None,
                           net("10.244.12.0/24"),
                           random.Random(1))
    assert (choice.subnets, choice.reuse) == (net("10.244.12.0/24"), False)


@pytest.mark.parametrize("previous", ["10.244.11.0/24", "10.244.30.0/24", "10.244.12.0/25"])
def test_previous_subnet_taken_or_unfit_is_not_reused(previous: str) -> None:
    leases = [(net("10.244.11.0/24"), held(OTHER))]
    choice = choose_subnet(CONFIG, leases, ME, None, net(previous), random.Random(1))
    assert choice.subnets != net("10.244.11.0/24") and CONFIG.subnet_fits(choice.subnets.ipv4)


def test_random_pick_avoids_every_taken_subnet_even_unreadable_ones() -> None:
    taken = [(net(f"10.244.{i}.0/24"), held(OTHER)) for i in range(10, 20)]
    taken[3] = (taken[3][0], None)  # a lease whose value cannot be read still holds its subnet
    picks = {choose_subnet(CONFIG, taken, ME, None, None, random.Random(seed)).subnets
             for seed in range(20)}
    assert picks == {net("10.244.20.0/24")}


def test_a_lease_of_another_length_still_blocks_what_it_overlaps() -> None:
    # of a former config
    taken = [(net("10.244.10.0/23"), held(OTHER)), (net("10.244.12.0/22"), held(OTHER))]
    picks = {choose_subnet(CONFIG, taken, ME, None, None, random.Random(seed)).subnets
             for seed in range(50)}
    assert picks == {net(f"10.244.{i}.0/24") for i in range(16, 21)}


def test_ten_thousand_leases_leave_the_next_free_subnets() -> None:
    config = parse_config(b'{"Network":"10.0.0.0/8","SubnetLen":24}')
    taken = [(net(f"10.{i >> 8}.{i & 255}.0/24"), held(OTHER)) for i in range(1, 10001)]
    picks = {choose_subnet(config, taken, ME, None, None, random.Random(seed)).subnets
             for seed in range(20)}
    first_free = [net(f"10.{i >> 8}.{i & 255}.0/24") for i in range(10001, 10001 + PICK_FROM)]
    assert picks <= set(first_free) and len(picks) > 1


def test_random_pick_spreads_over_the_free_subnets() -> None:
    picks = {choose_subnet(CONFIG, [], ME, None, None, random.Random(seed)).subnets
             for seed in range(200)}
    assert len(picks) == 11 and all(CONFIG.subnet_fits(p.ipv4) for p in picks)


def test_out_of_subnets() -> None:
    taken = [(net(f"10.244.{i}.0/24"), held(OTHER)) for i in range(10, 21)]
    with pytest.raises(OutOfSubnetsError, match="out of subnets"):
        choose_subnet(CONFIG, taken, ME, None, None, random.Random(1))


def test_readable_leases_skip_bad_names_and_keep_bad_values() -> None:
    leases = readable_leases([("10.244.11.0-24", encode_lease(OTHER)), ("junk", b"{}"),
                              ("10.244.12.0-24", b"junk")])
    assert leases == [(net("10.244.11.0/24"), held(OTHER)), (net("10.244.12.0/24"), None)]


def test_dual_stack_values_are_flanneld_s_byte_for_byte() -> None:
    """Field order as Go marshals LeaseAttrs; PublicIPv6 null when absent; an IPv6-only host's
    PublicIP 0.0.0.0, as flanneld's zero address."""
    assert encode_lease(ME, "vxlan", '{"VNI":1,"VtepMAC":"aa:aa:aa:aa:aa:aa"}', ME6,
                        '{"VNI":1,"VtepMAC":"bb:bb:bb:bb:bb:bb"}') == (
        b'{"PublicIP":"198.18.0.41","PublicIPv6":"2001:db8::41","BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"aa:aa:aa:aa:aa:aa"},'
        b'"BackendV6Data":{"VNI":1,"VtepMAC":"bb:bb:bb:bb:bb:bb"}}')
    assert encode_lease(ME, "host-gw", public_ipv6=ME6) == (
        b'{"PublicIP":"198.18.0.41","PublicIPv6":"2001:db8::41","BackendType":"host-gw"}')
    assert encode_lease(None, "host-gw", public_ipv6=ME6) == (
        b'{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::41","BackendType":"host-gw"}')


def test_dual_stack_values_are_read() -> None:
    value = encode_lease(ME, "vxlan", '{"VNI":1}', ME6, '{"VNI":2}')
    assert decode_lease(value) == PeerLease(ME, "vxlan", '{"VNI":1}', ME6, '{"VNI":2}')
    assert decode_lease(b'{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::41"}') == PeerLease(
        None, "", None, ME6)
    with pytest.raises(LeaseError, match="PublicIPv6"):
        decode_lease(b'{"PublicIP":"198.18.0.41","PublicIPv6":"198.18.0.41"}')
    with pytest.raises(LeaseError, match="no PublicIPv6"):
        decode_lease(b'{"PublicIP":"0.0.0.0","PublicIPv6":null}')


def test_dual_stack_picks_a_free_subnet_of_each_family() -> None:
    taken = [(dual("10.244.10.0/24", "fc00:0:0:10::/64"), held(OTHER, OTHER6)),
             (net("10.244.11.0/24"), held(OTHER))]  # a lease without IPv6 holds only its IPv4
    picks = {choose_subnet(DUAL, taken, ME, ME6, None, random.Random(seed)).subnets
             for seed in range(100)}
    assert {p.ipv4 for p in picks} == {ipaddress.IPv4Network(f"10.244.{i}.0/24")
                                       for i in range(12, 21)}
    assert {p.ipv6 for p in picks} == {ipaddress.IPv6Network(f"fc00:0:0:{i}::/64")
                                       for i in range(11, 15)}


def test_dual_stack_lease_of_this_host_is_reused_and_an_ipv4_only_one_replaced() -> None:
    mine = dual("10.244.15.0/24", "fc00:0:0:12::/64")
    choice = choose_subnet(DUAL, [(mine, held(ME, ME6))], ME, ME6, None, random.Random(1))
    assert (choice.subnets, choice.reuse) == (mine, True)
    # After EnableIPv6 is turned on this host's IPv4-only lease no longer fits: a new pair.
    choice = choose_subnet(DUAL, [(net("10.244.15.0/24"), held(ME))], ME, ME6, None,
                           random.Random(1))
    assert choice.stale == net("10.244.15.0/24") and not choice.reuse
    assert choice.subnets.ipv6 is not None and DUAL.ipv6_subnet_fits(choice.subnets.ipv6)


def test_dual_stack_previous_subnets_are_taken_back_together() -> None:
    previous = dual("10.244.12.0/24", "fc00:0:0:13::/64")
    choice = choose_subnet(DUAL, [], ME, ME6, previous, random.Random(1))
    assert (choice.subnets, choice.reuse) == (previous, False)
    taken = [(dual("10.244.11.0/24", "fc00:0:0:13::/64"), held(OTHER, OTHER6))]
    assert choose_subnet(DUAL, taken, ME, ME6, previous, random.Random(1)).subnets != previous


def test_ipv6_only_hosts_never_share_a_subnet() -> None:
    """flanneld finds its lease by PublicIP, 0.0.0.0 on every IPv6-only host, and so takes
    another host's: here each host finds its own by PublicIPv6."""
    other = only6("fc00:0:0:10::/64")
    leases = [(other, held(None, OTHER6))]
    for seed in range(20):
        choice = choose_subnet(ONLY6, leases, None, ME6, None, random.Random(seed))
        assert not choice.reuse and choice.subnets.ipv4 is None
        assert choice.subnets.ipv6 != other.ipv6
    assert choose_subnet(ONLY6, leases, None, OTHER6, None, random.Random(1)) == Choice(
        other, reuse=True)


def test_dual_stack_hosts_on_an_ipv6_only_underlay_never_share_a_subnet() -> None:
    """A udp host without an IPv4 address (PublicIP 0.0.0.0, its datagrams over IPv6) finds
    its lease by PublicIPv6 in a dual-stack network too, not another such host's."""
    other = dual("10.244.10.0/24", "fc00:0:0:10::/64")
    leases = [(other, held(None, OTHER6))]
    for seed in range(20):
        choice = choose_subnet(DUAL, leases, None, ME6, None, random.Random(seed))
        assert not choice.reuse and choice.subnets.ipv4 != other.ipv4
        assert choice.subnets.ipv6 != other.ipv6
    assert choose_subnet(DUAL, leases, None, OTHER6, None, random.Random(1)) == Choice(
        other, reuse=True)


def test_out_of_ipv6_subnets() -> None:
    taken = [(dual(f"10.244.{i}.0/24", f"fc00:0:0:{i}::/64"), held(OTHER, OTHER6))
             for i in range(10, 15)]
    with pytest.raises(OutOfSubnetsError, match="fc00:0:0:10:: to fc00:0:0:14::"):
        choose_subnet(DUAL, taken, ME, ME6, None, random.Random(1))


def entry(subnets: Subnets, created: int) -> Entry:
    return Entry(subnets.name, encode_lease(OTHER), created)


def test_of_two_keys_sharing_an_ipv6_subnet_the_later_one_gives_way() -> None:
    """Two hosts that listed at once picked one IPv6 subnet under different keys."""
    first = dual("10.244.10.0/24", "fc00:0:0:13::/64")
    later = dual("10.244.11.0/24", "fc00:0:0:13::/64")
    entries = [entry(later, 8), entry(first, 7), entry(net("10.244.12.0/24"), 3)]
    assert taken_first(later, entries) == first
    assert taken_first(first, entries) is None


def test_sharing_an_ipv4_subnet_counts_too_and_apart_ones_never_clash() -> None:
    first = dual("10.244.10.0/24", "fc00:0:0:13::/64")
    later = dual("10.244.10.0/24", "fc00:0:0:14::/64")
    apart = dual("10.244.11.0/24", "fc00:0:0:15::/64")
    assert shares_a_subnet(first, later) and not shares_a_subnet(first, apart)
    assert taken_first(later, [entry(first, 1), entry(later, 2)]) == first
    assert taken_first(apart, [entry(first, 1), entry(later, 2), entry(apart, 3)]) is None
    # An IPv6-only key (0.0.0.0-0 for its IPv4 part) shares no IPv4 subnet with anyone.
    assert not shares_a_subnet(only6("fc00:0:0:16::/64"), first)


def test_a_key_missing_from_the_listing_or_unreadable_ones_never_make_a_host_give_way() -> None:
    mine = dual("10.244.11.0/24", "fc00:0:0:13::/64")
    first = dual("10.244.10.0/24", "fc00:0:0:13::/64")
    assert taken_first(mine, [entry(first, 1)]) is None  # lost meanwhile: taken again anyway
    unreadable = Entry("10.244.11.0-banana", b"{}", 1)
    assert taken_first(mine, [unreadable, entry(mine, 2)]) is None
