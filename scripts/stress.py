"""Stress run (issue 30; not in CI): mixed load on one server until a stub crashes or the time is up.

    python scripts/stress.py --minutes 30                      # bench preset, concurrency 8,16,32 in turns
    python scripts/stress.py --minutes 5 --concurrency 8 --model tiny
    python scripts/stress.py --repo /path/to/model_repository  # another repository (e.g. old code)

Starts its own tritonserver (the `bench` preset of benchmarks/bench.py by default) and an OpenAI
gateway in front of it, then keeps ``--concurrency`` clients busy (the level changes every
``--phase-seconds``, cycling through the list). Each client sends, at random by ``--mix`` weights:

- image: /generate_stream (SSE) with a PNG (a new one every few requests, so the vision tower runs);
- text: /generate (one JSON answer);
- video: /generate_stream with an 8-frame GIF (PyAV decodes it in preprocess);
- cancel: /generate_stream of a long answer, closed after its second event (a client disconnect);
- grpc: a gRPC stream (ModelStreamInfer), text or image, some asking for text_output only;
- gateway: /v1/chat/completions through the gateway, streamed or not, text or an image_url.

Counted: requests sent, ok, errors (the server answered with an error: a stream's error event, an
HTTP or gRPC error status), lost (no final answer: a stream that ended without one, a connection
dropped or timed out; a cancel is ok once it got its first event) and stub crashes: "Fatal Python
error" / "Segmentation fault" / "Signal (11|6)" in the server log (every stub writes a Python
traceback of each thread when it dies: adapter.enable_faulthandler), segfaults and traps of the
server or a stub in the kernel log (dmesg, where readable), or a stub or the server gone. It stops at
the first crash (unless --keep-going), then stops the server (SIGTERM) and checks that stop too.

The logs stay in --log-dir (default /tmp/tritonvl-stress: server.log, gateway.log, summary.json).
Exit status 0 only with no crash and no lost request.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CRASH_LINES = re.compile(r"Fatal Python error|Segmentation fault|Signal \((11|6|7|4|8)\)")
MIX = "image=4,text=2,video=1,cancel=1,grpc=2,gateway=2"


# ---- what the clients send ----

def png(seed: int, w: int = 224, h: int = 168) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def gif(seed: int, frames: int = 8, w: int = 112, h: int = 84) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // 4, w // 4, 3), dtype=np.uint8)
    imgs = [Image.fromarray(np.roll(base, i, axis=1)).resize((w, h)) for i in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=250, loop=0)
    return base64.b64encode(buf.getvalue()).decode()


class Media:
    """A few images and videos made once (the embedding cache still sees repeats and new ones)."""

    def __init__(self, n: int = 16) -> None:
        self.images = [png(i) for i in range(n)]
        self.videos = [gif(i) for i in range(4)]

    def image(self, rnd: random.Random) -> str:
        return rnd.choice(self.images)

    def video(self, rnd: random.Random) -> str:
        return rnd.choice(self.videos)


# ---- one request of each kind: "ok", "error" or "lost" ----

async def sse(session, url: str, body: dict, close_after: int = 0) -> str:
    events = 0
    async with session.post(url, json=body) as r:
        if r.status != 200:
            await r.read()
            return "error"
        async for line in r.content:
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                return "error"
            events += 1
            if close_after and events >= close_after:
                r.close()  # the client goes away mid-stream (a cancel): the connection is closed now
                return "ok"
            if "finish_reason" in event:
                return "ok"
    return "lost"  # the stream ended without its final event


async def plain(session, url: str, body: dict) -> str:
    async with session.post(url, json=body) as r:
        out = await r.json(content_type=None)
        if r.status != 200:
            return "error"
        return "ok" if "finish_reason" in out or "choices" in out else "lost"


async def gateway(session, url: str, rnd: random.Random, media: Media, i: int) -> str:
    content: list | str = f"Stress {i}: tell me about lighthouses."
    if rnd.random() < 0.5:
        content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + media.image(rnd)}},
                   {"type": "text", "text": "What is in this picture?"}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": rnd.randint(4, 24), "temperature": 0}
    if rnd.random() < 0.5:
        return await plain(session, url, body)
    async with session.post(url, json={**body, "stream": True}) as r:
        if r.status != 200:
            await r.read()
            return "error"
        async for line in r.content:
            if line.strip() == b"data: [DONE]":
                return "ok"
            if line.startswith(b"data:") and b'"error"' in line:
                return "error"
    return "lost"


async def grpc(client, rnd: random.Random, media: Media, i: int) -> str:
    import tritonclient.grpc.aio as aio

    fields = {"text_input": f"Stress {i}: describe it.", "max_tokens": rnd.randint(4, 24), "stream": True}
    if rnd.random() < 0.5:
        fields["image"] = base64.b64decode(media.image(rnd))
    inputs = []
    for name, value in fields.items():
        if isinstance(value, bool):
            arr, dtype = np.array([[value]]), "BOOL"
        elif isinstance(value, int):
            arr, dtype = np.array([[value]], dtype=np.int32), "INT32"
        else:
            arr, dtype = np.array([[value.encode() if isinstance(value, str) else value]], dtype=np.object_), "BYTES"
        t = aio.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    outputs = [aio.InferRequestedOutput("text_output")] if rnd.random() < 0.3 else None

    async def requests():
        yield {"model_name": "qwen2_5_vl", "inputs": inputs, "outputs": outputs, "request_id": str(i)}

    # the stream ends (the server closes it) once the request's last response went out
    got = 0
    async for _result, error in client.stream_infer(requests(), stream_timeout=600):
        if error is not None:
            return "error"
        got += 1
    return "ok" if got else "lost"


async def one(kind: str, session, urls: dict, grpc_client, rnd: random.Random, media: Media, i: int) -> str:
    long = {"max_tokens": 4000, "ignore_eos": True, "stream": True}  # tokens flow at once: closed after two
    short = {"max_tokens": rnd.randint(4, 32), "temperature": 0.0, "stream": rnd.random() < 0.7}
    text = f"Request {i}: describe the history of lighthouses in detail."
    if kind == "image":
        return await sse(session, urls["stream"], {"text_input": text, "image": [media.image(rnd)], **short})
    if kind == "text":
        return await plain(session, urls["generate"], {"text_input": text, **short, "stream": False})
    if kind == "video":
        return await sse(session, urls["stream"], {"text_input": "What happens?", "video": [media.video(rnd)], **short})
    if kind == "cancel":
        return await sse(session, urls["stream"], {"text_input": text, **long}, close_after=2)
    if kind == "grpc":
        return await grpc(grpc_client, rnd, media, i)
    if kind == "gateway":
        return await gateway(session, urls["chat"], rnd, media, i)
    raise ValueError(kind)


# ---- crash watch ----

def kernel_log() -> list[str] | None:
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.splitlines() if out.returncode == 0 and out.stdout else None


class CrashWatch:
    """Stub crashes since the start: the server log, the kernel log, processes gone."""

    def __init__(self, server) -> None:
        import psutil

        self.server, self.log_path = server, Path(server.log_path)
        self.kernel_before = set(kernel_log() or ())
        self.kernel_readable = kernel_log() is not None
        self.stubs = {p.pid: " ".join(p.cmdline()[1:2]).split("model_repository/")[-1]
                      for p in psutil.Process(server.proc.pid).children(recursive=True)
                      if "triton_python_backend_stub" in " ".join(p.cmdline()[:1])}
        self.pids = set(self.stubs) | {server.proc.pid}
        self._add_threads()

    def _add_threads(self) -> None:
        """The kernel names the thread that faulted: every thread id of the server and its stubs."""
        import psutil

        for pid in list(self.stubs) + [self.server.proc.pid]:
            try:
                self.pids.update(t.id for t in psutil.Process(pid).threads())
            except psutil.NoSuchProcess:
                pass

    @staticmethod
    def _running(pid: int) -> bool:
        import psutil

        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def crashes(self, stopping: bool = False) -> dict:
        if not stopping:
            self._add_threads()
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        found = {"server_log": [line for line in log.splitlines() if CRASH_LINES.search(line)]}
        found["kernel_log"] = []
        for line in kernel_log() or ():
            if line in self.kernel_before:
                continue
            m = re.search(r"\[(\d+)\]: (segfault at|trap|general protection)", line) \
                or re.search(r"traps: \S+\[(\d+)\]", line)
            if m and int(m.group(1)) in self.pids:
                found["kernel_log"].append(line)
        if not stopping:
            gone = [f"{name} ({pid})" for pid, name in self.stubs.items() if not self._running(pid)]
            if self.server.proc.poll() is not None:
                gone.append(f"tritonserver (exit {self.server.proc.returncode})")
            found["gone"] = gone
        return {k: v for k, v in found.items() if v}


# ---- the run ----

async def run(args, urls: dict, grpc_url: str, watch: CrashWatch, media: Media) -> dict:
    import tritonclient.grpc.aio as aio

    kinds, weights = zip(*[(k, float(w)) for k, w in (p.split("=") for p in args.mix.split(","))])
    levels = [int(c) for c in args.concurrency.split(",")]
    stats = {k: Counter() for k in kinds}
    crashes: dict = {}  # what the watch found; with --keep-going under "seen", and the load goes on
    stop = asyncio.Event()
    start = time.monotonic()
    deadline = start + 60 * args.minutes
    counter = iter(range(10**9))
    rnd = random.Random(args.seed)
    phases: list[dict] = []
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        grpc_client = aio.InferenceServerClient(grpc_url)
        try:
            async def client(stop_at: float) -> None:
                while time.monotonic() < stop_at and not stop.is_set():
                    i = next(counter)
                    kind = rnd.choices(kinds, weights)[0]
                    stats[kind]["sent"] += 1
                    try:
                        outcome = await asyncio.wait_for(one(kind, session, urls, grpc_client, rnd, media, i),
                                                         args.request_timeout)
                    except Exception as exc:  # dropped, reset, timed out: no answer came
                        outcome = "lost"
                        if stats[kind]["lost"] < 3:
                            print(f"lost {kind} {i}: {exc!r}", flush=True)
                    stats[kind][outcome] += 1

            async def watcher() -> None:
                seen: set = set()
                while time.monotonic() < deadline and not stop.is_set():
                    await asyncio.sleep(5)
                    found = await asyncio.to_thread(watch.crashes)
                    new = {k: [x for x in v if x not in seen] for k, v in found.items()}
                    new = {k: v for k, v in new.items() if v}
                    if not new:
                        continue
                    seen.update(x for v in new.values() for x in v)
                    print(f"[{time.monotonic() - start:7.0f} s] CRASH: {json.dumps(new)}", flush=True)
                    for k, v in new.items():
                        crashes.setdefault(k, []).extend(v)
                    if not args.keep_going:
                        stop.set()

            watch_task = asyncio.create_task(watcher())
            phase = 0
            while time.monotonic() < deadline and not stop.is_set():
                level = levels[phase % len(levels)]
                stop_at = min(deadline, time.monotonic() + args.phase_seconds)
                t0 = time.monotonic()
                await asyncio.gather(*(client(stop_at) for _ in range(level)))
                phases.append({"concurrency": level, "seconds": round(time.monotonic() - t0, 1)})
                total = sum(c["ok"] + c["error"] + c["lost"] for c in stats.values())
                print(f"[{time.monotonic() - start:7.0f} s] concurrency {level}: "
                      + ", ".join(f"{k} {dict(c)}" for k, c in stats.items()) + f" ({total} outcomes)", flush=True)
                phase += 1
            watch_task.cancel()
        finally:
            await grpc_client.close()
    return {"stats": {k: dict(c) for k, c in stats.items()}, "phases": phases, "crashes": crashes,
            "seconds": round(time.monotonic() - start, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--concurrency", default="8,16,32", help="levels, taken in turns, one per phase")
    ap.add_argument("--phase-seconds", type=float, default=120)
    ap.add_argument("--mix", default=MIX, help="kind=weight,... of image, text, video, cancel, grpc, gateway")
    ap.add_argument("--model", default="bench", help="tiny or bench (benchmarks/bench.py presets) or a model directory")
    ap.add_argument("--repo", help="model repository to serve (default: this checkout's)")
    ap.add_argument("--log-dir", default="/tmp/tritonvl-stress")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--keep-going", action="store_true", help="count crashes and go on (a dead stub fails the rest)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import MODELS, build_model

    from tritonvl.handlers.gateway.process import GatewayProcess
    from tritonvl.handlers.tools.launcher import ServerProcess, free_port

    model_dir = build_model(args.model) if args.model in MODELS else args.model
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"logs: {log_dir}/server.log, {log_dir}/gateway.log, {log_dir}/summary.json", flush=True)
    media = Media()
    server = ServerProcess(model_dir, repo=Path(args.repo) if args.repo else None, log_path=str(log_dir / "server.log"),
                           ready_timeout=900).start()
    gw = None
    try:
        watch = CrashWatch(server)
        gw = GatewayProcess(server.grpc_url, free_port(), api_keys=[], log_path=str(log_dir / "gateway.log")).start()
        base = f"http://{server.http_url}/v2/models/qwen2_5_vl"
        urls = {"generate": f"{base}/generate", "stream": f"{base}/generate_stream",
                "chat": f"{gw.url}/v1/chat/completions"}
        result = asyncio.run(run(args, urls, server.grpc_url, watch, media))
    finally:
        if gw is not None:
            gw.stop()
        code = server.stop(timeout=90)
    time.sleep(2)
    result["stop"] = {"exit_code": code, "crashes": watch.crashes(stopping=True)}
    result["kernel_log_read"] = watch.kernel_readable
    result["stubs"] = sorted(watch.stubs.values())
    result["command"] = " ".join(sys.argv)
    totals = Counter()
    for c in result["stats"].values():
        totals.update(c)
    result["totals"] = dict(totals)
    (log_dir / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    clean = not result["crashes"] and not result["stop"]["crashes"] and not totals["lost"] and code == 0
    print("CLEAN" if clean else "NOT CLEAN", f"(logs in {log_dir})")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
