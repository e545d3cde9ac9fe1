"""The ASGI app: FastAPI routes over one TritonBackend behind one guard (an API key, a body-size
limit and a bound on requests in flight, all checked before the body is read), OpenAI-shaped errors
for everything (never a traceback), metrics per endpoint."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import sys
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from tritonvl.handlers.gateway import routes
from tritonvl.handlers.gateway.config import API_KEY_ENV, GatewayConfig
from tritonvl.handlers.gateway.errors import APIError
from tritonvl.handlers.gateway.metrics import GatewayMetrics
from tritonvl.handlers.gateway.triton import TritonBackend

log = logging.getLogger("tritonvl.gateway")
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/describe-image/": "describe",
             "/v1/models": "models", "/health": "health", "/metrics": "metrics"}
GENERATION = ("chat", "completions", "describe")  # the endpoints that hold a slot of the Limiter
OPEN_PATHS = ("/health", "/metrics")  # answered without a key (probes, Prometheus)


class Limiter:
    """At most ``limit`` requests in flight; one more is refused at once (429) rather than queued
    here, so a client or load balancer can go elsewhere."""

    def __init__(self, limit: int, metrics: GatewayMetrics) -> None:
        self.limit, self.metrics, self.in_flight = limit, metrics, 0

    def acquire(self):
        if self.in_flight >= self.limit:
            self.metrics.rejected.labels("concurrency").inc()
            raise APIError(429, f"too many requests in flight (the gateway's limit is {self.limit}); retry later",
                           "rate_limit_error", None, "too_many_requests")
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self.metrics.in_flight.set(self.in_flight)

        return release


class APIKeys:
    """``Authorization: Bearer <key>`` against every configured key. The SHA-256 digests are
    compared, each with hmac.compare_digest and none skipped, so the time taken says nothing about
    which key, or how much of one, matched, nor about a key's length."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def refusal(self, scope) -> APIError | None:
        """None when the request may go on; else the 401 to answer."""
        if not self._digests or scope["path"] in OPEN_PATHS:
            return None
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        scheme, _, token = (header or b"").strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return _unauthorized("no API key given: send it as 'Authorization: Bearer <key>'")
        given = hashlib.sha256(token).digest()
        ok = False
        for digest in self._digests:
            ok |= hmac.compare_digest(given, digest)
        return None if ok else _unauthorized("incorrect API key provided")


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, "invalid_request_error", None, "invalid_api_key")


class Guard:
    """Pure ASGI middleware, in front of everything. Before the body is read: the API key (401), the
    declared Content-Length against the body limit (413) and, for the generation endpoints, a slot of
    the Limiter (429), held until the answer's last byte. Then it counts the body bytes as they are
    read (a chunked body, or one longer than it said: 413 at the limit) and records each request's
    status and latency to its last byte (streams included)."""

    def __init__(self, app, max_body_bytes: int, metrics: GatewayMetrics, limiter: Limiter, keys: APIKeys) -> None:
        self.app, self.limit, self.metrics, self.limiter, self.keys = app, max_body_bytes, metrics, limiter, keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = ENDPOINTS.get(scope["path"], "other")
        start, status, seen = time.perf_counter(), [0], [0]
        release = None
        try:
            refusal = self.keys.refusal(scope)
            if refusal is not None:
                self.metrics.rejected.labels("auth").inc()
                raise refusal
            declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
            if declared.isdigit() and int(declared) > self.limit:
                self.metrics.rejected.labels("body_size").inc()
                raise _too_large(self.limit)
            if endpoint in GENERATION and scope["method"] == "POST":
                release = self.limiter.acquire()
        except APIError as err:
            headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
            await JSONResponse(err.body(), err.status, headers=headers)(scope, receive, send)
            return self._record(endpoint, err.status, start)

        async def counted_receive():
            message = await receive()
            seen[0] += len(message.get("body", b""))
            if seen[0] > self.limit:  # a chunked body without a length, or one that lied
                self.metrics.rejected.labels("body_size").inc()
                raise _too_large(self.limit)
            return message

        async def watched_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BaseException:
            status[0] = status[0] or 500
            raise
        finally:
            if release is not None:
                release()
            self._record(endpoint, status[0] or 499, start)

    def _record(self, endpoint: str, status: int, start: float) -> None:
        self.metrics.requests.labels(endpoint, str(status)).inc()
        if endpoint in GENERATION:
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body over the gateway's limit of {limit} bytes", "invalid_request_error",
                    None, "request_too_large")


def create_app(config: GatewayConfig) -> FastAPI:
    backend = TritonBackend(config.triton_url, config.triton_model, config.request_timeout_s)
    metrics = GatewayMetrics()
    metrics.watch_calls(lambda: backend.open_calls)
    gw = routes.Gateway(config, backend, metrics)
    keys = APIKeys(config.api_keys)
    metrics.auth_required.set(1 if keys else 0)

    @asynccontextmanager
    async def lifespan(_app):
        await backend.start()
        yield
        await backend.close()

    app = FastAPI(title="tritonvl OpenAI-compatible gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.gateway = gw
    app.add_middleware(Guard, max_body_bytes=config.max_body_bytes, metrics=metrics,
                       limiter=Limiter(config.max_concurrent, metrics), keys=keys)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), exc.status_code)

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")  # the traceback stays in the gateway's log
        err = APIError(500, f"internal error in the gateway ({type(exc).__name__})", "internal_error", None,
                       "internal_error")
        return JSONResponse(err.body(), 500)

    app.add_api_route("/v1/chat/completions", gw.chat, methods=["POST"])
    app.add_api_route("/v1/completions", gw.completions, methods=["POST"])
    app.add_api_route("/describe-image/", gw.describe, methods=["POST"])
    app.add_api_route("/v1/models", gw.models, methods=["GET"])
    app.add_api_route("/health", gw.health, methods=["GET"])
    app.add_api_route("/metrics", lambda: Response(metrics.exposition(), media_type="text/plain; version=0.0.4"),
                      methods=["GET"])
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(host: str, port: int, keys: tuple[str, ...]) -> str | None:
    """The warning for a gateway that anyone on the network may use (off loopback, no key). It still
    starts, as vLLM's server does: behind an authenticating proxy or mesh, or in a pod that only a
    NetworkPolicy's clients reach, that is a deliberate set-up (docs/SECURITY.md, Gateway)."""
    if keys or is_loopback(host):
        return None
    return (f"tritonvl gateway: WARNING: listening on {host}:{port} with NO API KEY: anyone who can reach this "
            f"port can run generations. Set {API_KEY_ENV} (or --api-key), or listen on 127.0.0.1, or keep "
            "the port behind a proxy that authenticates (docs/SECURITY.md, Gateway).")


def run(config: GatewayConfig, host: str = "0.0.0.0", port: int = 9000, log_level: str = "info") -> int:
    """Serve until SIGINT/SIGTERM (uvicorn drains open connections first)."""
    import uvicorn

    n = len(config.api_keys)
    auth = f"API key required ({n} key{'s' if n > 1 else ''})" if n else "no API key"
    print(f"tritonvl gateway: http://{host}:{port}/v1 -> Triton gRPC {config.triton_url} "
          f"(model {config.triton_model}; served as {', '.join(config.names)}; {auth})", flush=True)
    warning = exposure_warning(host, port, config.api_keys)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    # keep-alive longer than the usual load balancer idle timeout (60 s): a connection the LB still thinks
    # open must not be closed under it (requests sent on it would fail)
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30,
                timeout_keep_alive=75)
    return 0
