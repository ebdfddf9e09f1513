"""flanneld's iptables and ip6tables rules: masquerade for traffic leaving the overlay (--ip-masq)
and FORWARD accepts for the Network (--iptables-forward-rules, on by default because Docker sets
the FORWARD policy to DROP). As flanneld v0.20.2 does (network/iptables.go), the rules live in the
FLANNEL-POSTRTG and FLANNEL-FWD chains, reached by a jump inserted at the head of POSTROUTING and
FORWARD; each set is checked every --iptables-resync seconds and, if any rule or chain is
missing, rebuilt whole in one iptables-restore transaction (their order is what makes them
work); they are deleted on exit. Both families go through the same code: a rule says which
command it belongs to, and a family whose network is None (IPv6 off, or IPv4 off) gets no rule,
so its command is never run."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

log = logging.getLogger("pyflanneld.iptables")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

KUBE_PROXY_MARK = "0x4000/0x4000"  # kube-proxy's masquerade mark: never NAT twice
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}
COMMAND = {4: "iptables", 6: "ip6tables"}
MASQ_CHAIN, FORWARD_CHAIN = "FLANNEL-POSTRTG", "FLANNEL-FWD"
WAIT_SECONDS = "5"  # for the xtables lock that kube-proxy and others also take
# subnet.env's names of each family's Network and subnet.
PREVIOUS = {4: ("FLANNEL_NETWORK", "FLANNEL_SUBNET"),
            6: ("FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET")}


@dataclass(frozen=True)
class Rule:
    version: int  # 4: iptables, 6: ip6tables
    table: str
    action: str  # "-I" for the jump into flannel's chain (ahead of what else is there), or "-A"
    chain: str
    spec: tuple[str, ...]

    @property
    def flannel_chain(self) -> str:
        """The FLANNEL- chain this rule lives in or jumps to: rebuilt when it is gone."""
        return self.chain if self.chain.startswith("FLANNEL-") else self.spec[-1]


def _commented(comment: str, *spec: str) -> tuple[str, ...]:
    """flanneld's rule shape: the matches, its comment, then the target."""
    jump = spec.index("-j")
    return (*spec[:jump], "-m", "comment", "--comment", comment, *spec[jump:])


def masq_rules(network: Network, subnet: Network, random_fully: bool) -> list[Rule]:
    """flanneld's MasqRules (IPv4) and MasqIP6Rules (IPv6): the same six rules, the multicast
    range the family's."""
    cluster, pod = str(network), str(subnet)
    masquerade = ("MASQUERADE", "--random-fully") if random_fully else ("MASQUERADE",)

    def rule(action: str, chain: str, *spec: str) -> Rule:
        return Rule(network.version, "nat", action, chain, _commented("flanneld masq", *spec))

    return [
        rule("-I", "POSTROUTING", "-j", MASQ_CHAIN),
        rule("-A", MASQ_CHAIN, "-m", "mark", "--mark", KUBE_PROXY_MARK, "-j", "RETURN"),
        # No NAT inside the overlay.
        rule("-A", MASQ_CHAIN, "-s", cluster, "-d", cluster, "-j", "RETURN"),
        # NAT what leaves the overlay, unless multicast.
        rule("-A", MASQ_CHAIN, "-s", cluster, "!", "-d", MULTICAST[network.version], "-j",
             *masquerade),
        # No NAT for outside traffic that reaches this host's containers.
        rule("-A", MASQ_CHAIN, "!", "-s", cluster, "-d", pod, "-j", "RETURN"),
        # NAT what the host sends into the overlay.
        rule("-A", MASQ_CHAIN, "!", "-s", cluster, "-d", cluster, "-j", *masquerade),
    ]


def forward_rules(network: Network) -> list[Rule]:
    def rule(action: str, chain: str, *spec: str) -> Rule:
        return Rule(network.version, "filter", action, chain,
                    _commented("flanneld forward", *spec))

    return [
        rule("-I", "FORWARD", "-j", FORWARD_CHAIN),
        rule("-A", FORWARD_CHAIN, "-s", str(network), "-j", "ACCEPT"),
        rule("-A", FORWARD_CHAIN, "-d", str(network), "-j", "ACCEPT"),
    ]


