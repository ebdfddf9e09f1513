"""flanneld's healthz endpoint: GET /healthz answers 200 "flanneld is running"."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("pyflanneld.healthz")


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        async with asyncio.timeout(5):
            request = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # headers: nothing in them matters here
        parts = request.split()
        if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/healthz":
            status, body = b"200 OK", b"flanneld is running"
        else:
            status, body = b"404 Not Found", b"404 page not found\n"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close"
                     b"\r\n\r\n" + body)
        await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve_healthz(ip: str, port: int) -> None:
    """Serve until cancelled."""
    server = await asyncio.start_server(_answer, ip, port)
    log.info("healthz server listening on %s:%d", ip, port)
    async with server:
        await server.serve_forever()
