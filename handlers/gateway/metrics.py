"""Gateway metrics on its own ``/metrics`` (Prometheus text), in a registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tritonvl_gateway_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("tritonvl_gateway_request_duration_seconds",
                                 "Time from request to the last byte of the answer", ["endpoint"],
                                 buckets=_LATENCY, registry=r)
        self.ttft = Histogram("tritonvl_gateway_time_to_first_token_seconds",
                              "Streamed requests: time from request to the first text", ["endpoint"],
                              buckets=_LATENCY, registry=r)
        self.in_flight = Gauge("tritonvl_gateway_requests_in_flight", "Requests being served", registry=r)
        self.cancelled = Counter("tritonvl_gateway_client_disconnects",
                                 "Requests whose client went away first (their Triton call was cancelled)",
                                 ["endpoint"], registry=r)
        self.rejected = Counter("tritonvl_gateway_rejected",
                                "Requests refused before Triton saw them (auth, body_size, concurrency)",
                                ["reason"], registry=r)
        self.auth_required = Gauge("tritonvl_gateway_auth_required",
                                   "1 when requests need an API key (--api-key / TRITONVL_API_KEY), else 0",
                                   registry=r)
        self.prompt_tokens = Counter("tritonvl_gateway_prompt_tokens", "Prompt tokens of answered requests",
                                     registry=r)
        self.completion_tokens = Counter("tritonvl_gateway_completion_tokens",
                                         "Generated tokens of answered requests", registry=r)

    def watch_calls(self, open_calls) -> None:
        """``open_calls()``: Triton calls in flight; exported as a gauge read at scrape time."""
        Gauge("tritonvl_gateway_triton_calls_open", "gRPC calls to Triton not yet ended or cancelled",
              registry=self.registry).set_function(open_calls)

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
