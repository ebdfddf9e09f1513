"""The registry on etcd's v2 API (flanneld v0.17 and older), through python-etcd.

python-etcd blocks, so every call runs in a thread of its own (in_thread). Leases are key
TTLs; creation is a write with prevExist=false, as flanneld's. A watch is a chain of long polls
with waitIndex, so no change between two polls is missed while etcd keeps its event history.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import etcd
import urllib3.exceptions

from control.subnet.registry import Change, Entry, EtcdCounts, HistoryLostError, RegistryError

# A long poll returns at least this often: a watch restarted from elsewhere (a resync) does
# not leave many threads waiting.
WATCH_POLL_SECONDS = 2.0
CALL_TIMEOUT = 5
DELETE_ACTIONS = {"delete", "expire", "compareAndDelete"}

T = TypeVar("T")


async def in_thread(call: Callable[[], T]) -> T:
    """call() in a daemon thread. Not asyncio.to_thread: at exit asyncio joins its executor's
    threads, and one of them may sit in a long poll for WATCH_POLL_SECONDS after the fast path
    has stopped, which a restart would add to its stall. A daemon thread is left behind."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            outcome: tuple[T | None, BaseException | None] = (call(), None)
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting task
            outcome = (None, err)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: the daemon is exiting, no one waits
            pass

    threading.Thread(target=run, name="pyflannel-etcdv2", daemon=True).start()
    return await done


class EtcdV2Registry:
    def __init__(self, endpoints: list[tuple[str, int]], prefix: str, protocol: str = "http",
                 username: str | None = None, password: str | None = None,
                 cert: tuple[str, str] | None = None, ca_cert: str | None = None) -> None:
        self._prefix = prefix.rstrip("/")
        self._subnets = f"{self._prefix}/subnets"
        self.config_source = f"{self._prefix}/config"
        # One endpoint is host + port; several are a tuple of them, which python-etcd only takes
        # with allow_reconnect (it then asks etcd for its members).
        where: dict[str, Any] = ({"host": endpoints[0][0], "port": endpoints[0][1]}
                                 if len(endpoints) == 1 else
                                 {"host": tuple(endpoints), "allow_reconnect": True})
        self._client_args = dict(where, protocol=protocol, username=username, password=password,
                                 cert=cert, ca_cert=ca_cert, read_timeout=CALL_TIMEOUT)
        self._client: etcd.Client | None = None
        self._client_lock = threading.Lock()
        self.counts = EtcdCounts()

    def _connected(self) -> etcd.Client:
        """The client, made on first use in a worker thread: with several endpoints its
        constructor already talks to etcd, which must not block the event loop."""
        with self._client_lock:
            if self._client is None:
                self._client = etcd.Client(**self._client_args)
            return self._client

    async def _call(self, operation: str, method: str, *args: object, **kwargs: object) -> Any:
        """One request of the Registry method `operation` (counted as its error on failure)."""
        def call() -> Any:
            return getattr(self._connected(), method)(*args, **kwargs)

        try:
            result = await in_thread(call)
        except etcd.EtcdWatchTimedOut:
            self._answered()  # a long poll that etcd held and saw no change: not a failure
            raise
        except (etcd.EtcdConnectionFailed, etcd.EtcdLeaderElectionInProgress,
                etcd.EtcdInsufficientPermissions, urllib3.exceptions.HTTPError, OSError) as err:
            self.counts.failed(operation)
            raise RegistryError(f"etcd v2: {err}") from err
        except etcd.EtcdException as err:
            if type(err) is not etcd.EtcdException:
                self._answered()
                raise  # a specific answer (key not found, already exists, ...): the caller's
            self.counts.failed(operation)
            raise RegistryError(f"etcd v2: {err}") from err  # e.g. no member answered
        self._answered()
        return result

    def _answered(self) -> None:
        """python-etcd fails over to the next member within a call: the member that answered
        is the one it holds now."""
        assert self._client is not None  # the call that was answered made it
        self.counts.answered(self._client.base_uri)

    def _key(self, name: str) -> str:
        return f"{self._subnets}/{name}"

    async def get_config(self) -> bytes | None:
        try:
            result = await self._call("get_config", "read", f"{self._prefix}/config")
        except etcd.EtcdKeyNotFound:
            return None
        return None if result.dir else result.value.encode()

    async def list_subnets(self) -> tuple[list[Entry], int]:
        try:
            result = await self._call("list_subnets", "read", self._subnets, recursive=True)
        except etcd.EtcdKeyNotFound as err:
            return [], int(err.payload["index"])
        prefix = self._subnets + "/"
        entries = [Entry(node.key[len(prefix):], node.value.encode(), int(node.createdIndex))
                   for node in result.leaves if not node.dir and node.key.startswith(prefix)]
        return entries, int(result.etcd_index)

    async def create_subnet(self, name: str, value: bytes, ttl: int) -> bool:
        try:
            await self._call("create_subnet", "write", self._key(name), value.decode(),
                             ttl=ttl, prevExist=False)
        except etcd.EtcdAlreadyExist:
            return False
        return True

    async def update_subnet(self, name: str, value: bytes, ttl: int,
                            expected: bytes | None) -> bool:
        condition = {} if expected is None else {"prevValue": expected.decode()}
        try:
            await self._call("update_subnet", "write", self._key(name), value.decode(),
                             ttl=ttl, **condition)
        except (etcd.EtcdCompareFailed, etcd.EtcdKeyNotFound):
            return False
        return True

    async def delete_subnet(self, name: str) -> None:
        try:
            await self._call("delete_subnet", "delete", self._key(name))
        except etcd.EtcdKeyNotFound:
            pass

    async def watch_subnets(self, after_revision: int) -> AsyncIterator[Change]:
        prefix = self._subnets + "/"
        wait_index = after_revision + 1
        while True:
            try:
                event = await self._call("watch_subnets", "read", self._subnets,
                                         recursive=True, wait=True, waitIndex=wait_index,
                                         timeout=WATCH_POLL_SECONDS)
            except etcd.EtcdWatchTimedOut:
                continue
            except etcd.EtcdEventIndexCleared as err:
                raise HistoryLostError(f"etcd v2 no longer has index {wait_index}") from err
            wait_index = int(event.modifiedIndex) + 1
            if event.dir or not event.key.startswith(prefix):
                continue
            value = None if event.action in DELETE_ACTIONS else event.value.encode()
            yield Change(event.key[len(prefix):], value, int(event.modifiedIndex),
                         expired=event.action == "expire")

    async def close(self) -> None:
        if self._client is not None:
            self._client.http.clear()
