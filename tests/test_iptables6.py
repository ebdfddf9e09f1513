"""control.host.iptables against the real flanneld v0.20.2 (../shared/reference/): for one
dual-stack config and lease, the iptables and ip6tables rules pyflannel keeps in one host
namespace are, as iptables-save and ip6tables-save print them, the ones flanneld installs in
another; put back in the same order when some go missing; removed on exit; recycled from the
previous run's values as flanneld recycles them; and ip6tables is never run while IPv6 is off."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from control.host.iptables import RuleKeeper, host_rules, recycle, supports_random_fully
from tests.cluster import put_config, wait_for
from tests.etcd import EtcdServer
from tests.flanneld import REFERENCE_FLANNELD, RealFlanneld
from tests.testbed import Host, Testbed, inside

NETWORK = ipaddress.IPv4Network("10.244.0.0/16")
IPV6_NETWORK = ipaddress.IPv6Network("fc00::/48")
DUAL_CONFIG = {"Network": str(NETWORK), "EnableIPv6": True, "IPv6Network": str(IPV6_NETWORK),
               "Backend": {"Type": "udp"}}
RESYNC = 0.2  # pyflannel's --iptables-resync here; flanneld keeps its default, 5 s
SAVE = {4: "iptables-save", 6: "ip6tables-save"}


def saved(host: Host, version: int) -> str:
    """iptables-save (or ip6tables-save) without what differs from one run to the next: its
    comment lines and the counters."""
    text = host.run(SAVE[version]).stdout
    return "\n".join(re.sub(r" \[\d+:\d+\]$", "", line) for line in text.splitlines()
                     if not line.startswith("#"))


def flannel_lines(host: Host, version: int) -> list[str]:
    return [line for line in saved(host, version).splitlines() if "flanneld" in line]


def in_namespace(host: Host, body: Callable[[], Awaitable[None]]) -> None:
    """Run `body` on an event loop whose thread is in `host`'s namespace, so the iptables
    commands it starts act there."""
    with inside(host.netns):
        asyncio.run(body())


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """wait_for, letting the event loop (and the keeper on it) run meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def flanneld(bed_and_etcd: tuple[Testbed, EtcdServer]) -> Iterator[RealFlanneld]:
    """flanneld v0.20.2 with --ip-masq (and its default --iptables-forward-rules) on a
    dual-stack udp config, its host's eth0 with an IPv6 address, once its rules are in."""
    if not os.path.exists(REFERENCE_FLANNELD):
        pytest.skip(f"no reference flanneld at {REFERENCE_FLANNELD}")
    bed, etcd = bed_and_etcd
    put_config(etcd, "v3", DUAL_CONFIG)
    host = bed.add_host()
    host.ip("-6", "addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad")
    daemon = RealFlanneld(REFERENCE_FLANNELD, bed, host, etcd)
    daemon.command.append("--ip-masq")
    daemon.start()
    try:
        daemon.wait_subnet()
        for version in (4, 6):
            wait_for(lambda v=version: len(flannel_lines(host, v)) == 9, 10,  # type: ignore[misc]
                     f"flanneld's {SAVE[version]} shows its 9 rules")
        yield daemon
    finally:
        daemon.stop()


def leased(flanneld: RealFlanneld) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network]:
    env = flanneld.subnet_env()
    return (ipaddress.IPv4Network(env["FLANNEL_SUBNET"], strict=False),
            ipaddress.IPv6Network(env["FLANNEL_IPV6_SUBNET"], strict=False))


def test_rules_are_flanneld_s_kept_in_order_and_removed(
        flanneld: RealFlanneld, bed_and_etcd: tuple[Testbed, EtcdServer]) -> None:
    subnet, ipv6_subnet = leased(flanneld)
    f_host, p_host = flanneld.host, bed_and_etcd[0].add_host()

    def same_as_flanneld() -> bool:
        return all(saved(p_host, v) == saved(f_host, v) for v in (4, 6))

    async def body() -> None:
        keeper = RuleKeeper(RESYNC)
        keeper.rules = await host_rules(True, True, NETWORK, subnet, IPV6_NETWORK, ipv6_subnet)
        assert await supports_random_fully(6)  # so the rules below have --random-fully
        task = asyncio.create_task(keeper.keep())
        await wait_until(lambda: len(flannel_lines(p_host, 6)) == 9, 5, "the rules are in")
        for version in (4, 6):
            assert saved(p_host, version) == saved(f_host, version)
        masquerade = [line for line in flannel_lines(p_host, 6) if "MASQUERADE" in line]
        assert masquerade == [
            f'-A FLANNEL-POSTRTG -s {IPV6_NETWORK} ! -d ff00::/8 -m comment --comment '
            '"flanneld masq" -j MASQUERADE --random-fully',
            f'-A FLANNEL-POSTRTG ! -s {IPV6_NETWORK} -d {IPV6_NETWORK} -m comment --comment '
            '"flanneld masq" -j MASQUERADE --random-fully']

        # Someone deletes a rule in the middle of a chain, and a whole chain with its jump:
        # each set is rebuilt in flanneld's order, on both hosts.
        for host in (p_host, f_host):
            host.run("ip6tables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "-s", str(IPV6_NETWORK),
                     "-d", str(IPV6_NETWORK), "-m", "comment", "--comment", "flanneld masq",
                     "-j", "RETURN")
            host.run("ip6tables", "-D", "FORWARD", "-m", "comment", "--comment",
                     "flanneld forward", "-j", "FLANNEL-FWD")
            host.run("ip6tables", "-F", "FLANNEL-FWD")
            host.run("ip6tables", "-X", "FLANNEL-FWD")
        await wait_until(lambda: len(flannel_lines(p_host, 6)) == 9, 5, "pyflannel rebuilt")
        await wait_until(lambda: len(flannel_lines(f_host, 6)) == 9, 12, "flanneld rebuilt")
        await wait_until(same_as_flanneld, 5, "the same rules again")

        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for version in (4, 6):
            assert flannel_lines(p_host, version) == []
            # The chains stay, empty, as flanneld leaves them.
            assert ":FLANNEL-POSTRTG -" in saved(p_host, version).splitlines()

    in_namespace(p_host, body)