class IPTablesError(Exception):
    pass


async def _run(command: str, *args: str, stdin: str | None = None) -> tuple[int, str]:
    try:
        process = await asyncio.create_subprocess_exec(
            command, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=None if stdin is None else asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise IPTablesError(f"the {command} command is not installed") from None
    output, _ = await process.communicate(None if stdin is None else stdin.encode())
    return process.returncode or 0, output.decode(errors="replace").strip()


async def _iptables(version: int, *args: str) -> tuple[int, str]:
    return await _run(COMMAND[version], "-w", WAIT_SECONDS, *args)


async def supports_random_fully(version: int) -> bool:
    """MASQUERADE --random-fully needs iptables (or ip6tables) 1.6.2 or newer: go-iptables'
    test, which flanneld makes of each command. Without the command, no (keeping the rules
    then says it is missing)."""
    try:
        status, text = await _iptables(version, "--version")
    except IPTablesError:
        return False
    found = re.search(r"v(\d+)\.(\d+)\.(\d+)", text)
    return status == 0 and found is not None and tuple(map(int, found.groups())) >= (1, 6, 2)


async def host_rules(ip_masq: bool, forward: bool,
                     network: ipaddress.IPv4Network | None, subnet: ipaddress.IPv4Network | None,
                     ipv6_network: ipaddress.IPv6Network | None,
                     ipv6_subnet: ipaddress.IPv6Network | None) -> list[Rule]:
    """All of flanneld's rules for this host: --ip-masq's and --iptables-forward-rules', for
    IPv4 where `network` is given (EnableIPv4) and IPv6 where `ipv6_network` is (EnableIPv6).
    The masquerade rules of a family also need the lease's subnet of it: a lease without one
    (a Node with no IPv6 podCIDR) has that family's forward rules only."""
    rules: list[Rule] = []
    for cluster, pod in ((network, subnet), (ipv6_network, ipv6_subnet)):
        if cluster is None:
            continue
        if ip_masq and pod is not None:
            rules += masq_rules(cluster, pod, await supports_random_fully(cluster.version))
        if forward:
            rules += forward_rules(cluster)
    return rules


def _previous(previous: Mapping[str, str], key: str, version: int) -> Network | None:
    """A subnet.env value as flanneld's ReadCIDRFromSubnetFile reads it: masked; None where
    it is missing or no network of the family."""
    try:
        network = ipaddress.ip_network(previous.get(key, ""), strict=False)
    except ValueError:
        return None
    return network if network.version == version else None


async def recycle(previous: Mapping[str, str],
                  network: ipaddress.IPv4Network | None, subnet: ipaddress.IPv4Network | None,
                  ipv6_network: ipaddress.IPv6Network | None,
                  ipv6_subnet: ipaddress.IPv6Network | None) -> None:
    """flanneld's recycleIPTables and recycleIP6Tables (with --ip-masq, before subnet.env is
    written again): for each family in use, where the Network and the subnet that the previous
    run's subnet.env (`previous`, its variables) gave both differ from this run's, that run's
    masquerade rules are deleted. A family that is off now, or that the file did not have, is
    left alone."""
    for version, cluster, pod in ((4, network, subnet), (6, ipv6_network, ipv6_subnet)):
        old_cluster, old_pod = (_previous(previous, key, version) for key in PREVIOUS[version])
        if cluster is None or pod is None or old_cluster is None or old_pod is None:
            continue
        if old_cluster != cluster and old_pod != pod:
            log.info("iptables: network or subnet (%s, %s) differ from the previous run's (%s,"
                     " %s): removing its masquerade rules", cluster, pod, old_cluster, old_pod)
            await remove(masq_rules(old_cluster, old_pod, await supports_random_fully(version)))


async def _chain_exists(version: int, table: str, chain: str) -> bool:
    return (await _iptables(version, "-t", table, "-S", chain))[0] == 0


async def _exists(rule: Rule) -> bool:
    return (await _iptables(rule.version, "-t", rule.table, "-C", rule.chain, *rule.spec))[0] == 0


async def _new_chain(version: int, table: str, chain: str) -> None:
    status, output = await _iptables(version, "-t", table, "-N", chain)
    if status != 0:
        raise IPTablesError(f"creating chain {chain} in table {table}: {output}")


async def _all_exist(rules: list[Rule]) -> bool:
    for rule in rules:
        if not await _chain_exists(rule.version, rule.table, rule.flannel_chain):
            return False
        if not await _exists(rule):
            return False
    return True


def _restore_line(*words: str) -> str:
    """One iptables-restore line; the comment quoted, as flanneld's payload has it."""
    return " ".join(f'"{word}"' if i and words[i - 1] == "--comment" else word
                    for i, word in enumerate(words))


async def _rebuild(version: int, table: str, rules: list[Rule]) -> None:
    """flanneld's ipTablesBootstrap: the chains made where missing, then in one iptables-restore
    transaction each rule that is there deleted and every rule added in order."""
    for chain in sorted({rule.flannel_chain for rule in rules}):
        if not await _chain_exists(version, table, chain):
            await _new_chain(version, table, chain)
    lines = [f"*{table}"]
    for rule in rules:
        if await _exists(rule):
            lines.append(_restore_line("-D", rule.chain, *rule.spec))
        lines.append(_restore_line(rule.action, rule.chain, *rule.spec))
    lines.append("COMMIT\n")
    status, output = await _run(f"{COMMAND[version]}-restore", "--noflush", "--wait",
                                stdin="\n".join(lines))
    if status != 0:
        raise IPTablesError(f"{COMMAND[version]}-restore into table {table}: {output}")


def _sets(rules: list[Rule]) -> dict[tuple[int, str], list[Rule]]:
    """The rules by command and table: --ip-masq's and --iptables-forward-rules' of each family,
    each set kept as one (as flanneld keeps each in a goroutine of its own)."""
    sets: dict[tuple[int, str], list[Rule]] = {}
    for rule in rules:
        sets.setdefault((rule.version, rule.table), []).append(rule)
    return sets


async def clear_chains(rules: list[Rule]) -> None:
    """flanneld's CreateIP4Chain/CreateIP6Chain at start: flannel's chains made, or emptied of
    what an earlier run left in them."""
    chains = {(rule.version, rule.table, rule.flannel_chain) for rule in rules}
    for version, table, chain in sorted(chains):
        if not await _chain_exists(version, table, chain):
            await _new_chain(version, table, chain)
            continue
        status, output = await _iptables(version, "-t", table, "-F", chain)
        if status != 0:
            raise IPTablesError(f"emptying chain {chain} in table {table}: {output}")


async def ensure(rules: list[Rule]) -> int:
    """Rebuild each set of rules of which a rule or a chain is missing; returns how many sets
    were rebuilt."""
    rebuilt = 0
    for (version, table), members in _sets(rules).items():
        if not await _all_exist(members):
            await _rebuild(version, table, members)
            rebuilt += 1
    return rebuilt


async def remove(rules: Iterable[Rule]) -> None:
    """Delete the rules that are there (the chains stay, as flanneld leaves them)."""
    for rule in rules:
        while (await _iptables(rule.version, "-t", rule.table, "-D", rule.chain,
                               *rule.spec))[0] == 0:
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
        """As flanneld: flannel's chains emptied and the rules added at start, then put back
        every resync period."""
        try:
            try:
                await clear_chains(self.rules)
                await ensure(self.rules)
            except IPTablesError as err:
                log.error("iptables: %s", err)
            while True:
                await asyncio.sleep(self._resync)
                try:
                    if await ensure(self.rules):
                        log.info("iptables: some rules were missing: deleted and added again")
                except IPTablesError as err:
                    log.error("iptables: %s", err)
        finally:
            await remove(self.rules)
