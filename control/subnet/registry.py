"""Where leases live: one small interface, with etcd's v3 API (etcdv3.py through aetcd), its v2
API (etcdv2.py through python-etcd) and the Kubernetes API (kube.py) behind it. Storage only;
the lease policy is in lease.py (kube.py's NodeLease in Kubernetes) and the route keeping in
watch.py, written once against this interface."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

PROBE_SECONDS = 2.0  # how long start-up waits for some endpoint to take a connection


async def answering_first(endpoints: list[tuple[str, int]],
                          timeout: float = PROBE_SECONDS) -> list[tuple[str, int]]:
    """The endpoints, the first to take a TCP connection moved to the front. Both clients try
    their endpoints in order, each one that is down costing a timeout (5 s for an address that
    does not answer at all); asking all of them at once costs one round trip. Unchanged when
    none answers within `timeout` (the clients then say what is wrong)."""
    if len(endpoints) < 2:
        return endpoints

    async def probe(index: int) -> int:
        _, writer = await asyncio.open_connection(*endpoints[index])
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return index

    probes = [asyncio.ensure_future(probe(index)) for index in range(len(endpoints))]
    try:
        for finished in asyncio.as_completed(probes, timeout=timeout):
            try:
                first = await finished
            except TimeoutError:  # an OSError too: caught first
                break
            except OSError:  # refused, unreachable, no such name: the next one
                continue
            return [endpoints[first], *endpoints[:first], *endpoints[first + 1:]]
    finally:
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
    return endpoints


# The Registry methods that talk to etcd, the `operation` of an error counted by EtcdCounts.
OPERATIONS = ("get_config", "list_subnets", "create_subnet", "update_subnet", "delete_subnet",
              "watch_subnets")


class EtcdCounts:
    """How talking to etcd went, counted by each client as its calls end and read by /metrics
    at scrape time: plain ints, so a daemon without metrics pays an addition per call."""

    def __init__(self) -> None:
        # etcd answered again after a call failed, or another endpoint answered than before (a
        # failover): the client reconnected, to the same endpoint or the next. The first answer
        # ever is a connection, not a reconnection.
        self.reconnects = 0
        self.errors = dict.fromkeys(OPERATIONS, 0)  # Registry calls that failed, by method
        self._endpoint: str | None = None  # that answered last
        self._broken = False  # a call failed since it did

    def answered(self, endpoint: str) -> None:
        if self._endpoint is not None and (self._broken or endpoint != self._endpoint):
            self.reconnects += 1
        self._endpoint = endpoint
        self._broken = False

    def failed(self, operation: str) -> None:
        self.errors[operation] += 1
        self._broken = True


class RegistryError(Exception):
    """etcd could not be reached or refused a request; the caller retries."""


class HistoryLostError(RegistryError):
    """A watch asked for events that etcd no longer keeps (compacted, or v2's index cleared):
    the caller lists again."""


@dataclass(frozen=True)
class Entry:
    """One key under <prefix>/subnets/: its name there (e.g. "10.244.33.0-24"), value, and the
    revision that created it (0 where the store has none: Nodes are not created by hosts)."""

    name: str
    value: bytes
    created: int = 0


@dataclass(frozen=True)
class Change:
    """A watched change to <prefix>/subnets/<name>: value None means the key is gone, and
    expired that its TTL ran out (only v2 says so)."""

    name: str
    value: bytes | None
    revision: int
    expired: bool = False


class Registry(Protocol):
    """What the daemon and the watch read: the config, and the leases listed and watched
    (etcd's keys under <prefix>/subnets/, or kube.py's Nodes as such keys)."""

    counts: EtcdCounts
    config_source: str  # where the config is, for the log: a key, or a file

    async def get_config(self) -> bytes | None:
        """The config, or None when there is none."""

    async def list_subnets(self) -> tuple[list[Entry], int]:
        """Every key under <prefix>/subnets/, and the revision the listing reflects."""

    def watch_subnets(self, after_revision: int) -> AsyncIterator[Change]:
        """Every change under <prefix>/subnets/ after `after_revision`, in order, on one stream.
        Raises HistoryLostError when those changes are gone and RegistryError when the stream
        breaks (resume from the last revision seen)."""

    async def close(self) -> None: ...


class LeaseStore(Registry, Protocol):
    """An etcd registry, where this host writes and renews its own lease (lease.py)."""

    async def create_subnet(self, name: str, value: bytes, ttl: int) -> bool:
        """Create <prefix>/subnets/<name> expiring in ttl seconds, only if it does not exist.
        False when it already does (another host won)."""

    async def update_subnet(self, name: str, value: bytes, ttl: int,
                            expected: bytes | None) -> bool:
        """Write the key again with a fresh ttl. With `expected`, only if the key still holds
        exactly that value (False otherwise: the lease was lost)."""

    async def delete_subnet(self, name: str) -> None: ...
