"""This host's subnet lease: the policy of flannel's LocalManager, written once against the
Registry interface — reuse, pick, create, renew, and take again when lost.

Two hosts that list the leases at the same moment can pick the same subnet of one family under
different keys (a dual-stack key names both subnets, and etcd's create-if-absent only stops the
same key): the one whose key was created later sees the other's and gives way. flanneld v0.20.2
does not look (and takes its previous subnets back from its subnet file when no lease has the
IPv4 one, whoever has the IPv6 one): where it created its key later, the pyflanneld host's
watch leaves its lease unrouted, and when it is still there GIVE_WAY_SECONDS later (watch.py),
the pyflanneld host deletes its own key and takes another subnet (`give_way`).

Keys are `<prefix>/subnets/<ip>-<len>`, with the IPv6 subnet after `&` in a dual-stack network
(`10.244.3.0-24&fc00:0:0:5::-64`); the value is flanneld's LeaseAttrs JSON. The udp backend
writes `{"PublicIP":"198.18.0.41","PublicIPv6":null}` byte for byte; other backends add fields
that readers ignore.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from control.subnet.config import NetworkConfig, go_ip6_text
from control.subnet.registry import Entry, LeaseStore, RegistryError

log = logging.getLogger("pyflanneld.lease")

RACE_RETRIES = 10          # flanneld's raceRetries: another host may win the create each time
PICK_FROM = 100            # flanneld picks at random among the first 100 free subnets
RETRY_SECONDS = 1.0
# flanneld's key pattern. Its prefix lengths are read as 5- and 7-bit numbers: /32 and /128
# keys are refused.
KEY = re.compile(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?")
NO_IPV4 = ipaddress.IPv4Network("0.0.0.0/0")  # an IPv6-only key's IPv4 part, as flanneld writes it


class LeaseError(ValueError):
    """A subnet key or lease value that cannot be read."""


class OutOfSubnetsError(Exception):
    """No free subnet is left between SubnetMin and SubnetMax (flanneld exits on it)."""


@dataclass(frozen=True)
class Subnets:
    """What one host's lease holds: its IPv4 subnet, its IPv6 subnet, or both (flanneld's
    Lease.Subnet and Lease.IPv6Subnet, which its key names together). Hosts, and their routes,
    are told apart by it."""
    ipv4: ipaddress.IPv4Network | None
    ipv6: ipaddress.IPv6Network | None = None

    @property
    def name(self) -> str:
        """The key's name under <prefix>/subnets/: "10.244.33.0-24", with "&fc00:0:0:5::-64"
        for an IPv6 subnet. An IPv6-only lease's IPv4 part is 0.0.0.0-0, as flanneld's."""
        ipv4 = self.ipv4 or NO_IPV4
        text = f"{ipv4.network_address}-{ipv4.prefixlen}"
        if self.ipv6 is not None:
            text += f"&{go_ip6_text(self.ipv6.network_address)}-{self.ipv6.prefixlen}"
        return text

    def __iter__(self) -> Iterator[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The subnets there are, IPv4 first."""
        return iter([subnet for subnet in (self.ipv4, self.ipv6) if subnet is not None])

    def __str__(self) -> str:
        return ", ".join(str(subnet) for subnet in self)

    @classmethod
    def parse(cls, name: str) -> Subnets:
        found = KEY.fullmatch(name)
        if found is None:
            raise LeaseError(f"subnet key {name!r} is not <ip>-<prefix length>[&<ipv6>-<prefix "
                             "length>]")
        address, length, address6, length6 = found.groups()
        try:
            if int(length) > 31 or (length6 is not None and int(length6) > 127):
                raise ValueError("prefix length out of range")
            ipv4 = ipaddress.IPv4Network(f"{address}/{int(length)}")
            ipv6 = None if address6 is None else ipaddress.IPv6Network(
                f"{address6}/{int(length6)}")
        except ValueError as err:
            raise LeaseError(f"subnet key {name!r}: {err}") from None
        if ipv4 == NO_IPV4:
            if ipv6 is None:
                raise LeaseError(f"subnet key {name!r} holds no subnet")
            return cls(None, ipv6)
        return cls(ipv4, ipv6)


