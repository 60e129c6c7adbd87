"""The API client's HTTP transport when the environment names a proxy: aiohttp, trusting the env.

:class:`~collector.http.HttpClient` speaks to the API directly and knows nothing of proxies.
Users behind a corporate proxy set ``HTTPS_PROXY`` (and ``NO_PROXY``), as every other tool of
theirs expects; for them the client sends its requests through aiohttp with ``trust_env=True``,
which handles ``CONNECT`` tunnels, proxy credentials in the URL, ``NO_PROXY`` and ``~/.netrc``.
This module gives aiohttp the same small interface and the same exceptions as
:class:`~collector.http.HttpClient`, so no aiohttp exception leaves it, and imports aiohttp only
when it is used.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from collector.auth import HttpReply
from collector.http import BodyTooLarge, InvalidRequest


class ProxiedHttpClient:
    """``HttpClient``'s interface over an aiohttp session that honours the proxy environment."""

    def __init__(self, *, headers: Mapping[str, str], max_body: int, connections: int) -> None:
        self._max_body = max_body
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, ttl_dns_cache=300),
            headers=dict(headers),
            trust_env=True,
            raise_for_status=False,
            auto_decompress=True,
        )

    async def request(
        self,
        method: str,
        url: str,
        *,
        timeout: float,  # noqa: ASYNC109 (the same interface as HttpClient.request)
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> HttpReply:
        """Send one request; raises OSError, TimeoutError, BodyTooLarge or InvalidRequest."""
        all_headers = dict(headers or {})
        if content_type is not None:
            all_headers["Content-Type"] = content_type
        try:
            async with self._session.request(
                method,
                url,
                data=body,
                headers=all_headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                length = response.content_length
                if length is not None and length > self._max_body:
                    raise BodyTooLarge(response.status, self._max_body)
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > self._max_body:
                        raise BodyTooLarge(response.status, self._max_body)
                    chunks.append(chunk)
                return HttpReply(response.status, b"".join(chunks), response.headers)
        except ValueError as exc:
            # aiohttp refuses headers with line breaks with a ValueError naming the header.
            raise InvalidRequest(f"aiohttp refused the request: {type(exc).__name__}") from None
        except aiohttp.ClientError as exc:
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from None

    async def aclose(self) -> None:
        """Close the session and its connections."""
        await self._session.close()
