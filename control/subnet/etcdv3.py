"""The registry on etcd's v3 API (flanneld v0.18 and newer), through aetcd.

Leases are etcd leases: the subnet key is attached to one granted for the TTL. Creation is a
transaction on create_revision == 0, as flanneld's.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

# gRPC's fork handlers would log a warning each time the daemon runs iptables while a call is
# in flight; the children exec at once and never touch gRPC, so they are not needed.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import aetcd  # noqa: E402
import aetcd.exceptions  # noqa: E402
import aetcd.rpc  # noqa: E402
import aetcd.watcher  # noqa: E402
import grpc  # noqa: E402

from control.subnet.registry import Change, Entry, EtcdCounts, HistoryLostError, RegistryError

# Unary calls are bounded here; the watch stream is not (aetcd would apply its timeout to it).
CALL_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0

T = TypeVar("T")


@dataclass(frozen=True)
class TLSFiles:
    """--etcd-cafile, --etcd-certfile, --etcd-keyfile (the last two for client certificates)."""

    ca: str | None
    cert: str | None
    key: str | None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


class _TLSClient(aetcd.Client):
    """aetcd 1.0 opens plain gRPC channels only: this is its connect() on a TLS channel."""

    def __init__(self, host: str, port: int, credentials: grpc.ChannelCredentials,
                 **kwargs: str | None) -> None:
        super().__init__(host, port, **kwargs)
        self._credentials = credentials
        self._connect_lock = asyncio.Lock()

    async def connect(self) -> None:
        async with self._connect_lock:
            if self._connected.is_set():
                return
            self.channel = aetcd.rpc.secure_channel(f"{self._host}:{self._port}",
                                                    self._credentials)
            if self._username is not None:
                self.auth_stub = aetcd.rpc.AuthStub(self.channel)
                response = await self.auth_stub.Authenticate(aetcd.rpc.AuthenticateRequest(
                    name=self._username, password=self._password), timeout=self._timeout)
                self.metadata = (("token", response.token),)
            self.kvstub = aetcd.rpc.KVStub(self.channel)
            self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
            self.leasestub = aetcd.rpc.LeaseStub(self.channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(aetcd.rpc.WatchStub(self.channel),
                                                  timeout=self._timeout, metadata=self.metadata)
            self._connected.set()


class EtcdV3Registry:
    def __init__(self, endpoints: list[tuple[str, int]], prefix: str,
                 username: str | None = None, password: str | None = None,
                 tls: TLSFiles | None = None) -> None:
        self._endpoints = endpoints
        self._current = 0
        self._username = username
        self._password = password
        self._credentials = tls.credentials() if tls is not None else None
        self._prefix = prefix.rstrip("/")
        self._subnets = f"{self._prefix}/subnets/".encode()
        self.config_source = f"{self._prefix}/config"
        self._client = self._new_client()
        self.counts = EtcdCounts()

    def _new_client(self) -> aetcd.Client:
        host, port = self._endpoints[self._current]
        if self._credentials is not None:
            return _TLSClient(host, port, self._credentials, username=self._username,
                              password=self._password)
        return aetcd.Client(host, port, username=self._username, password=self._password)

    async def _failover(self) -> None:
        """Move to the next endpoint after a failure (the channel itself reconnects too)."""
        if len(self._endpoints) > 1:
            await self.close()
            self._current = (self._current + 1) % len(self._endpoints)
            self._client = self._new_client()

    async def _call(self, operation: str, call: Awaitable[T]) -> T:
        """One request of the Registry method `operation` (counted as its error on failure)."""
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation that
        # lands as the call completes, and a stopping daemon would then wait forever.
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                result = await call
        except (aetcd.exceptions.ClientError, grpc.RpcError, OSError, TimeoutError) as err:
            self.counts.failed(operation)
            await self._failover()
            raise RegistryError(f"etcd v3 at {self.endpoint}: {_describe(err)}") from err
        self.counts.answered(self.endpoint)
        return result

    @property
    def endpoint(self) -> str:
        host, port = self._endpoints[self._current]
        return f"{host}:{port}"

    def _key(self, name: str) -> bytes:
        return self._subnets + name.encode()

    async def get_config(self) -> bytes | None:
        result = await self._call("get_config",
                                  self._client.get(f"{self._prefix}/config".encode()))
        return None if result is None else result.value

    async def list_subnets(self) -> tuple[list[Entry], int]:
        result = await self._call("list_subnets", self._client.get_prefix(self._subnets))
        entries = [Entry(kv.key[len(self._subnets):].decode(errors="replace"), kv.value,
                         kv.create_revision) for kv in result]
        return entries, result.header.revision

    async def _put_with_lease(self, operation: str, key: bytes, value: bytes, ttl: int,
                              compare: list[object]) -> bool:
        client = self._client
        lease = await self._call(operation, client.lease(ttl))
        succeeded, _ = await self._call(operation, client.transaction(
            compare=compare, success=[client.transactions.put(key, value, lease=lease)],
            failure=[]))
        if not succeeded:
            await self._call(operation, client.revoke_lease(lease.id))
        return succeeded

    async def create_subnet(self, name: str, value: bytes, ttl: int) -> bool:
        key = self._key(name)
        return await self._put_with_lease(
            "create_subnet", key, value, ttl, [self._client.transactions.create(key) == 0])

    async def update_subnet(self, name: str, value: bytes, ttl: int,
                            expected: bytes | None) -> bool:
        key = self._key(name)
        compare = [] if expected is None else [self._client.transactions.value(key) == expected]
        return await self._put_with_lease("update_subnet", key, value, ttl, compare)

    async def delete_subnet(self, name: str) -> None:
        await self._call("delete_subnet", self._client.delete(self._key(name)))

    async def watch_subnets(self, after_revision: int) -> AsyncIterator[Change]:
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                watch = await self._client.watch_prefix(self._subnets,
                                                        start_revision=after_revision + 1)
        except aetcd.exceptions.RevisionCompactedError as err:
            self.counts.answered(self.endpoint)  # etcd's answer: not a failure
            raise HistoryLostError(f"etcd v3 compacted past revision {after_revision}") from err
        except (aetcd.exceptions.ClientError, grpc.RpcError, OSError, TimeoutError) as err:
            self.counts.failed("watch_subnets")
            await self._failover()
            raise RegistryError(f"etcd v3 watch at {self.endpoint}: {_describe(err)}") from err
        self.counts.answered(self.endpoint)
        try:
            async for event in watch:
                value = event.kv.value if event.kind == aetcd.rtypes.EventKind.PUT else None
                yield Change(event.kv.key[len(self._subnets):].decode(errors="replace"), value,
                             event.kv.mod_revision)
        except aetcd.exceptions.RevisionCompactedError as err:
            raise HistoryLostError(f"etcd v3 compacted past revision {after_revision}") from err
        except (aetcd.exceptions.ClientError, grpc.RpcError, OSError) as err:
            self.counts.failed("watch_subnets")
            raise RegistryError(f"etcd v3 watch at {self.endpoint}: {_describe(err)}") from err
        finally:
            # Not awaited: aetcd's cancel waits for a lock that a cancelled watch may still hold.
            _in_background(watch.cancel())
        self.counts.failed("watch_subnets")
        raise RegistryError(f"etcd v3 watch at {self.endpoint} ended")

    async def close(self) -> None:
        await _quietly(self._client.close(), CLOSE_TIMEOUT)


_background: set[asyncio.Future[None]] = set()


def _in_background(call: Awaitable[object]) -> None:
    """Run a tear-down call without waiting for it (kept referenced until it ends)."""
    task = asyncio.ensure_future(_quietly(call))
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _quietly(call: Awaitable[object], timeout: float = CALL_TIMEOUT) -> None:
    """Tear-down of a connection that may already be broken: failures here change nothing."""
    try:
        async with asyncio.timeout(timeout):
            await call
    except Exception:  # noqa: BLE001 - closing a broken channel may fail in many ways
        pass


def _describe(err: BaseException) -> str:
    return str(err) or type(err).__name__