@dataclass(frozen=True)
class PeerLease:
    """What a lease value says about its host."""
    public_ip: ipaddress.IPv4Address | None  # None: an IPv6-only host's (flanneld: 0.0.0.0)
    backend_type: str  # "" from flanneld's udp backend, which writes none
    backend_data: str | None = None  # BackendData as compact JSON text; None when absent
    public_ipv6: ipaddress.IPv6Address | None = None
    backend_v6_data: str | None = None  # BackendV6Data, as backend_data

    @property
    def via(self) -> str:
        """Its public addresses, for the log."""
        return ", ".join(str(ip) for ip in (self.public_ip, self.public_ipv6) if ip is not None)


def encode_lease(public_ip: ipaddress.IPv4Address | None, backend_type: str = "",
                 backend_data: str | None = None,
                 public_ipv6: ipaddress.IPv6Address | None = None,
                 backend_v6_data: str | None = None) -> bytes:
    """The value flanneld writes, byte for byte: Go's encoding of its LeaseAttrs struct, where
    PublicIPv6 is always there (null without one) and BackendType, BackendData and BackendV6Data
    are left out when empty (the udp backend sets none)."""
    attrs = {"PublicIP": str(public_ip or NO_IPV4.network_address),
             "PublicIPv6": None if public_ipv6 is None else str(public_ipv6)}
    if backend_type:
        attrs["BackendType"] = backend_type
    text = json.dumps(attrs, separators=(",", ":"))
    for key, data in (("BackendData", backend_data), ("BackendV6Data", backend_v6_data)):
        if data is not None:
            text = text[:-1] + f',"{key}":{data}}}'
    return text.encode()


def _address(found: dict[str, object], key: str, version: int
             ) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = found.get(key.lower())
    if text is None:
        return None
    try:
        if not isinstance(text, str):
            raise ValueError(text)
        address = ipaddress.ip_address(text)
        if address.version != version:
            raise ValueError(text)
    except ValueError:
        raise LeaseError(f"lease {key} {text!r} is not an IPv{version} address") from None
    return None if address.is_unspecified else address


def decode_lease(value: bytes) -> PeerLease:
    """A lease value from any backend (keys match case-insensitively, as Go's decoder does;
    unknown fields are ignored)."""
    try:
        attrs = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LeaseError(f"lease value is not JSON: {err}") from None
    if not isinstance(attrs, dict):
        raise LeaseError("lease value is not a JSON object")
    found = {key.lower(): v for key, v in attrs.items()}
    if found.get("publicip") is None:
        raise LeaseError("lease PublicIP None is not an IPv4 address")
    public_ip = _address(found, "PublicIP", 4)
    public_ipv6 = _address(found, "PublicIPv6", 6)
    if public_ip is None and public_ipv6 is None:
        raise LeaseError("lease PublicIP is 0.0.0.0 and there is no PublicIPv6")
    backend_type = found.get("backendtype")
    if backend_type is None:
        backend_type = ""
    elif not isinstance(backend_type, str):
        raise LeaseError(f"lease BackendType {backend_type!r} is not a string")
    data, data6 = found.get("backenddata"), found.get("backendv6data")
    assert public_ip is None or isinstance(public_ip, ipaddress.IPv4Address)
    assert public_ipv6 is None or isinstance(public_ipv6, ipaddress.IPv6Address)
    return PeerLease(public_ip, backend_type,
                     None if data is None else json.dumps(data, separators=(",", ":")),
                     public_ipv6,
                     None if data6 is None else json.dumps(data6, separators=(",", ":")))


@dataclass(frozen=True)
class Choice:
    subnets: Subnets
    reuse: bool  # this host already holds the key: write it again rather than create it
    stale: Subnets | None = None  # this host's lease that no longer fits: delete


def fits(config: NetworkConfig, subnets: Subnets) -> bool:
    """flanneld's isSubnetConfigCompat for both families: a subnet of each family the config
    enables, of the right length inside [SubnetMin, SubnetMax], and none of a family it
    does not."""
    if config.enable_ipv4 != (subnets.ipv4 is not None):
        return False
    if config.enable_ipv6 != (subnets.ipv6 is not None):
        return False
    return ((subnets.ipv4 is None or config.subnet_fits(subnets.ipv4))
            and (subnets.ipv6 is None or config.ipv6_subnet_fits(subnets.ipv6)))


