"""HTTP transport: Triton's generate extension (``/generate`` for one response, ``/generate_stream``
for server-sent events). Triton's ``/infer`` refuses decoupled models, which the ensemble is.

One keep-alive connection per client (sync) or one aiohttp session (async). Images travel as base64.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote

from .errors import (
    ModelNotReady,
    RequestFailed,
    RequestTimeout,
    ServerUnavailable,
    TritonVLError,
    status_error,
)
from .request import Request
from .stream import Cancelled, CancelToken, Chunk

_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verify the server's certificate against ``ca_file`` (PEM) or the system's roots, and its name."""
    return ssl.create_default_context(cafile=ca_file)


def wrong_protocol(url: str, exc: Exception, tls: bool) -> ServerUnavailable:
    """The server's bytes were not an HTTP/1.1 answer: most likely the gRPC port, or TLS on one side only."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ServerUnavailable(f"{url}: the server's certificate is not trusted ({exc.verify_message}); "
                                 "give the CA that signed it (ca_file / --ca-file)")
    hint = ("the gRPC port? use protocol='grpc', or the HTTP port (8000 by default)" if not tls else
            "a plain-HTTP port? drop https:// (tls) or point at the TLS proxy")
    return ServerUnavailable(f"{url} did not answer as an HTTP{'S' if tls else ''} server ({type(exc).__name__}): "
                             f"is it {hint}")


def split_host(url: str) -> tuple[str, int]:
    hostport = url.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"url {url!r}: expected HOST:PORT")
    return host, int(port)


def chunk_from_json(obj: dict, final: bool) -> Chunk:
    ids = obj.get("output_ids", [])
    return Chunk(
        text=obj.get("text_output", "") or "",
        ids=[int(ids)] if isinstance(ids, int) else [int(i) for i in ids or []],
        finish_reason=obj.get("finish_reason") or None,
        input_tokens=obj.get("num_input_tokens"),
        output_tokens=obj.get("num_output_tokens"),
        image_tokens=obj.get("num_image_tokens"),
        final=final or bool(obj.get("finish_reason")),
        logprobs=[json.loads(e) for e in _as_list(obj.get("logprobs"))],
        media_sizes=obj.get("media_sizes") or None,
    )


def _as_list(value) -> list:
    """A JSON output of one or more elements (Triton's /generate writes one element as a scalar)."""
    return [] if value is None else value if isinstance(value, list) else [value]


def parse_body(body: bytes, status: int) -> dict:
    """A JSON body; an ``{"error": ...}`` body (any status) or a non-200 status raises, by the status
    tag of a tritonvl model's message (Triton 2.51's /generate answers every model error with 400,
    and an error event of /generate_stream comes after a 200), else the HTTP status."""
    text = body.decode("utf-8", "replace").strip()
    if text.startswith("data:"):
        text = text[5:].strip()
    try:
        obj = json.loads(text) if text else {}
    except ValueError:
        obj = {"error": text[:300] or f"HTTP {status}"}
    if not isinstance(obj, dict):
        raise RequestFailed(f"unexpected response from the server: {text[:200]}")
    if "error" in obj or status != 200:
        raise status_error(status if status != 200 else None, str(obj.get("error", f"HTTP {status}")))
    return obj


def sse_event(line: bytes) -> dict | None:
    """One ``data: {...}`` line of the event stream -> its JSON object (errors raise)."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    return parse_body(line, 200)


class HttpTransport:
    """Blocking HTTP transport on one reused keep-alive connection; one request at a time."""

    def __init__(self, url: str, verbose: bool = False, headers: dict | None = None, tls: bool = False,
                 ca_file: str | None = None) -> None:
        self.url = url
        self.host, self.port = split_host(url)
        self.headers = {**_HEADERS, **(headers or {})}
        self.tls = tls
        self._context = tls_context(ca_file) if tls else None
        self._conn: http.client.HTTPConnection | None = None
        self._busy = threading.Lock()

    def check_ready(self, model: str, timeout: float = 10.0) -> None:
        status, _ = self._get("/v2/health/live", timeout)
        if status != 200:
            raise ServerUnavailable(f"the Triton server at {self.url} is not live (HTTP {status})")
        status, _ = self._get(f"/v2/models/{quote(model)}/ready", timeout)
        if status != 200:
            raise ModelNotReady(f"model {model!r} is not ready on {self.url} (the server is up)")

    def metadata(self, model: str) -> dict:
        status, body = self._get(f"/v2/models/{quote(model)}", 10.0)
        return parse_body(body, status)

    def responses(self, request: Request, model: str, timeout: float | None,
                  token: CancelToken) -> Iterator[Chunk]:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this Client already has a request in flight; use one Client per thread "
                               "or AsyncClient for concurrent requests")
        path = f"/v2/models/{quote(model)}/generate" + ("_stream" if request.stream else "")
        deadline = None if timeout is None else time.monotonic() + timeout
        finished = False
        try:
            response = self._post(path, request.http_body(), timeout)
            conn = self._conn
            token.on_cancel(lambda: _shutdown(conn))
            if not request.stream or response.status != 200:
                body = self._read(response.read, token, deadline, timeout)
                obj = parse_body(body, response.status)
                finished = True
                yield chunk_from_json(obj, final=True)
                return
            while True:
                line = self._read(response.readline, token, deadline, timeout)
                if not line:  # end of the event stream: Triton closes it after the final response
                    break
                obj = sse_event(line)
                if obj is None:
                    continue
                chunk = chunk_from_json(obj, final=False)
                if chunk.final:
                    self._read(response.read, token, deadline, timeout)  # drain: keep the connection
                    finished = True
                yield chunk
                if finished:
                    return
            finished = True
        finally:
            if not finished:
                self._reset()  # dropping the connection is how a client cancels over HTTP
            self._busy.release()

    def close(self) -> None:
        self._reset()

    def _read(self, read, token: CancelToken, deadline: float | None, timeout: float | None) -> bytes:
        if deadline is not None and self._conn is not None and self._conn.sock is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout(f"no complete answer within {timeout} s")
            self._conn.sock.settimeout(remaining)
        try:
            data = read()
        except TimeoutError:
            raise RequestTimeout(f"no complete answer within {timeout} s") from None
        except (OSError, http.client.HTTPException, ValueError):
            if token.cancelled:
                raise Cancelled() from None
            raise RequestFailed(f"the connection to {self.url} broke during the request") from None
        if token.cancelled:
            raise Cancelled()
        return data

    def _post(self, path: str, body: bytes, timeout: float | None) -> http.client.HTTPResponse:
        for attempt in (0, 1):
            fresh = self._conn is None
            conn = self._connection(timeout)
            try:
                conn.request("POST", path, body=body, headers=self.headers)
                return conn.getresponse()
            except (ConnectionRefusedError, socket.gaierror) as exc:
                self._reset()
                raise ServerUnavailable(f"cannot reach a Triton server at {self.url} over HTTP "
                                        f"({exc.strerror or exc})") from None
            except TimeoutError:
                self._reset()
                raise RequestTimeout(f"no answer from {self.url} within {timeout} s") from None
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self._reset()
                if fresh or attempt:  # a reused keep-alive connection may have been closed: retry once
                    raise ServerUnavailable(f"the server at {self.url} closed the connection ({exc})") from None
            except (http.client.HTTPException, ssl.SSLError) as exc:  # bytes that are not HTTP/1.1 (gRPC's port)
                self._reset()
                raise wrong_protocol(self.url, exc, self.tls) from None
            except OSError as exc:
                self._reset()
                raise ServerUnavailable(f"cannot reach a Triton server at {self.url} over HTTP "
                                        f"({exc.strerror or exc})") from None
        raise AssertionError("unreachable")

    def _get(self, path: str, timeout: float) -> tuple[int, bytes]:
        conn = self._new_connection(timeout)
        try:
            conn.request("GET", path, headers={k: v for k, v in self.headers.items() if k != "Content-Type"})
            response = conn.getresponse()
            return response.status, response.read()
        except (http.client.HTTPException, ssl.SSLError) as exc:
            raise wrong_protocol(self.url, exc, self.tls) from None
        except OSError as exc:
            raise ServerUnavailable(f"cannot reach a Triton server at {self.url} over HTTP "
                                    f"({getattr(exc, 'strerror', None) or exc})") from None
        finally:
            conn.close()

    def _new_connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self.tls:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self._context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = self._new_connection(timeout)
        elif self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        else:
            self._conn.timeout = timeout
        return self._conn

    def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _shutdown(conn: http.client.HTTPConnection | None) -> None:
    """Unblock a reader in another thread: shut the socket down."""
    sock = conn.sock if conn is not None else None
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class AsyncHttpTransport:
    """asyncio HTTP transport on one aiohttp session (its connection pool is reused)."""

    def __init__(self, url: str, verbose: bool = False, headers: dict | None = None, tls: bool = False,
                 ca_file: str | None = None) -> None:
        self.url = url
        host, port = split_host(url)
        self.base = f"{'https' if tls else 'http'}://{host}:{port}"
        self.headers = {**_HEADERS, **(headers or {})}
        self._context = tls_context(ca_file) if tls else None
        self._session = None

    def _get_session(self):
        import aiohttp

        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._context) if self._context is not None else None
            self._session = aiohttp.ClientSession(self.base, headers=self.headers, connector=connector)
        return self._session

    async def check_ready(self, model: str, timeout: float = 10.0) -> None:
        import aiohttp

        session = self._get_session()
        try:
            async with session.get("/v2/health/live", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                if r.status != 200:
                    raise ServerUnavailable(f"the Triton server at {self.url} is not live (HTTP {r.status})")
            async with session.get(f"/v2/models/{quote(model)}/ready",
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                if r.status != 200:
                    raise ModelNotReady(f"model {model!r} is not ready on {self.url} (the server is up)")
        except aiohttp.ClientError as exc:
            raise ServerUnavailable(f"cannot reach a Triton server at {self.url} over HTTP ({exc})") from None

    async def responses(self, request: Request, model: str, timeout: float | None,
                        token: CancelToken) -> AsyncIterator[Chunk]:
        import asyncio

        import aiohttp

        path = f"/v2/models/{quote(model)}/generate" + ("_stream" if request.stream else "")
        session = self._get_session()
        try:
            async with session.post(path, data=request.http_body(),
                                    timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                token.on_cancel(response.close)
                if not request.stream or response.status != 200:
                    obj = parse_body(await response.read(), response.status)
                    yield chunk_from_json(obj, final=True)
                    return
                async for line in response.content:
                    obj = sse_event(line)
                    if obj is None:
                        continue
                    chunk = chunk_from_json(obj, final=False)
                    yield chunk
                    if chunk.final:
                        return
                if token.cancelled:
                    raise Cancelled()
                raise RequestFailed("the server closed the stream before the final response")
        except TritonVLError:
            if token.cancelled:
                raise Cancelled() from None
            raise
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no complete answer within {timeout} s") from None
        except aiohttp.ClientConnectorError as exc:
            raise ServerUnavailable(f"cannot reach a Triton server at {self.url} over HTTP ({exc.os_error})") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            if token.cancelled:
                raise Cancelled() from None
            raise RequestFailed(f"the connection to {self.url} broke during the request ({exc})") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
