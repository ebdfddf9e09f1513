"""This host's subnet lease: the policy of flannel's LocalManager, written once against the
Registry interface — reuse, pick, create, renew, and take again when lost.

Keys are `<prefix>/subnets/<ip>-<len>`; the value is flanneld's LeaseAttrs JSON. The udp backend
writes `{"PublicIP":"198.18.0.41","PublicIPv6":null}` byte for byte; other backends add fields
that readers ignore.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from control.subnet.config import NetworkConfig
from control.subnet.registry import LeaseStore, RegistryError

log = logging.getLogger("pyflanneld.lease")

RACE_RETRIES = 10          # flanneld's raceRetries: another host may win the create each time
PICK_FROM = 100            # flanneld picks at random among the first 100 free subnets
RETRY_SECONDS = 1.0


class LeaseError(ValueError):
    """A subnet key or lease value that cannot be read."""


class OutOfSubnetsError(Exception):
    """No free subnet is left between SubnetMin and SubnetMax (flanneld exits on it)."""


def subnet_name(subnet: ipaddress.IPv4Network) -> str:
    """The key name under <prefix>/subnets/: "10.244.33.0-24"."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_name(name: str) -> ipaddress.IPv4Network:
    address, sep, length = name.partition("-")
    if not sep or not length.isdigit():
        raise LeaseError(f"subnet key {name!r} is not <ip>-<prefix length>")
    try:
        return ipaddress.IPv4Network(f"{address}/{int(length)}")
    except ValueError as err:
        raise LeaseError(f"subnet key {name!r}: {err}") from None


@dataclass(frozen=True)
class PeerLease:
    """What a lease value says about its host."""
    public_ip: ipaddress.IPv4Address
    backend_type: str  # "" from flanneld's udp backend, which writes none
    backend_data: str | None = None  # BackendData as compact JSON text; None when absent


def encode_lease(public_ip: ipaddress.IPv4Address, backend_type: str = "",
                 backend_data: str | None = None) -> bytes:
    """The value flanneld writes, byte for byte: Go's encoding of its LeaseAttrs struct, where
    BackendType and BackendData are left out when empty (the udp backend sets neither)."""
    text = json.dumps({"PublicIP": str(public_ip), "PublicIPv6": None}, separators=(",", ":"))
    if backend_type:
        text = text[:-1] + f',"BackendType":{json.dumps(backend_type)}}}'
    if backend_data is not None:
        text = text[:-1] + f',"BackendData":{backend_data}}}'
    return text.encode()


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
    public_ip = found.get("publicip")
    try:
        if not isinstance(public_ip, str):
            raise ValueError(public_ip)
        address = ipaddress.IPv4Address(public_ip)
    except ValueError:
        raise LeaseError(f"lease PublicIP {public_ip!r} is not an IPv4 address") from None
    if address == ipaddress.IPv4Address(0):
        raise LeaseError("lease PublicIP is 0.0.0.0")
    backend_type = found.get("backendtype")
    if backend_type is None:
        backend_type = ""
    elif not isinstance(backend_type, str):
        raise LeaseError(f"lease BackendType {backend_type!r} is not a string")
    data = found.get("backenddata")
    return PeerLease(address, backend_type,
                     None if data is None else json.dumps(data, separators=(",", ":")))


@dataclass(frozen=True)
class Choice:
    subnet: ipaddress.IPv4Network
    reuse: bool  # this host already holds the key: write it again rather than create it
    stale: ipaddress.IPv4Network | None = None  # this host's lease that no longer fits: delete


def choose_subnet(config: NetworkConfig,
                  leases: Iterable[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address | None]],
                  public_ip: ipaddress.IPv4Address,
                  previous: ipaddress.IPv4Network | None,
                  rng: random.Random) -> Choice:
    """flanneld's tryAcquireLease: this host's lease if it still fits the config; else the
    previous run's subnet if free and fitting; else a random one of the first free subnets.
    `leases` holds every subnet key with its PublicIP (None for an unreadable value: the subnet
    still counts as taken)."""
    leases = list(leases)
    stale = None
    mine = next((subnet for subnet, ip in leases if ip == public_ip), None)
    if mine is not None:
        if config.subnet_fits(mine):
            return Choice(mine, reuse=True)
        stale = mine
        leases = [(subnet, ip) for subnet, ip in leases if subnet != mine]
    taken = {subnet for subnet, _ in leases}
    if previous is not None:
        if previous in taken:
            log.warning("previous subnet %s is leased by another host; not reusing it", previous)
        elif not config.subnet_fits(previous):
            log.warning("previous subnet %s does not fit the config; not reusing it", previous)
        else:
            return Choice(previous, reuse=False, stale=stale)
    # Leases of this SubnetLen are looked up whole; only others (from an earlier config) need
    # an overlap test. With 10,000 leases, overlap tests against all of them cost minutes.
    odd = [subnet for subnet in taken if subnet.prefixlen != config.subnet_len]
    free = []
    for candidate in config.subnets():
        if candidate not in taken and not any(candidate.overlaps(subnet) for subnet in odd):
            free.append(candidate)
            if len(free) == PICK_FROM:
                break
    if not free:
        raise OutOfSubnetsError(
            f"out of subnets: every /{config.subnet_len} from {config.subnet_min} to "
            f"{config.subnet_max} is leased")
    return Choice(rng.choice(free), reuse=False, stale=stale)