def _free(candidates: Iterator[ipaddress.IPv4Network] | Iterator[ipaddress.IPv6Network],
          taken: set, length: int) -> list:
    """The first PICK_FROM candidates that no taken subnet overlaps. Leases of this length are
    looked up whole; only others (from an earlier config) need an overlap test: with 10,000
    leases, overlap tests against all of them cost minutes."""
    odd = [subnet for subnet in taken if subnet.prefixlen != length]
    free = []
    for candidate in candidates:
        if candidate not in taken and not any(candidate.overlaps(subnet) for subnet in odd):
            free.append(candidate)
            if len(free) == PICK_FROM:
                break
    return free


def choose_subnet(config: NetworkConfig, leases: Iterable[tuple[Subnets, PeerLease | None]],
                  public_ip: ipaddress.IPv4Address | None,
                  public_ipv6: ipaddress.IPv6Address | None,
                  previous: Subnets | None, rng: random.Random) -> Choice:
    """flanneld's tryAcquireLease: this host's lease if it still fits the config; else the
    previous run's subnets if free and fitting; else a random one of the first free subnets of
    each family, picked apart. `leases` holds every subnet key with its value (None for an
    unreadable one: its subnets still count as taken).

    This host's lease is the one with its PublicIP, as flanneld finds it; in an IPv6-only
    network (or on an IPv6-only underlay, PublicIP 0.0.0.0), the one with its PublicIPv6
    (flanneld looks for PublicIP 0.0.0.0 there, which every host's lease has, and takes
    another host's subnet)."""
    leases = list(leases)
    stale = None

    def is_mine(lease: PeerLease | None) -> bool:
        if lease is None:
            return False
        if config.enable_ipv4 and public_ip is not None:
            return lease.public_ip == public_ip
        return lease.public_ip is None and lease.public_ipv6 == public_ipv6

    mine = next((subnets for subnets, lease in leases if is_mine(lease)), None)
    if mine is not None:
        if fits(config, mine):
            return Choice(mine, reuse=True)
        stale = mine
        leases = [(subnets, lease) for subnets, lease in leases if subnets != mine]
    taken4 = {subnets.ipv4 for subnets, _ in leases if subnets.ipv4 is not None}
    taken6 = {subnets.ipv6 for subnets, _ in leases if subnets.ipv6 is not None}
    if previous is not None:
        clash = ((previous.ipv4 is not None and previous.ipv4 in taken4)
                 or (previous.ipv6 is not None
                     and any(previous.ipv6.overlaps(subnet) for subnet in taken6)))
        if clash:
            log.warning("previous subnet %s is leased by another host; not reusing it",
                        previous)
        elif not fits(config, previous):
            log.warning("previous subnet %s does not fit the config; not reusing it", previous)
        else:
            return Choice(previous, reuse=False, stale=stale)
    ipv4 = ipv6 = None
    if config.enable_ipv4:
        free4 = _free(config.subnets(), taken4, config.subnet_len)
        if not free4:
            raise OutOfSubnetsError(
                f"out of subnets: every /{config.subnet_len} from {config.subnet_min} to "
                f"{config.subnet_max} is leased")
        ipv4 = rng.choice(free4)
    if config.enable_ipv6:
        free6 = _free(config.ipv6_subnets(), taken6, config.ipv6_subnet_len)
        if not free6:
            raise OutOfSubnetsError(
                f"out of subnets: every /{config.ipv6_subnet_len} from "
                f"{config.ipv6_subnet_min} to {config.ipv6_subnet_max} is leased")
        ipv6 = rng.choice(free6)
    return Choice(Subnets(ipv4, ipv6), reuse=False, stale=stale)


def shares_a_subnet(one: Subnets, other: Subnets) -> bool:
    return any(a is not None and b is not None and a.overlaps(b)
               for a, b in ((one.ipv4, other.ipv4), (one.ipv6, other.ipv6)))


