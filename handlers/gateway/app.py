"""The ASGI app: FastAPI routes over one TritonBackend, a body-size limit, a bound on requests in
flight, OpenAI-shaped errors for everything (never a traceback), metrics per endpoint."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from tritonvl.handlers.gateway import routes
from tritonvl.handlers.gateway.config import GatewayConfig
from tritonvl.handlers.gateway.errors import APIError
from tritonvl.handlers.gateway.metrics import GatewayMetrics
from tritonvl.handlers.gateway.triton import TritonBackend

log = logging.getLogger("tritonvl.gateway")
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/describe-image/": "describe",
             "/v1/models": "models", "/health": "health", "/metrics": "metrics"}


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


class Guard:
    """Pure ASGI middleware: counts body bytes against the limit (413) and records each request's
    status and latency to its last byte (streams included)."""

    def __init__(self, app, max_body_bytes: int, metrics: GatewayMetrics) -> None:
        self.app, self.limit, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = ENDPOINTS.get(scope["path"], "other")
        start, status, seen = time.perf_counter(), [0], [0]
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            self.metrics.rejected.labels("body_size").inc()
            err = _too_large(self.limit)
            await JSONResponse(err.body(), err.status)(scope, receive, send)
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
            self._record(endpoint, status[0] or 499, start)

    def _record(self, endpoint: str, status: int, start: float) -> None:
        self.metrics.requests.labels(endpoint, str(status)).inc()
        if endpoint in ("chat", "completions", "describe"):
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body over the gateway's limit of {limit} bytes", "invalid_request_error",
                    None, "request_too_large")


def create_app(config: GatewayConfig) -> FastAPI:
    backend = TritonBackend(config.triton_url, config.triton_model, config.request_timeout_s)
    metrics = GatewayMetrics()
    metrics.watch_calls(lambda: backend.open_calls)
    gw = routes.Gateway(config, backend, metrics, Limiter(config.max_concurrent, metrics))

    @asynccontextmanager
    async def lifespan(_app):
        await backend.start()
        yield
        await backend.close()

    app = FastAPI(title="tritonvl OpenAI-compatible gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.gateway = gw
    app.add_middleware(Guard, max_body_bytes=config.max_body_bytes, metrics=metrics)

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


def run(config: GatewayConfig, host: str = "0.0.0.0", port: int = 9000, log_level: str = "info") -> int:
    """Serve until SIGINT/SIGTERM (uvicorn drains open connections first)."""
    import uvicorn

    print(f"tritonvl gateway: http://{host}:{port}/v1 -> Triton gRPC {config.triton_url} "
          f"(model {config.triton_model}; served as {', '.join(config.names)})", flush=True)
    # keep-alive longer than the usual load balancer idle timeout (60 s): a connection the LB still thinks
    # open must not be closed under it (requests sent on it would fail)
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30,
                timeout_keep_alive=75)
    return 0