def readable_leases(entries: Iterable[tuple[str, bytes]]
                    ) -> list[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address | None]]:
    """Subnet keys with their PublicIP; keys whose name cannot be read are left out."""
    leases = []
    for name, value in entries:
        try:
            subnet = parse_subnet_name(name)
        except LeaseError:
            continue
        try:
            leases.append((subnet, decode_lease(value).public_ip))
        except LeaseError:
            leases.append((subnet, None))
    return leases


class Keeper(Protocol):
    """This host's lease, as the daemon, the watch and /metrics see it, whichever subnet
    manager holds it (LeaseKeeper in etcd, kube.py's NodeLease in Kubernetes)."""

    subnet: ipaddress.IPv4Network | None
    value: bytes  # the lease's value as the registry shows it: the watch compares it
    errors: int  # failed attempts to take or keep it

    @property
    def held(self) -> bool: ...

    def expires_in(self) -> float: ...

    def lost(self) -> None:
        """The watch saw this host's lease changed by another, or gone."""

    async def acquire(self) -> ipaddress.IPv4Network: ...

    async def complete(self) -> None:
        """Once the host serves its subnet (subnet.env written)."""

    async def leaving(self) -> bool:
        """Whether this host leaves the cluster as the daemon stops (what it kept for a next
        run then goes), rather than restarting."""

    async def keep(self, on_change: Callable[[ipaddress.IPv4Network], Awaitable[None]]
                   ) -> None: ...


class LeaseKeeper:
    """Takes this host's lease and keeps it: renews it `renew_margin` seconds before it expires,
    and takes one again when it is lost (expired, deleted, or taken over), calling `on_change`
    when that gives a different subnet. The lease is kept on exit, as flanneld does."""

    def __init__(self, registry: LeaseStore, config: NetworkConfig,
                 public_ip: ipaddress.IPv4Address, value: bytes,
                 previous: ipaddress.IPv4Network | None, *, ttl: int,
                 renew_margin: float = 3600.0, rng: random.Random | None = None) -> None:
        self._registry = registry
        self._config = config
        self._public_ip = public_ip
        self._previous = previous
        self._ttl = ttl
        self._renew_margin = renew_margin
        self._rng = rng or random.Random()
        self.value = value  # the backend's lease value for this host
        self._lost = asyncio.Event()
        self.subnet: ipaddress.IPv4Network | None = None
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

    async def acquire(self) -> ipaddress.IPv4Network:
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

    async def _try_acquire(self) -> ipaddress.IPv4Network:
        for _ in range(RACE_RETRIES):
            entries, _ = await self._registry.list_subnets()
            leases = readable_leases((e.name, e.value) for e in entries)
            choice = choose_subnet(self._config, leases, self._public_ip, self._previous,
                                   self._rng)
            if choice.stale is not None:
                log.info("lease %s of this host does not fit the config; deleting it",
                         choice.stale)
                await self._registry.delete_subnet(subnet_name(choice.stale))
            name = subnet_name(choice.subnet)
            started = time.monotonic()
            if choice.reuse:
                await self._registry.update_subnet(name, self.value, self._ttl, None)
                log.info("found lease %s for this host's IP %s; reusing it", choice.subnet,
                         self._public_ip)
            elif await self._registry.create_subnet(name, self.value, self._ttl):
                log.info("leased subnet %s to this host (%s)", choice.subnet, self._public_ip)
            else:
                log.info("subnet %s was taken by another host meanwhile; choosing again",
                         choice.subnet)
                continue
            self._renew_at = started + self._ttl - self._renew_margin
            return choice.subnet
        raise RegistryError(f"another host won the race for a subnet {RACE_RETRIES} times")

    async def complete(self) -> None:
        """Nothing to add in etcd once the host serves its subnet."""

    async def leaving(self) -> bool:
        """etcd cannot tell: a stop is taken for a restart."""
        return False

    async def keep(self, on_change: Callable[[ipaddress.IPv4Network], Awaitable[None]]) -> None:
        """Renew before expiry; take a lease again when lost. Runs until cancelled."""
        while True:
            try:
                async with asyncio.timeout(max(self._renew_at - time.monotonic(), 0.0)):
                    await self._lost.wait()
            except TimeoutError:
                if await self._renew():
                    continue
            old = self.subnet
            log.warning("lease %s was lost; taking one again", old)
            new = await self._reacquire()
            if new != old:
                await on_change(new)

    async def _reacquire(self) -> ipaddress.IPv4Network:
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
                subnet_name(self.subnet), self.value, self._ttl, self.value)
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
