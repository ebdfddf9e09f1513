"""flanneld's iptables rules, through the iptables command: masquerade for traffic leaving the
overlay (--ip-masq) and FORWARD accepts for the Network (--iptables-forward-rules, on by
default because Docker sets the FORWARD policy to DROP). As flanneld does, the rules live in the
FLANNEL-POSTRTG and FLANNEL-FWD chains, are put back every --iptables-resync seconds if someone
removed them, and are deleted on exit."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from dataclasses import dataclass

log = logging.getLogger("pyflanneld.iptables")

KUBE_PROXY_MARK = "0x4000/0x4000"  # kube-proxy's masquerade mark: never NAT twice
MULTICAST = "224.0.0.0/4"


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    spec: tuple[str, ...]


def _commented(comment: str, *spec: str) -> tuple[str, ...]:
    """flanneld's rule shape: the matches, its comment, then the target."""
    jump = spec.index("-j")
    return (*spec[:jump], "-m", "comment", "--comment", comment, *spec[jump:])


def masq_rules(network: ipaddress.IPv4Network, subnet: ipaddress.IPv4Network,
               random_fully: bool) -> list[Rule]:
    cluster, pod = str(network), str(subnet)
    masquerade = ("MASQUERADE", "--random-fully") if random_fully else ("MASQUERADE",)

    def rule(chain: str, *spec: str) -> Rule:
        return Rule("nat", chain, _commented("flanneld masq", *spec))

    return [
        rule("POSTROUTING", "-j", "FLANNEL-POSTRTG"),
        rule("FLANNEL-POSTRTG", "-m", "mark", "--mark", KUBE_PROXY_MARK, "-j", "RETURN"),
        # No NAT inside the overlay.
        rule("FLANNEL-POSTRTG", "-s", pod, "-d", cluster, "-j", "RETURN"),
        rule("FLANNEL-POSTRTG", "-s", cluster, "-d", pod, "-j", "RETURN"),
        # No NAT for outside traffic that reaches this host's containers.
        rule("FLANNEL-POSTRTG", "!", "-s", cluster, "-d", pod, "-j", "RETURN"),
        # NAT what leaves the overlay, unless multicast; and what the host sends into it.
        rule("FLANNEL-POSTRTG", "-s", cluster, "!", "-d", MULTICAST, "-j", *masquerade),
        rule("FLANNEL-POSTRTG", "!", "-s", cluster, "-d", cluster, "-j", *masquerade),
    ]


def forward_rules(network: ipaddress.IPv4Network) -> list[Rule]:
    def rule(chain: str, *spec: str) -> Rule:
        return Rule("filter", chain, _commented("flanneld forward", *spec))

    return [
        rule("FORWARD", "-j", "FLANNEL-FWD"),
        rule("FLANNEL-FWD", "-s", str(network), "-j", "ACCEPT"),
        rule("FLANNEL-FWD", "-d", str(network), "-j", "ACCEPT"),
    ]


class IPTablesError(Exception):
    pass


async def _iptables(*args: str) -> tuple[int, str]:
    try:
        process = await asyncio.create_subprocess_exec(
            "iptables", "-w", "5", *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
    except FileNotFoundError:
        raise IPTablesError("the iptables command is not installed") from None
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode(errors="replace").strip()


async def supports_random_fully() -> bool:
    """MASQUERADE --random-fully needs iptables 1.6.2 or newer (go-iptables' test)."""
    status, version = await _iptables("--version")
    found = re.search(r"v(\d+)\.(\d+)\.(\d+)", version)
    return status == 0 and found is not None and tuple(map(int, found.groups())) >= (1, 6, 2)


async def ensure(rules: list[Rule]) -> int:
    """Create the chains and append the rules that are missing; returns how many were added."""
    added = 0
    chains = {(r.table, r.chain) for r in rules if r.chain.startswith("FLANNEL-")}
    for table, chain in sorted(chains):
        status, output = await _iptables("-t", table, "-N", chain)
        if status != 0 and "exists" not in output:
            raise IPTablesError(f"creating chain {chain} in table {table}: {output}")
    for rule in rules:
        if (await _iptables("-t", rule.table, "-C", rule.chain, *rule.spec))[0] == 0:
            continue
        status, output = await _iptables("-t", rule.table, "-A", rule.chain, *rule.spec)
        if status != 0:
            raise IPTablesError(f"adding {' '.join(rule.spec)} to {rule.chain}: {output}")
        added += 1
    return added


async def remove(rules: list[Rule]) -> None:
    """Delete the rules that are there (the chains stay, as flanneld leaves them)."""
    for rule in rules:
        while (await _iptables("-t", rule.table, "-D", rule.chain, *rule.spec))[0] == 0:
            pass  # duplicates too


class RuleKeeper:
    """Keeps a set of rules in place until cancelled, then removes them."""

    def __init__(self, resync_seconds: float) -> None:
        self._resync = resync_seconds
        self.rules: list[Rule] = []

    async def replace(self, rules: list[Rule]) -> None:
        """Swap in a new set (after the lease moved): the old rules go, the new ones come."""
        stale = [rule for rule in self.rules if rule not in rules]
        self.rules = rules
        await remove(stale)
        await ensure(rules)

    async def keep(self) -> None:
        try:
            while True:
                try:
                    added = await ensure(self.rules)
                    if added:
                        log.info("iptables: put back %d rule(s)", added)
                except IPTablesError as err:
                    log.error("iptables: %s", err)
                await asyncio.sleep(self._resync)
        finally:
            await remove(self.rules)
