"""The replay's HTTP client against a server that drops a connection without answering."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from queue_service.replay import client_for

ANSWER = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


@asynccontextmanager
async def server_dropping_first_request() -> AsyncIterator[tuple[str, list[bytes]]]:
    """Answers every request but the first, whose connection it closes unanswered
    (as a server closing an idle keep-alive connection the request was sent on)."""
    requests: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                requests.append(head.split(b"\r\n", 1)[0])
                lines = head.lower().split(b"\r\n")
                await reader.readexactly(sum(int(line[15:]) for line in lines if line.startswith(b"content-length:")))
                if len(requests) == 1:
                    break
                writer.write(ANSWER)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass  # the client closed its connection
        finally:
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", requests
    finally:
        server.close()
        await server.wait_closed()


async def test_a_read_whose_connection_closed_unanswered_is_sent_again() -> None:
    async with server_dropping_first_request() as (url, requests), client_for(url, None) as client:
        response = await client.get("/jobs")
    assert response.json() == {"ok": True}
    assert requests == [b"GET /jobs HTTP/1.1", b"GET /jobs HTTP/1.1"]


async def test_a_write_whose_connection_closed_unanswered_is_not_sent_again() -> None:
    async with server_dropping_first_request() as (url, requests), client_for(url, None) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/jobs", json={"type": "noop"})
    assert requests == [b"POST /jobs HTTP/1.1"]
