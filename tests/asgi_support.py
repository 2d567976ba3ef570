"""One HTTP request straight through an ASGI app, in-process: the path exactly as given (no client
normalisation of ``..``, ``%2e`` or case), for the API's auth and OpenAPI tests."""

from __future__ import annotations

import asyncio


def asgi_request(app, method: str, path: str, headers=(), body: bytes = b"", query: bytes = b"",
                 root_path: str = "") -> tuple[int, dict[str, str], bytes]:
    """-> (status, response headers with lower-case names, body). ``path`` includes ``root_path``."""

    async def run():
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode("latin-1", "replace"),
                 "root_path": root_path, "query_string": query, "headers": list(headers),
                 "client": ("127.0.0.1", 12345), "server": ("127.0.0.1", 8000)}
        sent = False
        start: dict = {}
        out: list[bytes] = []

        async def receive():
            nonlocal sent
            if sent:
                await asyncio.sleep(0)
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                out.append(message.get("body", b""))

        await app(scope, receive, send)
        return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, b"".join(out)

    return asyncio.run(run())