def taken_first(mine: Subnets, entries: Sequence[Entry]) -> Subnets | None:
    """The subnets of another key that shares a subnet with this host's key `mine` and was
    created before it: this host must give way. None when there is none, or when `mine` is not
    in the listing (lost: taken again anyway)."""
    created = next((entry.created for entry in entries if entry.name == mine.name), None)
    if created is None:
        return None
    for entry in entries:
        if entry.created < created and entry.name != mine.name:
            try:
                other = Subnets.parse(entry.name)
            except LeaseError:
                continue
            if shares_a_subnet(mine, other):
                return other
    return None


def readable_leases(entries: Iterable[tuple[str, bytes]]
                    ) -> list[tuple[Subnets, PeerLease | None]]:
    """Subnet keys with their values; keys whose name cannot be read are left out."""
    leases: list[tuple[Subnets, PeerLease | None]] = []
    for name, value in entries:
        try:
            subnets = Subnets.parse(name)
        except LeaseError:
            continue
        try:
            leases.append((subnets, decode_lease(value)))
        except LeaseError:
            leases.append((subnets, None))
    return leases


class Keeper(Protocol):
    """This host's lease, as the daemon, the watch and /metrics see it, whichever subnet
    manager holds it (LeaseKeeper in etcd, kube.py's NodeLease in Kubernetes)."""

    subnet: Subnets | None
    value: bytes  # the lease's value as the registry shows it: the watch compares it
    errors: int  # failed attempts to take or keep it

    @property
    def held(self) -> bool: ...

    def expires_in(self) -> float: ...

    def lost(self) -> None:
        """The watch saw this host's lease changed by another, or gone."""

    def give_way(self) -> None:
        """The watch saw another host's lease share a subnet with this host's for a while:
        take another subnet."""

    async def acquire(self) -> Subnets: ...

    async def complete(self) -> None:
        """Once the host serves its subnet (subnet.env written)."""

    async def leaving(self) -> bool:
        """Whether this host leaves the cluster as the daemon stops (what it kept for a next
        run then goes), rather than restarting."""

    async def keep(self, on_change: Callable[[Subnets], Awaitable[None]]) -> None: ...


