"""The OpenAI gateway against direct gRPC, side by side on one Triton server in one run.

    python benchmarks/gateway_bench.py                      # bench model, image workload, concurrency 32
    python benchmarks/gateway_bench.py --rounds 3 --requests 96

Both paths stream: direct = Triton's gRPC ModelStreamInfer (tritonclient.grpc.aio, raw image bytes);
gateway = POST /v1/chat/completions with a base64 data URI (SSE, aiohttp). Rounds alternate
direct / gateway so drift of a shared machine hits both alike. Prints one JSON line per run and a
Markdown table with the output tokens/s ratio (gateway over direct).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import build_model, make_image, pct  # noqa: E402
from load import grpc_inputs, grpc_one  # noqa: E402

PROMPT = "Request {i}: describe this image in detail."


@functools.lru_cache(maxsize=None)
def image(i: int) -> bytes:
    return make_image(i)  # made before the timed run (closed_loop), so neither path pays for it


async def direct(url: str, i: int, max_tokens: int) -> tuple[int, float, float]:
    """One streamed request over gRPC: (output tokens, ttft, latency)."""
    import tritonclient.grpc.aio as aio

    inputs = grpc_inputs({"text_input": PROMPT.format(i=i), "image": image(i), "max_tokens": max_tokens,
                          "temperature": 0.0, "ignore_eos": True, "stream": True})
    record = await grpc_one(CLIENTS.setdefault(url, aio.InferenceServerClient(url)), inputs)
    if not record.ok:
        raise RuntimeError(record.error)
    return record.tokens, record.ttft, record.latency


CLIENTS: dict = {}


async def gateway(session, url: str, i: int, max_tokens: int) -> tuple[int, float, float]:
    """One streamed chat completion through the gateway: (output tokens, ttft, latency)."""
    uri = "data:image/png;base64," + base64.b64encode(image(i)).decode()
    body = {"model": "qwen2_5_vl", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                      {"type": "text", "text": PROMPT.format(i=i)}]}]}
    start, ttft, tokens = time.perf_counter(), None, 0
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(await r.text())
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                ttft = ttft or time.perf_counter() - start
    return tokens, ttft or 0.0, time.perf_counter() - start


async def closed_loop(one, n: int, concurrency: int, offset: int) -> dict:
    queue = list(range(offset, offset + n))
    records, errors = [], []
    for i in queue:
        image(i)

    async def worker():
        while queue:
            i = queue.pop()
            try:
                records.append(await one(i))
            except Exception as exc:  # a failed request is a data point
                errors.append(repr(exc)[:200])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"output_tokens_per_s": sum(r[0] for r in records) / wall, "requests_per_s": len(records) / wall,
            "ttft_p50_ms": 1e3 * pct([r[1] for r in records], 50), "latency_p50_ms": 1e3 * pct([r[2] for r in records], 50),
            "errors": len(errors), "first_error": errors[0] if errors else ""}


async def run(args, grpc_url: str, gw_url: str) -> list[dict]:
    import aiohttp

    rows, offset = [], 0
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=args.concurrency)) as s:
        paths = {"direct gRPC": lambda i: direct(grpc_url, i, args.max_tokens),
                 "gateway": lambda i: gateway(s, gw_url, i, args.max_tokens)}
        for one in paths.values():  # warm-up: first-call costs are not what we measure
            await closed_loop(one, 4, 4, 10**6 + offset)
            offset += 4
        for r in range(args.rounds):
            for name, one in (paths.items() if r % 2 == 0 else reversed(paths.items())):
                row = {"round": r, "path": name, "concurrency": args.concurrency, "requests": args.requests,
                       **await closed_loop(one, args.requests, args.concurrency, offset)}
                offset += args.requests
                rows.append(row)
                print(json.dumps(row), flush=True)
    for client in CLIENTS.values():
        await client.close()
    return rows


def report(rows: list[dict], args) -> str:
    lines = [f"Model `{args.model}`, image workload (one distinct 224x168 PNG per request), "
             f"{args.max_tokens} output tokens per request, concurrency {args.concurrency}, "
             f"{args.requests} requests per run, {args.rounds} rounds alternating the order.", "",
             "| round | path | out tok/s | req/s | TTFT p50 ms | latency p50 ms | errors |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['path']} | {r['output_tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['latency_p50_ms']:.0f} | {r['errors']} |")
    tok = {p: [r["output_tokens_per_s"] for r in rows if r["path"] == p] for p in ("direct gRPC", "gateway")}
    ratios = [g / d for g, d in zip(tok["gateway"], tok["direct gRPC"])]
    lines += ["", f"gateway / direct output tok/s: per round {', '.join(f'{x:.2f}' for x in ratios)}; "
                  f"median {statistics.median(ratios):.2f}; totals {sum(tok['gateway']) / sum(tok['direct gRPC']):.2f}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from tritonvl.handlers.gateway.process import GatewayProcess
    from tritonvl.handlers.tools.launcher import ServerProcess, free_port

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "bench"], default="bench")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64, help="requests per run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    model_dir = build_model(args.model)
    with ServerProcess(model_dir, log_path="/tmp/tritonvl-gateway-bench-server.log") as srv:
        with GatewayProcess(srv.grpc_url, free_port(), args=["--log-level", "warning"],
                            log_path="/tmp/tritonvl-gateway-bench-gateway.log") as gw:
            rows = asyncio.run(run(args, srv.grpc_url, gw.url))
    print(report(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
