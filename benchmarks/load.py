"""Closed-loop load: N concurrent clients, each sending its next request when the last one ends
(HTTP SSE ``run_load``, or gRPC streaming ``run_grpc_load``)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass

import aiohttp


@dataclass
class Record:
    ok: bool
    latency: float
    ttft: float
    tokens: int
    error: str = ""
    input_tokens: int = 0  # the server's num_input_tokens / num_image_tokens (gRPC path only)
    image_tokens: int = 0
    text: str = ""  # the streamed text_output pieces, joined


async def _one(session, url: str, body: dict, stream: bool) -> Record:
    start = time.perf_counter()
    ttft, tokens, text = None, 0, []
    try:
        if stream:
            async with session.post(url + "_stream", json={**body, "stream": True}) as r:
                if r.status != 200:
                    return Record(False, time.perf_counter() - start, 0, 0, await r.text())
                async for line in r.content:
                    if not line.startswith(b"data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        return Record(False, time.perf_counter() - start, 0, 0, event["error"])
                    ids = event.get("output_ids", [])
                    n = len(ids) if isinstance(ids, list) else 1
                    if n and ttft is None:
                        ttft = time.perf_counter() - start
                    tokens += n
                    text.append(event.get("text_output", ""))
        else:
            async with session.post(url, json=body) as r:
                out = await r.json(content_type=None)
                if r.status != 200:
                    return Record(False, time.perf_counter() - start, 0, 0, str(out))
                tokens = out["num_output_tokens"]
                text.append(out.get("text_output", ""))
    except Exception as exc:  # a failed request is a data point, not a crash
        return Record(False, time.perf_counter() - start, 0, 0, repr(exc))
    latency = time.perf_counter() - start
    return Record(True, latency, ttft if ttft is not None else latency, tokens, text="".join(text))


async def run_load(url: str, bodies: list[dict], concurrency: int, stream: bool) -> tuple[list[Record], float]:
    """Send every body once with at most ``concurrency`` in flight; return records (in the bodies' order)
    and wall time."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(bodies):
        queue.put_nowait(item)
    records: list[Record] = [None] * len(bodies)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def worker():
            while not queue.empty():
                i, body = queue.get_nowait()
                records[i] = await _one(s, url, body, stream)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return records, wall


def grpc_inputs(fields: dict) -> list:
    """tritonclient.grpc.aio inputs, each [1, n]: str/bytes or a list of them BYTES, bool, int INT32, float FP32."""
    import numpy as np
    import tritonclient.grpc.aio as aio

    out = []
    for name, value in fields.items():
        if isinstance(value, (str, bytes, list)):
            items = value if isinstance(value, list) else [value]
            arr, dtype = np.array([[v.encode() if isinstance(v, str) else v for v in items]], dtype=np.object_), "BYTES"
        else:
            dtype = {bool: "BOOL", int: "INT32", float: "FP32"}[type(value)]
            arr = np.array([[value]], dtype={"BOOL": bool, "INT32": np.int32, "FP32": np.float32}[dtype])
        t = aio.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


async def grpc_one(client, inputs: list, model: str = "qwen2_5_vl") -> Record:
    """One streamed request over gRPC ModelStreamInfer (``client``: tritonclient.grpc.aio)."""
    done = asyncio.Event()

    async def requests():
        yield {"model_name": model, "inputs": inputs}
        await done.wait()  # the stream stays open until the final response is in

    start, ttft, tokens, counts, text = time.perf_counter(), None, 0, {}, []
    try:
        async for result, error in client.stream_infer(requests()):
            if error is not None:
                return Record(False, time.perf_counter() - start, 0, 0, str(error))
            ids = result.as_numpy("output_ids")
            if ids is not None and ids.size:
                ttft = ttft or time.perf_counter() - start
                tokens += ids.size
            piece = result.as_numpy("text_output")
            if piece is not None:
                text += [t if isinstance(t, bytes) else str(t).encode() for t in piece.reshape(-1)]
            for name in ("num_input_tokens", "num_image_tokens"):
                arr = result.as_numpy(name)
                if arr is not None:
                    counts[name] = int(arr.reshape(-1)[0])
            if result.as_numpy("finish_reason") is not None:
                break
    except Exception as exc:  # a failed request is a data point, not a crash
        return Record(False, time.perf_counter() - start, 0, 0, repr(exc))
    finally:
        done.set()
    latency = time.perf_counter() - start
    return Record(True, latency, ttft or latency, tokens, "", counts.get("num_input_tokens", 0),
                  counts.get("num_image_tokens", 0), b"".join(text).decode("utf-8", "replace"))


async def run_grpc_load(url: str, bodies: list[dict], concurrency: int) -> tuple[list[Record], float]:
    """``run_load`` over gRPC streaming: each body is a dict of input tensors (``grpc_inputs``)."""
    import tritonclient.grpc.aio as aio

    queue = list(enumerate(grpc_inputs(b) for b in bodies))  # built before the clock starts
    queue.reverse()
    records: list[Record] = [None] * len(bodies)
    client = aio.InferenceServerClient(url)
    try:
        async def worker():
            while queue:
                i, inputs = queue.pop()
                records[i] = await grpc_one(client, inputs)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    finally:
        await client.close()
    return records, wall


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
