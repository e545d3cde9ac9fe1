"""tritonvl served and in-process beside OpenVINO GenAI on the same model, load and machine, in one run.

    python benchmarks/peer_openvino.py                       # set up (once), export, run, print the table
    python benchmarks/peer_openvino.py --concurrency 1,8 --workloads text --json /tmp/peer.json
    python benchmarks/peer_openvino.py --systems served,openvino --client grpc
    python benchmarks/peer_openvino.py --set compile=decode    # llm parameters for both tritonvl systems
    python benchmarks/peer_openvino.py --report /tmp/peer.json   # the table again from a saved run

Set-up (once, in its OWN virtual environment, ``.venv-peer-openvino/`` at the repository root,
gitignored; nothing goes into the project's interpreter): ``openvino-genai`` 2026.4.1,
``optimum-intel[openvino]`` 2.2.0 (for the export), transformers 4.57.x (optimum-intel refuses 5.x),
CPU torch; PyPI's torchvision (a CUDA build that breaks ``import transformers`` beside CPU torch) is
removed there. The bench preset (benchmarks/bench.py ``build_model``) is rewritten in the published
4.x layout (tests/helpers.py ``to_published_layout``) and exported offline with
``optimum-cli export openvino --weight-format fp32``. The venv, the rewritten model and the export
(``<cache>/bench-bench-4x``, ``<cache>/bench-bench-openvino-fp32`` beside the bench model) are kept
and reused by later runs.

Systems (``--systems``, default all four):
- ``openvino``: OpenVINO GenAI's ContinuousBatchingPipeline (its continuous-batching scheduler, f32
  inference precision, its own thread pool) in a worker process in the peer's venv;
- ``inprocess``: tritonvl's OfflinePipeline (preprocess, vision encoder and engine in this process);
- ``served``: ONE tritonserver on the shipped model repository (bench.py's system C: llm backend
  engine), driven by N streaming clients (HTTP SSE as bench.py, or ``--client grpc``): a response per
  token through two Python stubs (llm, the public front) and tritonserver;
- ``whole``: the same server, as many requests of the same shape with ``stream`` false (HTTP ``/generate``,
  or one gRPC response): one response per request, as OpenVINO's ``generate()`` here returns whole answers.
  Its requests are others (numbered WHOLE_OFFSET on, the same token counts, other images): the server's
  image-embedding and prefix caches hold those "served" just ran.
The in-process engine and the server's engine get the same torch thread count (``--threads``; default
torch's own default in this process, one per core): ``torch.set_num_threads`` here (preprocess, vision
tower and engine share that pool and run one after the other), ``llm.num_threads`` and
``OMP_NUM_THREADS`` (preprocess) for the server, whose vision encoder keeps the repository's ``auto``
(half the cores: in a server it runs beside the engine's steps).

Load: for each workload (a one-line prompt, with one distinct 224x168 PNG for ``image``: bench.py
``bodies``) and each concurrency N, the same N requests of ``--max-tokens`` (32) greedy output tokens
(``ignore_eos``, so every request makes exactly that many: counted for tritonvl, assumed for
OpenVINO) submitted at once to each system; output tokens / wall seconds. All are loaded and warmed up
first, then each level runs on OpenVINO, then in-process, then served, then whole, one at a time (the in-process
engine is idle before the server gets its requests), so the machine's load drifts alike for all. The
load average is printed with each figure, and "same text" counts the requests whose greedy text is
equal in two systems. The server is stopped at the end, also after an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from load import run_grpc_load, run_load  # noqa: E402
from machine import cpu_model, load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-peer-openvino"
PEER_PACKAGES = ["torch==2.13.0", "openvino-genai==2026.4.1", "optimum-intel[openvino]==2.2.0",
                 "transformers==4.57.*", "pillow"]

# Runs inside the peer's venv: reads the job (one JSON line) on stdin, then one level per line; prints
# one JSON line per level.
WORKER = r'''
import json, sys, time
import numpy as np
import openvino as ov
import openvino_genai as og
from PIL import Image

job = json.loads(sys.stdin.readline())
sched = og.SchedulerConfig()
sched.cache_size = 1
sched.max_num_seqs = max(job["levels"])
pipe = og.ContinuousBatchingPipeline(job["model"], sched, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
cfg = og.GenerationConfig()
cfg.max_new_tokens = job["max_tokens"]
cfg.ignore_eos = True
cfg.do_sample = False

def tensor(path):
    return ov.Tensor(np.array(Image.open(path).convert("RGB"))[None])

def run(reqs):
    prompts = [r["text"] for r in reqs]
    t = time.perf_counter()  # decoding the PNGs counts, as it does for tritonvl
    images = [[tensor(r["image"])] if r["image"] else [] for r in reqs]
    out = pipe.generate(prompts, images=images, generation_config=[cfg] * len(reqs))
    wall = time.perf_counter() - t
    return wall, out

for reqs in job["warmup"]:  # a text batch, and an image batch when images are measured
    run(reqs)
print(json.dumps({"ready": True}), flush=True)
while True:  # one level at a time, so the caller can alternate with tritonvl
    line = sys.stdin.readline()
    if not line:
        break
    level = json.loads(line)
    wall, out = run(level["requests"])
    texts = [o.texts[0] for o in out]
    # ignore_eos: max_new_tokens each (its perf_metrics count the whole batched call in every result)
    tokens = job["max_tokens"] * len(out)
    print(json.dumps({"label": level["label"], "wall": wall, "tokens": tokens, "texts": texts}), flush=True)
'''


def venv_python() -> Path:
    return VENV / "bin" / "python"


def setup() -> None:
    if venv_python().exists() and subprocess.run([str(venv_python()), "-c", "import openvino_genai, optimum.intel"],
                                                 capture_output=True).returncode == 0:
        return
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(venv_python()), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    subprocess.run([str(venv_python()), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=False)


def export(model_dir: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.helpers import to_published_layout

    base = Path(model_dir)
    legacy, out = base.parent / (base.name + "-4x"), base.parent / (base.name + "-openvino-fp32")
    if not (legacy / "config.json").is_file():
        to_published_layout(base, legacy)
    if not (out / "openvino_language_model.xml").is_file():
        subprocess.run([str(VENV / "bin" / "optimum-cli"), "export", "openvino", "--model", str(legacy),
                        "--task", "image-text-to-text", "--weight-format", "fp32", str(out)], check=True)
    return out


SYSTEMS = {"openvino": "OpenVINO GenAI fp32", "inprocess": "tritonvl in-process", "served": "tritonvl served",
           "whole": "tritonvl served, whole answers"}
PAIRS = [("served", "openvino"), ("inprocess", "openvino"), ("served", "inprocess")]  # ratios, same text
# "whole" runs requests of its own (the server's embedding and prefix caches hold the ones "served" just ran):
# a ratio, no text to compare
RATIOS = PAIRS + [("whole", "openvino")]
WHOLE_OFFSET = 400  # its requests' numbers: as many digits as the level's own (the same token counts), none shared


class OpenVINOWorker:
    """WORKER in the peer's venv: it loads and warms up as soon as it starts; then one level at a time."""

    def __init__(self, ov_dir: Path, levels: list[int], max_tokens: int, warmup: list[list[dict]]) -> None:
        self.proc = subprocess.Popen([str(venv_python()), "-c", WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self._send({"model": str(ov_dir), "levels": levels, "max_tokens": max_tokens, "warmup": warmup})

    def _send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def line(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the OpenVINO GenAI worker ended early (exit {self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, label: str, requests: list[dict]) -> dict:
        self._send({"label": label, "requests": requests})
        return self.line()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def images(body: dict) -> list[bytes]:
    return [base64.b64decode(x) for x in body.get("image", [])]


def figure(tokens: int, wall: float, texts: list[str], exact: int, errors: int = 0, first_error: str = "",
           ttfts: list[float] = ()) -> dict:
    """One system's figure for one level (the load average taken as it ends; ``ttfts``: seconds from the
    level's start, or the request's, to its first token, where the system tells)."""
    return {"tok_s": tokens / wall, "wall_s": wall, "tokens": tokens, "requests": len(texts), "exact": exact,
            "errors": errors, "first_error": first_error, "load": load(), "texts": texts,
            "ttft_p50_ms": 1e3 * statistics.median(ttfts) if ttfts else None}


def wait_idle(engine, timeout: float = 30.0) -> None:
    """Until the in-process engine has nothing scheduled (it must not step while another system runs)."""
    deadline = time.monotonic() + timeout
    while engine.scheduler.has_work():
        if time.monotonic() > deadline:
            raise RuntimeError("the in-process engine is still busy after its level")
        time.sleep(0.01)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="any of " + ", ".join(SYSTEMS))
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--workloads", default="image,text")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--client", choices=["http", "grpc"], default="http", help="how the served system is driven")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of the in-process engine and of the server (0: torch's default here)")
    ap.add_argument("--json", metavar="OUT", help="write the figures there (--report prints the table again)")
    ap.add_argument("--report", metavar="IN", help="print the table of a saved --json run and exit")
    ap.add_argument("--log-dir", default="/tmp/tritonvl-bench-logs", help="where the server's log is kept")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="llm_set",
                    help="an llm parameter for both tritonvl systems (docs/PARAMETERS.md), e.g. compile=decode")
    ap.add_argument("--setup-only", action="store_true")
    args = ap.parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return 0
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        ap.error(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    systems = [s for s in SYSTEMS if s in systems]  # always this order within a level
    levels = [int(x) for x in args.concurrency.split(",")]
    workloads = args.workloads.split(",")

    import torch
    from bench import Triton, bodies, build_model, log_file

    from tritonvl.handlers.devices import cpu_threads

    model_dir = build_model(args.model)
    ov_dir = None
    if "openvino" in systems or args.setup_only:
        setup()
        ov_dir = export(model_dir)
    if args.setup_only:
        print(f"peer venv {VENV}; exported model {ov_dir}")
        return 0
    from tritonvl.handlers.params import typed_strings

    llm_set = dict(kv.split("=", 1) for kv in args.llm_set)
    llm_kwargs = typed_strings("llm", llm_set)  # a misspelt name or a bad value stops here, before anything loads
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    max_seqs = max(64, max(levels))
    results = {"cpu": cpu_model(), "model": args.model, "max_tokens": args.max_tokens, "threads": threads,
               "served_vision_threads": cpu_threads("auto", share=0.5), "client": args.client, "systems": systems,
               "llm_set": llm_set,
               "load_at_start": load(), "rows": []}
    print(f"# {results['cpu']} | model {args.model} | {args.max_tokens} output tokens, greedy | {threads_note(results)}"
          f" | served over {args.client} | load {load()}", flush=True)

    def level(w: str, n: int) -> dict:
        first = 1000 * n + (500 if w == "image" else 0)  # the level's request numbers
        return {"workload": w, "concurrency": n, "bodies": bodies(w, n, args.max_tokens, first),
                "whole": bodies(w, n, args.max_tokens, first + WHOLE_OFFSET)}

    runs = [level(w, n) for w in workloads for n in levels]
    warmup = [bodies("text", 2, args.max_tokens, 99_000)]
    if "image" in workloads:
        warmup.append(bodies("image", 2, args.max_tokens, 99_100))

    with contextlib.ExitStack() as stack:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SystemExit: the stack still unwinds
        tmp = Path(tempfile.mkdtemp(prefix="peer-ov-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)

        def peer_requests(bs: list[dict]) -> list[dict]:  # the same requests, images as files for the worker
            out = []
            for b in bs:
                path = None
                for data in images(b):
                    path = tmp / f"{hashlib.sha1(data).hexdigest()}.png"
                    path.write_bytes(data)
                out.append({"text": b["text_input"], "image": str(path) if path else None})
            return out

        def raw(bs: list[dict]):
            return [RawRequest(text_input=b["text_input"].encode(), images=images(b), exclude_input_in_output=True,
                               sampling={"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True})
                    for b in bs]

        def served(bs: list[dict], stream: bool = True) -> tuple[list, float]:
            if args.client == "grpc":
                fields = [{**b, "stream": stream, **({"image": images(b)} if "image" in b else {})} for b in bs]
                return asyncio.run(run_grpc_load(server.grpc_url, fields, len(bs)))
            return asyncio.run(run_load(server.url, bs, len(bs), stream))

        peer = pipe = server = None
        if "openvino" in systems:  # loads and warms up in its own process while the others load
            peer = OpenVINOWorker(ov_dir, levels, args.max_tokens, [peer_requests(w) for w in warmup])
            stack.callback(peer.close)
        if "inprocess" in systems:
            from tritonvl.handlers.preprocess.preprocessor import RawRequest
            from tritonvl.handlers.tools.offline import OfflinePipeline

            pipe = stack.enter_context(OfflinePipeline(model_dir, **{"max_num_seqs": max_seqs, **llm_kwargs}))
        if "served" in systems or "whole" in systems:
            server = Triton(model_dir, "engine", {"max_num_seqs": max_seqs, "num_threads": threads, **llm_set},
                            log_file(args.log_dir, f"peer-openvino-served-{args.model}.log"),
                            env={"OMP_NUM_THREADS": str(threads)})  # preprocess; the vision encoder: its auto
            stack.callback(server.stop)
        if peer:
            peer.line()  # loaded and warmed up
        for w in warmup:  # one at a time
            if pipe:
                pipe.generate(raw(w))
                wait_idle(pipe.engine)
            if server:
                records, _ = served(w, "served" in systems)
                if not all(r.ok for r in records):
                    raise RuntimeError(f"served warm-up failed: {next(r.error for r in records if not r.ok)}")

        for r in runs:
            label, row = f"{r['workload']} {r['concurrency']}", {"workload": r["workload"],
                                                                  "concurrency": r["concurrency"]}
            if peer:
                rec = peer.run(label, peer_requests(r["bodies"]))
                row["openvino"] = figure(rec["tokens"], rec["wall"], rec["texts"], len(rec["texts"]))
            if pipe:
                t = time.perf_counter()
                res = pipe.generate(raw(r["bodies"]))
                wall = time.perf_counter() - t
                row["inprocess"] = figure(sum(len(x.token_ids) for x in res), wall, [x.text for x in res],
                                          sum(len(x.token_ids) == args.max_tokens for x in res),
                                          sum(bool(x.error) for x in res), next((x.error for x in res if x.error), ""),
                                          [x.first_token - t for x in res if x.first_token])
                wait_idle(pipe.engine)
            for name, stream in (("served", True), ("whole", False)):
                if name not in systems:
                    continue
                records, wall = served(r["bodies" if stream else "whole"], stream)
                ok = [x for x in records if x.ok]
                row[name] = figure(sum(x.tokens for x in ok), wall, [x.text for x in records],
                                   sum(x.tokens == args.max_tokens for x in ok), len(records) - len(ok),
                                   next((x.error for x in records if not x.ok), ""),
                                   [x.ttft for x in ok] if stream else ())
            finish_row(row)
            results["rows"].append(row)
            print(f"{label}: " + ", ".join(f"{s} {row[s]['tok_s']:.1f} tok/s" + (
                f", TTFT p50 {row[s]['ttft_p50_ms']:.0f} ms" if row[s]["ttft_p50_ms"] is not None else "")
                + f" (load {row[s]['load']})" for s in systems), flush=True)
    results["load_at_end"] = load()
    first = results["rows"][0]
    print(f"first request of '{first['workload']} {first['concurrency']}': "
          + "; ".join(f"{s} {first[s]['texts'][0][:80]!r}" for s in systems))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"figures written to {args.json}")
    print(report(results))
    return 0


def finish_row(row: dict) -> None:
    """Ratios of tokens/s and "same text" counts (greedy texts equal, request by request) per pair."""
    for a, b in RATIOS:
        if a in row and b in row:
            same = (sum(x.strip() == y.strip() for x, y in zip(row[a]["texts"], row[b]["texts"]))
                    if (a, b) in PAIRS else None)  # "whole" answered other requests: nothing to compare
            row[f"{a}/{b}"] = {"ratio": row[a]["tok_s"] / row[b]["tok_s"], "same_text": same}


def threads_note(results: dict) -> str:
    extra = "".join(f", llm {k}={v}" for k, v in results.get("llm_set", {}).items())
    return (f"torch threads {results['threads']} (in-process; the server's engine and preprocess), "
            f"{results.get('served_vision_threads', '?')} in the server's vision encoder (its auto){extra}")


def report(results: dict) -> str:
    """The Markdown table of a run (``results``: what --json writes)."""
    def cell(row, key, fmt):
        return fmt.format(**row[key]) if key in row else "-"

    lines = [f"{results['cpu']}; model `{results['model']}`, {results['max_tokens']} greedy output tokens per "
             f"request, N requests at once per system; {threads_note(results)}; served over "
             f"{results['client']}; load average {results['load_at_start']} at the start, "
             f"{results.get('load_at_end', '?')} at the end.", "",
             "| workload | conc | tritonvl served (streamed) tok/s | tritonvl in-process tok/s "
             "| tritonvl served, whole answers tok/s | OpenVINO GenAI fp32 tok/s "
             "| served / OpenVINO | in-process / OpenVINO | whole / OpenVINO "
             "| same text served=OV / in-proc=OV / served=in-proc "
             "| load (1/5/15 min) after OpenVINO; in-process; served; whole |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for row in results["rows"]:
        n = row["concurrency"]
        lines.append(" | ".join([
            f"| {row['workload']}", str(n),
            *(cell(row, s, "{tok_s:.1f}") for s in ("served", "inprocess", "whole", "openvino")),
            *(cell(row, p, "{ratio:.2f}") for p in ("served/openvino", "inprocess/openvino", "whole/openvino")),
            " / ".join(cell(row, f"{a}/{b}", "{same_text}/" + str(n)) for a, b in PAIRS),
            "; ".join(cell(row, s, "{load}") for s in ("openvino", "inprocess", "served", "whole")) + " |"]))
        for s in ("served", "inprocess", "whole"):
            f = row.get(s)
            if f and (f["errors"] or f["exact"] != f["requests"]):
                notes.append(f"- {row['workload']} {n}, {SYSTEMS[s]}: {f['errors']} errors, {f['exact']}/"
                             f"{f['requests']} requests with exactly {results['max_tokens']} tokens "
                             f"{f['first_error'][:200]}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


if __name__ == "__main__":
    sys.exit(main())
