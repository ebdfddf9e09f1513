"""The registry on etcd's v2 API (flanneld v0.17 and older), through python-etcd.

python-etcd blocks, so every call runs in a worker thread (asyncio.to_thread). Leases are key
TTLs; creation is a write with prevExist=false, as flanneld's. A watch is a chain of long polls
with waitIndex, so no change between two polls is missed while etcd keeps its event history.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import etcd
import urllib3.exceptions

from control.registry import Change, Entry, HistoryLostError, RegistryError

# A long poll returns at least this often, so a stopped daemon is not held up by a worker thread.
WATCH_POLL_SECONDS = 2.0
CALL_TIMEOUT = 5
DELETE_ACTIONS = {"delete", "expire", "compareAndDelete"}

T = TypeVar("T")


class EtcdV2Registry:
    def __init__(self, endpoints: list[tuple[str, int]], prefix: str, protocol: str = "http",
                 username: str | None = None, password: str | None = None,
                 cert: tuple[str, str] | None = None, ca_cert: str | None = None) -> None:
        self._prefix = prefix.rstrip("/")
        self._subnets = f"{self._prefix}/subnets"
        self._client = etcd.Client(
            host=tuple(endpoints), protocol=protocol, username=username, password=password,
            cert=cert, ca_cert=ca_cert, read_timeout=CALL_TIMEOUT,
            allow_reconnect=len(endpoints) > 1)

    async def _call(self, call: Callable[..., T], *args: object, **kwargs: object) -> T:
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except etcd.EtcdWatchTimedOut:
            raise  # a long poll that saw no change: not a failure
        except (etcd.EtcdConnectionFailed, etcd.EtcdLeaderElectionInProgress,
                etcd.EtcdInsufficientPermissions, urllib3.exceptions.HTTPError, OSError) as err:
            raise RegistryError(f"etcd v2: {err}") from err

    def _key(self, name: str) -> str:
        return f"{self._subnets}/{name}"

    async def get_config(self) -> bytes | None:
        try:
            result = await self._call(self._client.read, f"{self._prefix}/config")
        except etcd.EtcdKeyNotFound:
            return None
        return None if result.dir else result.value.encode()

    async def list_subnets(self) -> tuple[list[Entry], int]:
        try:
            result = await self._call(self._client.read, self._subnets, recursive=True)
        except etcd.EtcdKeyNotFound as err:
            return [], int(err.payload["index"])
        prefix = self._subnets + "/"
        entries = [Entry(node.key[len(prefix):], node.value.encode())
                   for node in result.leaves if not node.dir and node.key.startswith(prefix)]
        return entries, int(result.etcd_index)

    async def create_subnet(self, name: str, value: bytes, ttl: int) -> bool:
        try:
            await self._call(self._client.write, self._key(name), value.decode(), ttl=ttl,
                             prevExist=False)
        except etcd.EtcdAlreadyExist:
            return False
        return True

    async def update_subnet(self, name: str, value: bytes, ttl: int,
                            expected: bytes | None) -> bool:
        condition = {} if expected is None else {"prevValue": expected.decode()}
        try:
            await self._call(self._client.write, self._key(name), value.decode(), ttl=ttl,
                             **condition)
        except (etcd.EtcdCompareFailed, etcd.EtcdKeyNotFound):
            return False
        return True

    async def delete_subnet(self, name: str) -> None:
        try:
            await self._call(self._client.delete, self._key(name))
        except etcd.EtcdKeyNotFound:
            pass

    async def watch_subnets(self, after_revision: int) -> AsyncIterator[Change]:
        prefix = self._subnets + "/"
        wait_index = after_revision + 1
        while True:
            try:
                event = await self._call(self._client.read, self._subnets, recursive=True,
                                         wait=True, waitIndex=wait_index,
                                         timeout=WATCH_POLL_SECONDS)
            except etcd.EtcdWatchTimedOut:
                continue
            except etcd.EtcdEventIndexCleared as err:
                raise HistoryLostError(f"etcd v2 no longer has index {wait_index}") from err
            wait_index = int(event.modifiedIndex) + 1
            if event.dir or not event.key.startswith(prefix):
                continue
            value = None if event.action in DELETE_ACTIONS else event.value.encode()
            yield Change(event.key[len(prefix):], value, int(event.modifiedIndex))

    async def close(self) -> None:
        self._client.http.clear()
