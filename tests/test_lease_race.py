"""Two hosts that list the leases at the same moment and pick one subnet of a family under
different keys (a dual-stack key names both subnets, so etcd's create-if-absent lets both in):
the host whose key etcd created later gives way, on a real etcd through both of its APIs.

The two hosts are two LeaseKeepers in one process inside the etcd host's namespace (the
registries talk to etcd over its underlay address). Their picks are made to agree on the IPv6
subnet, which random picks among the first 100 free ones do for about one pair in a hundred, and
their first listings are held until both have listed, as two hosts starting together list.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import sys
from collections.abc import Sequence

import pytest

from control.subnet.config import parse_config
from control.subnet.lease import LeaseKeeper, Subnets, encode_lease, shares_a_subnet
from control.subnet.registry import Entry, LeaseStore
from tests.etcd import CLIENT_PORT, EtcdServer
from tests.testbed import Testbed

PREFIX = "/lease-race/network"
CONFIG = ('{"Network": "10.16.0.0/12", "SubnetLen": 20, "EnableIPv6": true,'
          ' "IPv6Network": "fd00:10::/56", "IPv6SubnetLen": 64}')
FIRST_FREE6 = ipaddress.IPv6Network("fd00:10:0:1::/64")  # IPv6SubnetMin by default


class AgreeingPicks(random.Random):
    """The first free IPv6 subnet, as the other host picks, and the IPv4 subnet `index` of the
    free ones, which it does not: the two keys differ."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index

    def choice(self, seq: Sequence) -> object:  # type: ignore[override]
        return seq[0] if isinstance(seq[0], ipaddress.IPv6Network) else seq[self.index]


class ListingTogether:
    """A registry whose first listing is returned only once the other host has listed too."""

    def __init__(self, registry: LeaseStore, together: asyncio.Barrier) -> None:
        self._registry = registry
        self._together: asyncio.Barrier | None = together

    def __getattr__(self, name: str) -> object:
        return getattr(self._registry, name)

    async def list_subnets(self) -> tuple[list[Entry], int]:
        listed = await self._registry.list_subnets()
        together, self._together = self._together, None
        if together is not None:
            await together.wait()
        return listed


def registry(api: str, etcd_ip: str) -> LeaseStore:
    if api == "v2":
        from control.subnet.etcdv2 import EtcdV2Registry
        return EtcdV2Registry([(etcd_ip, CLIENT_PORT)], PREFIX)
    from control.subnet.etcdv3 import EtcdV3Registry
    return EtcdV3Registry([(etcd_ip, CLIENT_PORT)], PREFIX)


async def race(api: str, etcd_ip: str) -> list[str]:
    """Both hosts take a lease at once; the subnets each ends with."""
    config = parse_config(CONFIG)
    together = asyncio.Barrier(2)
    keepers = [
        LeaseKeeper(ListingTogether(registry(api, etcd_ip), together),  # type: ignore[arg-type]
                    config, encode_lease(ipaddress.IPv4Address(f"198.18.0.{41 + index}")),
                    None, ttl=600, rng=AgreeingPicks(index))
        for index in range(2)]
    taken = await asyncio.gather(*(keeper.acquire() for keeper in keepers))
    return [subnets.name for subnets in taken]


def main() -> None:
    """Run inside the etcd host's namespace: prints the race's outcome as JSON."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print(json.dumps(asyncio.run(race(sys.argv[1], sys.argv[2]))))


@pytest.mark.parametrize("api", ["v3", "v2"])
def test_of_two_hosts_that_picked_one_ipv6_subnet_at_once_the_later_one_moves(
        bed_and_etcd: tuple[Testbed, EtcdServer], api: str) -> None:
    _, etcd = bed_and_etcd
    ran = etcd.host.run(sys.executable, "-c", "from tests.test_lease_race import main; main()",
                        api, etcd.host.underlay_ip)
    first, second = (Subnets.parse(name) for name in json.loads(ran.stdout))
    gave_way = [line for line in ran.stderr.splitlines()
                if "which another host took first; giving it up" in line]
    assert len(gave_way) == 1, ran.stderr
    assert not shares_a_subnet(first, second), ran.stderr
    # The one that stayed holds the subnet both picked; each key is there once, and the one
    # given up is gone.
    assert FIRST_FREE6 in (first.ipv6, second.ipv6)
    keys = etcd.get_prefix(f"{PREFIX}/subnets/", api)
    assert sorted(keys) == sorted(f"{PREFIX}/subnets/{s.name}" for s in (first, second))
    for key in keys:
        etcd.delete(key, api)
