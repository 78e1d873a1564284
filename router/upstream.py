"""The router's one pooled connection to all workers (aiohttp).

Why aiohttp and not httpx: httpcore's pool re-scans every connection (with a socket poll
each) on every request, O(connections^2); at 32 concurrent requests that capped the router
at ~370 req/s on 2 cores against ~1,400 req/s for the workers alone (measured with
``benchmarks/router.py``). aiohttp's connector hands out idle connections in O(1).

``Upstream.send`` returns an ``UpstreamResponse`` whose body is either read already or
streamed chunk by chunk; every transport failure surfaces as ``UpstreamError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp


class UpstreamError(Exception):
    """The worker could not be reached or broke the connection.

    ``counts_against_worker`` is False for a keep-alive connection the worker closed just
    as we reused it: worth a retry, not evidence that the worker is down.
    """

    def __init__(self, message: str, counts_against_worker: bool = True) -> None:
        super().__init__(message)
        self.counts_against_worker = counts_against_worker


def _describe(e: BaseException) -> UpstreamError:
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return UpstreamError(f"ServerDisconnectedError {e}".strip(), counts_against_worker=False)
    if isinstance(e, asyncio.TimeoutError):
        return UpstreamError("timeout")
    return UpstreamError(f"{type(e).__name__} {e}".strip())


class UpstreamResponse:
    """Status, content type and body (``content``) or chunks (``chunks()``) of one answer."""

    __slots__ = ("status", "content_type", "content", "_resp")

    def __init__(self, resp: aiohttp.ClientResponse, content: bytes | None) -> None:
        self.status = resp.status
        self.content_type = resp.headers.get("content-type")
        self.content = content
        self._resp = resp

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (streamed responses only); raises UpstreamError if it breaks off."""
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise _describe(e) from e

    async def read(self) -> bytes:
        try:
            self.content = await self._resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise _describe(e) from e
        return self.content

    def close(self) -> None:
        """Release the connection (back to the pool if the body was read, else closed)."""
        self._resp.release() if self._resp.content.at_eof() else self._resp.close()


class Upstream:
    """One aiohttp session shared by proxying, health checks and membership."""

    def __init__(self, max_connections: int, request_timeout: float, connect_timeout: float = 5.0) -> None:
        self.max_connections = max_connections
        self.timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=request_timeout)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # created lazily: it must be born inside the running loop
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0,
                                             keepalive_timeout=4.0,  # below uvicorn's 5 s default
                                             ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout,
                                                  auto_decompress=False, trust_env=False,
                                                  skip_auto_headers=("User-Agent",))
        return self._session

    async def send(self, method: str, url: str, body: bytes | None, headers: dict[str, str],
                   stream: bool = False, timeout: float | None = None) -> UpstreamResponse:
        """Send one request; read the whole body unless ``stream``."""
        kwargs = {} if timeout is None else {"timeout": aiohttp.ClientTimeout(total=timeout)}
        try:
            resp = await self.session.request(method, url, data=body, headers=headers, **kwargs)
            if stream:
                return UpstreamResponse(resp, None)
            async with resp:
                return UpstreamResponse(resp, await resp.read())
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise _describe(e) from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