class LeaseKeeper:
    """Takes this host's lease and keeps it: renews it `renew_margin` seconds before it expires,
    and takes one again when it is lost (expired, deleted, or taken over), calling `on_change`
    when that gives a different subnet. The lease is kept on exit, as flanneld does. This
    host's public addresses are those of the backend's lease value."""

    def __init__(self, registry: LeaseStore, config: NetworkConfig, value: bytes,
                 previous: Subnets | None, *, ttl: int,
                 renew_margin: float = 3600.0, rng: random.Random | None = None) -> None:
        self._registry = registry
        self._config = config
        self._previous = previous
        self._ttl = ttl
        self._renew_margin = renew_margin
        self._rng = rng or random.Random()
        self.value = value  # the backend's lease value for this host
        self._lost = asyncio.Event()
        self._giving_way = False  # the lost lease is to be deleted before one is taken again
        self.subnet: Subnets | None = None
        self._renew_at = 0.0  # time.monotonic()
        self.errors = 0  # failed attempts to take or renew the lease

    @property
    def held(self) -> bool:
        return self.subnet is not None and not self._lost.is_set()

    def expires_in(self) -> float:
        """Seconds until the lease expires if it is not renewed (renewal comes renew_margin
        before that)."""
        return max(self._renew_at + self._renew_margin - time.monotonic(), 0.0)

    def lost(self) -> None:
        """Called when the watch sees this host's key deleted or taken over."""
        self._lost.set()

    def give_way(self) -> None:
        """Called when another host's lease has shared a subnet with this host's for a while:
        this host deletes its key (else it would find and reuse it) and takes another."""
        self._giving_way = True
        self._lost.set()

    async def acquire(self) -> Subnets:
        """Take a lease; retried while etcd is unreachable. Raises OutOfSubnetsError."""
        while True:
            try:
                subnet = await self._try_acquire()
            except RegistryError as err:
                self.errors += 1
                log.error("taking a lease failed, trying again in %gs: %s", RETRY_SECONDS, err)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            self._lost.clear()
            self.subnet = self._previous = subnet
            return subnet

    async def _try_acquire(self) -> Subnets:
        own = decode_lease(self.value)
        public = own.via
        for _ in range(RACE_RETRIES):
            entries, _ = await self._registry.list_subnets()
            leases = readable_leases((e.name, e.value) for e in entries)
            choice = choose_subnet(self._config, leases, own.public_ip, own.public_ipv6,
                                   self._previous, self._rng)
            if choice.stale is not None:
                log.info("lease %s of this host does not fit the config; deleting it",
                         choice.stale)
                await self._registry.delete_subnet(choice.stale.name)
            name = choice.subnets.name
            started = time.monotonic()
            if choice.reuse:
                await self._registry.update_subnet(name, self.value, self._ttl, None)
                log.info("found lease %s for this host's IP %s; reusing it", choice.subnets,
                         public)
            elif await self._registry.create_subnet(name, self.value, self._ttl):
                log.info("leased subnet %s to this host (%s)", choice.subnets, public)
            else:
                log.info("subnet %s was taken by another host meanwhile; choosing again",
                         choice.subnets)
                continue
            entries, _ = await self._registry.list_subnets()
            first = taken_first(choice.subnets, entries)
            if first is not None:
                log.warning("lease %s shares a subnet with lease %s, which another host took "
                            "first; giving it up and choosing again", choice.subnets, first)
                await self._registry.delete_subnet(name)
                continue
            self._renew_at = started + self._ttl - self._renew_margin
            return choice.subnets
        raise RegistryError(f"another host won the race for a subnet {RACE_RETRIES} times")

    async def complete(self) -> None:
        """Nothing to add in etcd once the host serves its subnet."""

    async def leaving(self) -> bool:
        """etcd cannot tell: a stop is taken for a restart."""
        return False

    async def keep(self, on_change: Callable[[Subnets], Awaitable[None]]) -> None:
        """Renew before expiry; take a lease again when lost. Runs until cancelled."""
        while True:
            try:
                async with asyncio.timeout(max(self._renew_at - time.monotonic(), 0.0)):
                    await self._lost.wait()
            except TimeoutError:
                if await self._renew():
                    continue
            old = self.subnet
            if self._giving_way:
                assert old is not None
                await self._delete(old)
                self._giving_way = False
            else:
                log.warning("lease %s was lost; taking one again", old)
            new = await self._reacquire()
            if new != old:
                await on_change(new)

    async def _delete(self, subnets: Subnets) -> None:
        """Delete this host's key; retried while etcd is unreachable."""
        while True:
            try:
                await self._registry.delete_subnet(subnets.name)
                log.info("deleted lease %s of this host", subnets)
                return
            except RegistryError as err:
                self.errors += 1
                log.error("deleting lease %s failed, trying again in %gs: %s", subnets,
                          RETRY_SECONDS, err)
                await asyncio.sleep(RETRY_SECONDS)

    async def _reacquire(self) -> Subnets:
        """acquire(), but a full Network is waited out (leases expire, hosts leave): at start
        it is fatal, here the daemon keeps forwarding for the routes it has, unhealthy."""
        while True:
            try:
                return await self.acquire()
            except OutOfSubnetsError as err:
                self.errors += 1
                log.error("taking a lease again failed, trying again in %gs: %s",
                          RETRY_SECONDS, err)
                await asyncio.sleep(RETRY_SECONDS)

    async def _renew(self) -> bool:
        """Renew the lease; False when it is no longer ours."""
        assert self.subnet is not None
        started = time.monotonic()
        try:
            renewed = await self._registry.update_subnet(
                self.subnet.name, self.value, self._ttl, self.value)
        except RegistryError as err:
            self.errors += 1
            retry = min(60.0, max(1.0, self._renew_margin / 4))
            log.error("renewing lease %s failed, trying again in %gs: %s", self.subnet, retry,
                      err)
            self._renew_at = time.monotonic() + retry
            return True
        if renewed:
            self._renew_at = started + self._ttl - self._renew_margin
            log.info("renewed lease %s for %ds", self.subnet, self._ttl)
        return renewed