def test_previous_run_s_masquerade_is_recycled_as_flanneld_does(testbed: Testbed) -> None:
    host = testbed.add_host()
    old = (ipaddress.IPv4Network("10.5.0.0/16"), ipaddress.IPv4Network("10.5.3.0/24"),
           ipaddress.IPv6Network("fd00:1::/48"), ipaddress.IPv6Network("fd00:1:0:3::/64"))
    # The previous run's subnet.env, as read_variables gives it (subnets as first addresses).
    previous = {"FLANNEL_NETWORK": "10.5.0.0/16", "FLANNEL_SUBNET": "10.5.3.1/24",
                "FLANNEL_IPV6_NETWORK": "fd00:1::/48", "FLANNEL_IPV6_SUBNET": "fd00:1:0:3::1/64",
                "FLANNEL_MTU": "1472", "FLANNEL_IPMASQ": "true"}
    new = (NETWORK, ipaddress.IPv4Network("10.244.5.0/24"),
           IPV6_NETWORK, ipaddress.IPv6Network("fc00:0:0:5::/64"))

    async def body() -> None:
        keeper = RuleKeeper(RESYNC)
        keeper.rules = await host_rules(True, False, *old)
        await keeper.replace(keeper.rules)  # in, as a run that ended without removing them
        assert [len(flannel_lines(host, v)) for v in (4, 6)] == [6, 6]
        # Only the Networks changed: flanneld keeps the old rules (it needs both to differ).
        await recycle(previous, new[0], old[1], new[2], old[3])
        assert [len(flannel_lines(host, v)) for v in (4, 6)] == [6, 6]
        # This run has no IPv6, or the file had none: IPv6's stay.
        await recycle({k: v for k, v in previous.items() if "IPV6" not in k}, *new)
        assert [len(flannel_lines(host, v)) for v in (4, 6)] == [0, 6]
        await keeper.replace(keeper.rules)
        await recycle(previous, *new[:2], None, None)
        assert [len(flannel_lines(host, v)) for v in (4, 6)] == [0, 6]
        await recycle(previous, *new)
        assert [len(flannel_lines(host, v)) for v in (4, 6)] == [0, 0]

    in_namespace(host, body)


def test_ip6tables_is_left_alone_while_ipv6_is_off(testbed: Testbed) -> None:
    host = testbed.add_host()

    async def body() -> None:
        keeper = RuleKeeper(RESYNC)
        keeper.rules = await host_rules(True, True, NETWORK,
                                        ipaddress.IPv4Network("10.244.3.0/24"), None, None)
        assert {rule.version for rule in keeper.rules} == {4}
        # IPv6-only, on a lease with no IPv6 subnet (a Node without an IPv6 podCIDR): the
        # forward rules alone.
        alone = await host_rules(True, True, None, None, IPV6_NETWORK, None)
        assert [(r.version, r.table) for r in alone] == [(6, "filter")] * 3
        task = asyncio.create_task(keeper.keep())
        await wait_until(lambda: len(flannel_lines(host, 4)) == 9, 5, "the IPv4 rules are in")
        await asyncio.sleep(2 * RESYNC)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    in_namespace(host, body)
    assert saved(host, 6) == ""  # no table was ever made


def test_start_empties_flannel_s_chains_of_an_earlier_run_s_rules(testbed: Testbed) -> None:
    host = testbed.add_host()
    host.run("ip6tables", "-N", "FLANNEL-FWD")
    host.run("ip6tables", "-A", "FLANNEL-FWD", "-s", "fd00:9::/48", "-j", "ACCEPT")

    async def body() -> None:
        keeper = RuleKeeper(RESYNC)
        keeper.rules = await host_rules(False, True, None, None, IPV6_NETWORK, None)
        task = asyncio.create_task(keeper.keep())
        await wait_until(lambda: len(flannel_lines(host, 6)) == 3, 5, "the rules are in")
        assert "fd00:9::/48" not in saved(host, 6)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    in_namespace(host, body)
