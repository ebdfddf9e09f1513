"""Lease keys, values and the choice of a subnet, against flanneld's rules."""

import ipaddress
import random

import pytest

from control.subnet.config import parse_config
from control.subnet.lease import (
    PICK_FROM,
    LeaseError,
    OutOfSubnetsError,
    PeerLease,
    choose_subnet,
    decode_lease,
    encode_lease,
    parse_subnet_name,
    readable_leases,
    subnet_name,
)

CONFIG = parse_config('{"Network": "10.244.0.0/16", "SubnetMin": "10.244.10.0",'
                      ' "SubnetMax": "10.244.20.0"}')
ME = ipaddress.IPv4Address("198.18.0.41")
OTHER = ipaddress.IPv4Address("198.18.0.42")


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


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
    assert subnet_name(net("10.244.33.0/24")) == "10.244.33.0-24"
    assert parse_subnet_name("10.244.33.0-24") == net("10.244.33.0/24")


@pytest.mark.parametrize("name", ["10.244.33.0", "10.244.33.1-24", "banana-24", "10.244.33.0-x",
                                  "10.244.33.0-33", ""])
def test_bad_key_names_are_refused(name: str) -> None:
    with pytest.raises(LeaseError):
        parse_subnet_name(name)


def test_this_hosts_fitting_lease_is_reused() -> None:
    choice = choose_subnet(CONFIG, [(net("10.244.11.0/24"), OTHER), (net("10.244.15.0/24"), ME)],
                           ME, net("10.244.12.0/24"), random.Random(1))
    assert (choice.subnet, choice.reuse, choice.stale) == (net("10.244.15.0/24"), True, None)


def test_this_hosts_lease_outside_the_range_is_replaced_and_deleted() -> None:
    stale = net("10.244.99.0/24")
    choice = choose_subnet(CONFIG, [(stale, ME)], ME, None, random.Random(1))
    assert choice.stale == stale and not choice.reuse
    assert CONFIG.subnet_fits(choice.subnet)


def test_previous_subnet_is_taken_back_when_free() -> None:
    choice = choose_subnet(CONFIG, [(net("10.244.11.0/24"), OTHER)], ME, net("10.244.12.0/24"),
                           random.Random(1))
    assert (choice.subnet, choice.reuse) == (net("10.244.12.0/24"), False)


@pytest.mark.parametrize("previous", ["10.244.11.0/24", "10.244.30.0/24", "10.244.12.0/25"])
def test_previous_subnet_taken_or_unfit_is_not_reused(previous: str) -> None:
    leases = [(net("10.244.11.0/24"), OTHER)]
    choice = choose_subnet(CONFIG, leases, ME, net(previous), random.Random(1))
    assert choice.subnet != net("10.244.11.0/24") and CONFIG.subnet_fits(choice.subnet)


def test_random_pick_avoids_every_taken_subnet_even_unreadable_ones() -> None:
    taken = [(net(f"10.244.{i}.0/24"), OTHER) for i in range(10, 20)]
    taken[3] = (taken[3][0], None)  # a lease whose value cannot be read still holds its subnet
    picks = {choose_subnet(CONFIG, taken, ME, None, random.Random(seed)).subnet
             for seed in range(20)}
    assert picks == {net("10.244.20.0/24")}


def test_a_lease_of_another_length_still_blocks_what_it_overlaps() -> None:
    taken = [(net("10.244.10.0/23"), OTHER), (net("10.244.12.0/22"), OTHER)]  # a former config
    picks = {choose_subnet(CONFIG, taken, ME, None, random.Random(seed)).subnet
             for seed in range(50)}
    assert picks == {net(f"10.244.{i}.0/24") for i in range(16, 21)}


def test_ten_thousand_leases_leave_the_next_free_subnets() -> None:
    config = parse_config(b'{"Network":"10.0.0.0/8","SubnetLen":24}')
    taken = [(net(f"10.{i >> 8}.{i & 255}.0/24"), OTHER) for i in range(1, 10001)]
    picks = {choose_subnet(config, taken, ME, None, random.Random(seed)).subnet
             for seed in range(20)}
    first_free = [net(f"10.{i >> 8}.{i & 255}.0/24") for i in range(10001, 10001 + PICK_FROM)]
    assert picks <= set(first_free) and len(picks) > 1


def test_random_pick_spreads_over_the_free_subnets() -> None:
    picks = {choose_subnet(CONFIG, [], ME, None, random.Random(seed)).subnet
             for seed in range(200)}
    assert len(picks) == 11 and all(CONFIG.subnet_fits(p) for p in picks)


def test_out_of_subnets() -> None:
    taken = [(net(f"10.244.{i}.0/24"), OTHER) for i in range(10, 21)]
    with pytest.raises(OutOfSubnetsError, match="out of subnets"):
        choose_subnet(CONFIG, taken, ME, None, random.Random(1))


def test_readable_leases_skip_bad_names_and_keep_bad_values() -> None:
    leases = readable_leases([("10.244.11.0-24", encode_lease(OTHER)), ("junk", b"{}"),
                              ("10.244.12.0-24", b"junk")])
    assert leases == [(net("10.244.11.0/24"), OTHER), (net("10.244.12.0/24"), None)]
