"""Closed-loop load: N concurrent clients, each sending its next request when the last one ends."""

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


async def _one(session, url: str, body: dict, stream: bool) -> Record:
    start = time.perf_counter()
    ttft, tokens = None, 0
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
        else:
            async with session.post(url, json=body) as r:
                out = await r.json(content_type=None)
                if r.status != 200:
                    return Record(False, time.perf_counter() - start, 0, 0, str(out))
                tokens = out["num_output_tokens"]
    except Exception as exc:  # a failed request is a data point, not a crash
        return Record(False, time.perf_counter() - start, 0, 0, repr(exc))
    latency = time.perf_counter() - start
    return Record(True, latency, ttft if ttft is not None else latency, tokens)


async def run_load(url: str, bodies: list[dict], concurrency: int, stream: bool) -> tuple[list[Record], float]:
    """Send every body once with at most ``concurrency`` in flight; return records and wall time."""
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    records: list[Record] = []
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def worker():
            while not queue.empty():
                records.append(await _one(s, url, queue.get_nowait(), stream))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return records, wall


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
