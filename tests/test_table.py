"""The subnet-to-host table: edges of the Network, every SubnetLen, a full table."""

import ipaddress

import pytest

from fastpath import RouteTable


def test_first_and_last_subnet_route_and_nothing_else() -> None:
    table = RouteTable("10.244.0.0/16", 24)
    table.set("10.244.0.0/24", "198.18.0.1", 8285)
    table.set("10.244.255.0/24", "198.18.0.2", 7890)
    assert table.lookup("10.244.0.0") == ("198.18.0.1", 8285)
    assert table.lookup("10.244.0.255") == ("198.18.0.1", 8285)
    assert table.lookup("10.244.255.7") == ("198.18.0.2", 7890)
    assert table.lookup("10.244.255.255") == ("198.18.0.2", 7890)
    assert table.lookup("10.244.1.0") is None
    assert table.lookup("10.244.254.255") is None


@pytest.mark.parametrize("outside", ["10.243.255.255", "10.245.0.0", "0.0.0.0", "255.255.255.255"])
def test_outside_the_network_has_no_route(outside: str) -> None:
    table = RouteTable("10.244.0.0/16", 24)
    for index in (0, 255):
        table.set(f"10.244.{index}.0/24", "198.18.0.1", 8285)
    assert table.lookup(outside) is None


@pytest.mark.parametrize("subnet_len", range(16, 31))
def test_every_subnet_len_maps_its_edges(subnet_len: int) -> None:
    network = ipaddress.IPv4Network("10.0.0.0/14")
    table = RouteTable(network, subnet_len)
    assert len(table) == 1 << (subnet_len - 14)
    subnets = list(network.subnets(new_prefix=subnet_len))
    first, last = subnets[0], subnets[-1]
    table.set(first, "198.18.0.1", 1)
    table.set(last, "198.18.0.2", 65535)
    assert table.lookup(first.network_address) == ("198.18.0.1", 1)
    assert table.lookup(first.broadcast_address) == ("198.18.0.1", 1)
    assert table.lookup(last.broadcast_address) == ("198.18.0.2", 65535)
    assert table.lookup(first.broadcast_address + 1) is None
    table.delete(last)
    assert table.lookup(last.network_address) is None


def test_full_table_of_65536_subnets() -> None:
    table = RouteTable("10.0.0.0/8", 24)
    assert len(table) == 65536
    subnets = list(ipaddress.IPv4Network("10.0.0.0/8").subnets(new_prefix=24))
    for i, subnet in enumerate(subnets):
        table.set(subnet, ipaddress.IPv4Address(0xC6120000 + i), 1 + i % 65535)
    for i, subnet in enumerate(subnets):
        assert table.lookup(subnet.network_address + 77) == (
            str(ipaddress.IPv4Address(0xC6120000 + i)), 1 + i % 65535)
    for subnet in subnets[::2]:
        table.delete(subnet)
    assert table.lookup("10.0.0.1") is None
    assert table.lookup("10.0.1.1") == ("198.18.0.1", 2)


def test_overwrite_replaces_the_whole_entry() -> None:
    table = RouteTable("10.244.0.0/16", 24)
    table.set("10.244.3.0/24", "198.18.0.1", 8285)
    table.set("10.244.3.0/24", "198.19.255.254", 7890)
    assert table.lookup("10.244.3.3") == ("198.19.255.254", 7890)


@pytest.mark.parametrize(
    "subnet", ["10.244.3.0/25", "10.244.3.0/23", "10.245.0.0/24", "10.244.3.1/24"])
def test_set_refuses_what_is_not_one_of_the_subnets(subnet: str) -> None:
    table = RouteTable("10.244.0.0/16", 24)
    with pytest.raises(ValueError):
        table.set(subnet, "198.18.0.1", 8285)


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_set_refuses_a_bad_port(port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        RouteTable("10.244.0.0/16", 24).set("10.244.3.0/24", "198.18.0.1", port)


@pytest.mark.parametrize(("network", "subnet_len"), [("10.244.0.0/16", 16), ("10.244.0.0/16", 33),
                                                     ("0.0.0.0/0", 30)])
def test_bad_shapes_are_refused(network: str, subnet_len: int) -> None:
    with pytest.raises(ValueError):
        RouteTable(network, subnet_len)


def test_a_table_handed_to_the_next_run_keeps_its_routes_for_the_same_network_only() -> None:
    import os

    first = RouteTable("10.244.0.0/16", 24)
    assert not first.adopted
    first.set("10.244.7.0/24", "198.18.0.1", 8285)
    kept = os.dup(first.fd)
    del first
    second = RouteTable("10.244.0.0/16", 24, kept)
    assert second.adopted and second.routes() == [("10.244.7.0/24", ("198.18.0.1", 8285))]
    # Another Network of the same size, or another SubnetLen: a new, empty table.
    for network, subnet_len in (("10.245.0.0/16", 24), ("10.244.0.0/16", 25)):
        kept = os.dup(second.fd)
        other = RouteTable(network, subnet_len, kept)
        assert not other.adopted and other.routes() == []
