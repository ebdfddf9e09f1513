"""The subnet-to-host table: edges of the Network, every SubnetLen, a full table."""

import ipaddress

import pytest

from fastpath import Peers6, RouteTable


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


# ---- outer IPv6: entries name the peers' IPv6 addresses by index (Peers6) ----------------------

def outer6_tables() -> tuple[Peers6, RouteTable, RouteTable]:
    peers = Peers6()
    table, table6 = RouteTable("10.244.0.0/16", 24), RouteTable("fd00:10:244::/56", 64)
    for each in (table, table6):
        each.carry_over_ipv6(peers)
    return peers, table, table6


def test_ipv6_peers_are_set_looked_up_and_shared_by_both_tables() -> None:
    peers, table, table6 = outer6_tables()
    table.set("10.244.3.0/24", "2001:db8:0:1::3", 8285)
    table6.set("fd00:10:244:3::/64", "2001:db8:0:1::3", 8285)
    table.set("10.244.4.0/24", "2001:db8:0:1::4", 7000)
    assert table.lookup("10.244.3.77") == ("2001:db8:0:1::3", 8285)
    assert table6.lookup("fd00:10:244:3::9") == ("2001:db8:0:1::3", 8285)
    assert table.lookup("10.244.4.1") == ("2001:db8:0:1::4", 7000)
    assert table.routes() == [("10.244.3.0/24", ("2001:db8:0:1::3", 8285)),
                              ("10.244.4.0/24", ("2001:db8:0:1::4", 7000))]
    assert len(peers) == 2
    assert peers.index("2001:db8:0:1::3") == 0 and peers.index("2001:db8:0:1::4") == 1


def test_an_ipv6_peer_keeps_its_index_while_an_entry_names_it() -> None:
    peers, table, table6 = outer6_tables()
    table.set("10.244.3.0/24", "2001:db8:0:1::3", 8285)
    table6.set("fd00:10:244:3::/64", "2001:db8:0:1::3", 8285)
    table.delete("10.244.3.0/24")
    assert peers.index("2001:db8:0:1::3") == 0 and peers.free_order() == []
    table6.delete("fd00:10:244:3::/64")
    assert peers.index("2001:db8:0:1::3") is None and peers.free_order() == [0]
    assert peers.address(0) == "2001:db8:0:1::3"  # still there for a loop's old entry
    table.delete("10.244.3.0/24")  # no route: nothing to give back twice
    assert peers.free_order() == [0]


def test_a_changed_ipv6_peer_gives_its_old_index_back() -> None:
    peers, table, _ = outer6_tables()
    table.set("10.244.3.0/24", "2001:db8:0:1::3", 8285)
    table.set("10.244.3.0/24", "2001:db8:0:1::5", 8285)
    assert table.lookup("10.244.3.1") == ("2001:db8:0:1::5", 8285)
    assert peers.index("2001:db8:0:1::5") == 1 and peers.free_order() == [0]


def test_freed_ipv6_indices_are_taken_again_last_and_in_the_order_freed() -> None:
    """Never-used indices first, then the freed ones, the longest free first: a loop that
    loaded an entry just before it changed never finds another peer at its index."""
    peers, table, _ = outer6_tables()
    subnets = [f"10.244.{i}.0/24" for i in range(4)]
    for i, subnet in enumerate(subnets):
        table.set(subnet, f"2001:db8::{i + 1}", 8285)
    for subnet in (subnets[2], subnets[0]):
        table.delete(subnet)
    assert peers.free_order() == [2, 0]
    table.set(subnets[0], "2001:db8::99", 8285)
    assert peers.index("2001:db8::99") == 4  # a never-used one, not 0 or 2
    filler = ipaddress.IPv4Network("10.0.0.0/8").subnets(new_prefix=24)
    big = RouteTable("10.0.0.0/8", 24)
    big.carry_over_ipv6(peers)
    for i in range(5, 1 << 16):  # use up the never-used indices
        big.set(next(filler), ipaddress.IPv6Address(0x20010DB8 << 96 | 0x10000 + i), 1)
    assert peers.free_order() == [2, 0]
    table.set(subnets[2], "2001:db8::aa", 8285)
    table.set(subnets[3], "2001:db8::bb", 8285)  # gives index 3 back, behind 0
    assert peers.index("2001:db8::aa") == 2 and peers.index("2001:db8::bb") == 0
    assert peers.free_order() == [3]
    assert table.lookup("10.244.2.1") == ("2001:db8::aa", 8285)


def test_a_table_with_routes_keeps_its_peers_family() -> None:
    table = RouteTable("10.244.0.0/16", 24)
    table.set("10.244.3.0/24", "198.18.0.3", 8285)
    with pytest.raises(ValueError, match="family"):
        table.carry_over_ipv6(Peers6())
