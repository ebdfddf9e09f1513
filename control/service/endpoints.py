"""The daemon's small HTTP endpoints: flanneld's GET /healthz, and GET /metrics when asked for.

/healthz answers 200 "flanneld is running" as flanneld does, or 503 while this host's lease is
lost (being taken again)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("pyflanneld.healthz")

# A page: () -> (status line, content type, body).
Page = Callable[[], tuple[bytes, bytes, bytes]]
TEXT = b"text/plain; charset=utf-8"
NOT_FOUND = (b"404 Not Found", TEXT, b"404 page not found\n")


def healthz_page(lease_held: Callable[[], bool]) -> Page:
    def page() -> tuple[bytes, bytes, bytes]:
        if lease_held():
            return b"200 OK", TEXT, b"flanneld is running"
        return b"503 Service Unavailable", TEXT, b"the lease of this host is lost"
    return page


async def serve_http(ip: str, port: int, pages: dict[bytes, Page], what: str) -> None:
    """Answer GET requests for `pages` by path until cancelled."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers: nothing in them matters here
            parts = request.split()
            page = pages.get(parts[1].split(b"?")[0]) if len(parts) >= 2 and \
                parts[0] == b"GET" else None
            status, content_type, body = page() if page else NOT_FOUND
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type +
                         b"\r\nContent-Length: " + str(len(body)).encode() +
                         b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, ip, port)
    log.info("%s server listening on %s:%d", what, ip, port)
    async with server:
        await server.serve_forever()
