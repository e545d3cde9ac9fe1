"""Soak test, bounded in time and count, on loopback: many concurrent streams with a share of
cancellations (client disconnects) and bad requests. Checks that no response is lost or doubled,
reports resident-memory growth of the server, and that the server is healthy at the end.

    python scripts/soak.py --seconds 180 --concurrency 64            # starts its own server
    python scripts/soak.py --url localhost:8000 --seconds 60          # against a running one
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import sys
import threading
import time

import aiohttp


def png(seed: int) -> str:
    from PIL import Image

    rnd = random.Random(seed)
    img = Image.new("RGB", (rnd.randint(28, 200), rnd.randint(28, 200)), (rnd.randint(0, 255), 90, 160))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def one(session, url: str, i: int, rnd: random.Random, stats: dict) -> None:
    kind = rnd.choices(["ok", "cancel", "bad"], weights=[8, 1, 1])[0]
    max_tokens = rnd.randint(4, 32)
    body = {"text_input": f"soak {i}", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": rnd.choice([0.0, 0.8]), "seed": i}
    if rnd.random() < 0.3:
        body["image"] = [png(i)]
    if kind == "bad":
        body["image"] = [base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode()]
    stats["sent"][kind] += 1
    finals, tokens, errors = 0, 0, 0
    async with session.post(url, json=body) as r:
        async for line in r.content:
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                errors += 1
                break
            ids = event.get("output_ids", [])
            tokens += len(ids) if isinstance(ids, list) else 1
            finals += "finish_reason" in event
            if kind == "cancel":
                break  # the client goes away mid-stream
    if kind == "ok":
        good = errors == 0 and finals == 1 and tokens == max_tokens
        stats["ok_good" if good else "ok_bad"] += 1
        if not good:
            stats["problems"].append({"i": i, "finals": finals, "tokens": tokens, "want": max_tokens,
                                      "errors": errors})
    elif kind == "bad":
        stats["bad_refused" if errors == 1 else "bad_not_refused"] += 1


def rss(pid: int) -> int:
    import psutil

    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p] + p.children(recursive=True))


class Sampler(threading.Thread):
    """The server's resident memory every ``every`` seconds while the soak runs: growth that keeps
    going in the second half of the run suggests a leak; growth only early is warm-up (caches, pools)."""

    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.samples = pid, every, []
        self._stop_event = threading.Event()
        self.t0 = time.monotonic()
        self.start()

    def run(self) -> None:
        while True:
            self.samples.append([round(time.monotonic() - self.t0), round(rss(self.pid) / 2**20, 1)])
            if self._stop_event.wait(self.every):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.samples.append([round(time.monotonic() - self.t0), round(rss(self.pid) / 2**20, 1)])

    def halves(self) -> list[float]:
        """MB gained in the first and in the second half of the run."""
        mb = [m for _, m in self.samples]
        mid = len(mb) // 2
        return [round(mb[mid] - mb[0], 1), round(mb[-1] - mb[mid], 1)]


async def soak(url: str, seconds: float, concurrency: int, max_requests: int, seed: int) -> dict:
    stats = {"sent": {"ok": 0, "cancel": 0, "bad": 0}, "ok_good": 0, "ok_bad": 0, "bad_refused": 0,
             "bad_not_refused": 0, "problems": []}
    rnd = random.Random(seed)
    deadline = time.monotonic() + seconds
    counter = iter(range(max_requests))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def worker():
            for i in counter:
                if time.monotonic() > deadline:
                    return
                await one(session, url, i, rnd, stats)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="host:port of a running server's HTTP endpoint (default: start one)")
    ap.add_argument("--model", help="model directory for the server this script starts")
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-requests", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    server = None
    if args.url:
        host, pid = args.url, None
    else:
        from tritonvl.handlers.tiny_model import ensure_default_model
        from tritonvl.handlers.tools.launcher import ServerProcess

        server = ServerProcess(args.model or str(ensure_default_model())).start()
        host, pid = server.http_url, server.proc.pid
    url = f"http://{host}/v2/models/qwen2_5_vl/generate_stream"
    try:
        asyncio.run(soak(url, 10, 8, 50, args.seed + 1))  # warm-up before the memory baseline
        before = rss(pid) if pid else None
        series = Sampler(pid, every=15.0) if pid else None
        t = time.monotonic()
        stats = asyncio.run(soak(url, args.seconds, args.concurrency, args.max_requests, args.seed))
        stats["seconds"] = round(time.monotonic() - t, 1)
        stats["rss_before_mb"] = before / 2**20 if before else None
        stats["rss_after_mb"] = rss(pid) / 2**20 if pid else None
        if series:
            series.stop()
            stats["rss_series_mb"] = series.samples  # [seconds since start, MB] every 15 s
            stats["rss_growth_halves_mb"] = series.halves()
        import urllib.request

        with urllib.request.urlopen(f"http://{host}/v2/health/ready", timeout=10) as r:
            stats["ready_at_end"] = r.status == 200
    finally:
        if server:
            server.stop()
    print(json.dumps(stats, indent=1))
    healthy = stats["ok_bad"] == 0 and stats["bad_not_refused"] == 0 and stats["ready_at_end"]
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
