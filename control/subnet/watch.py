"""Keeps the backend's routes equal to the leases in etcd, and never loses an event.

List <prefix>/subnets/ once, then watch from the listing's revision + 1 on one stream. When the
stream breaks (etcd restarted, connection lost) resume after the last revision seen; when etcd no
longer has that history (compaction, v2 index cleared) list again and reconcile. Each listing
reconciles every route, and lets the backend remove what no lease explains (in the kernel,
from an earlier run), so a route can only be missing or stale while etcd is unreachable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from control.backend.common import Backend
from control.subnet.config import NetworkConfig
from control.subnet.lease import LeaseError, PeerLease, Subnets, decode_lease, shares_a_subnet
from control.subnet.registry import Change, Entry, HistoryLostError, Registry, RegistryError

log = logging.getLogger("pyflanneld.watch")

RETRY_SECONDS = 1.0
# A v2 lease that expired stays routed this long. When etcd comes back from an outage longer than
# the TTL it expires every lease at once, and each owner takes its subnet again within moments:
# removing the route at once would drop that host's traffic meanwhile. A host that is really gone
# loses nothing by it; a new lease for the subnet replaces the route as soon as it comes.
EXPIRED_GRACE_SECONDS = 10.0
# Another host's lease that shares a subnet with this host's (lease.py) and is still there this
# long after it was seen: its host did not give way, as a pyflanneld host whose key is the later
# one does within a listing, so it does not look (flanneld): this host takes another subnet.
GIVE_WAY_SECONDS = 5.0


class SubnetWatcher:
    def __init__(self, registry: Registry, config: NetworkConfig, backend: Backend,
                 own_subnet: Callable[[], Subnets | None],
                 own_value: Callable[[], bytes], on_own_lost: Callable[[], None],
                 give_way: Callable[[], None]) -> None:
        self._registry = registry
        self._config = config
        self._backend = backend
        self._own_subnet = own_subnet
        self._own_value = own_value
        self._on_own_lost = on_own_lost
        self._give_way = give_way
        self._cycle: asyncio.Future[None] | None = None
        self._resync_requested = False
        self._revision: int | None = None  # of the last change applied
        self.peers: dict[Subnets, PeerLease] = {}  # the routed ones
        self._expiring: dict[Subnets, asyncio.TimerHandle] = {}
        self._clashing: dict[Subnets, asyncio.TimerHandle] = {}  # giving way to them when due
        self.events_applied = 0
        self.restarts = {"history_lost": 0, "error": 0}  # why the watch started again

    async def run(self) -> None:
        """List and watch until cancelled."""
        revision: int | None = None
        while True:
            self._cycle = asyncio.ensure_future(self._list_and_watch(revision))
            try:
                await self._cycle
            except HistoryLostError as err:
                self.restarts["history_lost"] += 1
                log.warning("%s; listing the leases again", err)
                revision = None
            except RegistryError as err:
                self.restarts["error"] += 1
                log.error("watching leases failed, resuming in %gs: %s", RETRY_SECONDS, err)
                revision = self._revision
                await asyncio.sleep(RETRY_SECONDS)
            except asyncio.CancelledError:
                if not self._resync_requested:
                    raise
                self._resync_requested = False
                revision = None

    def resync(self) -> None:
        """List again and reconcile (after this host's own subnet changed)."""
        if self._cycle is not None and not self._cycle.done():
            self._resync_requested = True
            self._cycle.cancel()

    async def _list_and_watch(self, revision: int | None) -> None:
        if revision is None:
            revision = await self._list()
        self._revision = revision
        async for change in self._registry.watch_subnets(revision):
            self._apply(change)
            self.events_applied += 1
            self._revision = change.revision

    async def _list(self) -> int:
        """List and reconcile; the revision listed. The listing goes with this frame: held
        while watching, 10,000 leases would be 2 MiB for nothing."""
        entries, revision = await self._registry.list_subnets()
        self._reconcile(entries)
        return revision

    def _reconcile(self, entries: list[Entry]) -> None:
        own = self._own_subnet()
        wanted: dict[Subnets, PeerLease] = {}
        own_seen = False
        clashing: set[Subnets] = set()
        for entry in entries:
            subnet = self._subnet(entry.name)
            if subnet is None:
                continue
            if subnet == own:
                own_seen = entry.value == self._own_value()
                continue
            if self._shares_own(subnet, own):
                clashing.add(subnet)
                continue
            peer = self._peer(subnet, entry.value)
            if peer is not None:
                wanted[subnet] = peer
        for subnet in list(self._clashing):
            if subnet not in clashing:
                self._forget_clash(subnet)
        for subnet in list(self.peers):
            if subnet not in wanted:
                self._remove(subnet)
        for subnet, peer in wanted.items():
            self._add(subnet, peer)
        self._backend.prune(self.peers)
        if own is not None and not own_seen:
            self._on_own_lost()

    def _apply(self, change: Change) -> None:
        subnet = self._subnet(change.name)
        if subnet is None:
            return
        own = self._own_subnet()
        if subnet == own:
            if change.value != self._own_value():
                self._on_own_lost()
            return
        if change.value is None:  # a key's subnets are its name: only its going ends a clash
            self._forget_clash(subnet)
        elif self._shares_own(subnet, own):
            self._remove(subnet)
            return
        if change.expired and subnet in self.peers:
            if subnet not in self._expiring:
                log.info("lease %s expired; keeping its route for %gs unless it comes back",
                         subnet, EXPIRED_GRACE_SECONDS)
                self._expiring[subnet] = asyncio.get_running_loop().call_later(
                    EXPIRED_GRACE_SECONDS, self._remove, subnet)
            return
        peer = None if change.value is None else self._peer(subnet, change.value)
        if peer is None:
            self._remove(subnet)
        else:
            self._add(subnet, peer)

    def _subnet(self, name: str) -> Subnets | None:
        """The key's subnets; None, logged, for a key that cannot be routed. Of a family this
        network does not have, a subnet is left to the backend, which routes only those it has."""
        try:
            subnets = Subnets.parse(name)
        except LeaseError as err:
            log.warning("ignoring a key under subnets/: %s", err)
            return None
        config = self._config
        if config.enable_ipv4 and subnets.ipv4 is not None and not (
                subnets.ipv4.prefixlen == config.subnet_len
                and config.network is not None and subnets.ipv4.subnet_of(config.network)):
            log.warning("ignoring lease %s: not a /%d of the Network %s", subnets,
                        config.subnet_len, config.network)
            return None
        if config.enable_ipv6 and subnets.ipv6 is not None and not (
                subnets.ipv6.prefixlen == config.ipv6_subnet_len
                and config.ipv6_network is not None
                and subnets.ipv6.subnet_of(config.ipv6_network)):
            log.warning("ignoring lease %s: not a /%d of the IPv6Network %s", subnets,
                        config.ipv6_subnet_len, config.ipv6_network)
            return None
        if not ((config.enable_ipv4 and subnets.ipv4 is not None)
                or (config.enable_ipv6 and subnets.ipv6 is not None)):
            log.warning("ignoring lease %s: it has no subnet of this network's families",
                        subnets)
            return None
        return subnets

    def _shares_own(self, subnet: Subnets, own: Subnets | None) -> bool:
        """Whether another host's lease shares a subnet with this host's: routing it would take
        this host's own traffic away. It happens for a moment when two pyflanneld hosts chose
        at once, until the later one gives way (lease.py); one that stays GIVE_WAY_SECONDS is a
        host that does not look, and this host gives way to it."""
        if own is None or not shares_a_subnet(subnet, own):
            return False
        if subnet not in self._clashing:
            log.warning("ignoring lease %s: it shares a subnet with this host's lease %s; this "
                        "host takes another in %gs if it stays", subnet, own, GIVE_WAY_SECONDS)
            self._clashing[subnet] = asyncio.get_running_loop().call_later(
                GIVE_WAY_SECONDS, self._clash_stayed, subnet)
        return True

    def _clash_stayed(self, subnet: Subnets) -> None:
        del self._clashing[subnet]
        log.warning("lease %s still shares a subnet with this host's lease %s: its host does "
                    "not look for that (flanneld v0.20.2); this host takes another", subnet,
                    self._own_subnet())
        self._give_way()

    def _forget_clash(self, subnet: Subnets) -> None:
        pending = self._clashing.pop(subnet, None)
        if pending is not None:
            pending.cancel()

    def _peer(self, subnet: Subnets, value: bytes) -> PeerLease | None:
        try:
            return decode_lease(value)
        except LeaseError as err:
            log.warning("ignoring lease %s: %s (value %r)", subnet, err, value[:200])
            return None

    def _add(self, subnet: Subnets, peer: PeerLease) -> None:
        self._keep(subnet)
        old = self.peers.get(subnet)
        if old == peer:
            return
        if self._backend.add_peer(subnet, peer, old):
            self.peers[subnet] = peer
            if old is None:
                log.info("subnet added: %s via %s", subnet, peer.via)
                if self._config.enable_ipv6 and subnet.ipv6 is None:
                    log.warning("lease %s has no IPv6 subnet: routed for IPv4 only", subnet)
            else:
                log.info("subnet changed: %s via %s (was %s)", subnet, peer.via, old.via)
        elif old is not None:  # the new value cannot be routed: neither can the old one stay
            self._remove(subnet)

    def _remove(self, subnet: Subnets) -> None:
        self._keep(subnet)
        peer = self.peers.pop(subnet, None)
        if peer is None:
            return
        self._backend.remove_peer(subnet, peer)
        log.info("subnet removed: %s", subnet)

    def _keep(self, subnet: Subnets) -> None:
        """Cancel the pending removal of an expired lease's route, if any."""
        pending = self._expiring.pop(subnet, None)
        if pending is not None:
            pending.cancel()
