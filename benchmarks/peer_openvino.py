"""tritonvl's in-process engine beside OpenVINO GenAI on the same model, load and machine.

    python benchmarks/peer_openvino.py                       # set up (once), export, run, print the table
    python benchmarks/peer_openvino.py --concurrency 1,8 --workloads text

Set-up (once, in its OWN virtual environment, ``.venv-peer-openvino/`` at the repository root,
gitignored; nothing goes into the project's interpreter): ``openvino-genai`` 2026.4.1,
``optimum-intel[openvino]`` 2.2.0 (for the export), transformers 4.57.x (optimum-intel refuses 5.x),
CPU torch; PyPI's torchvision (a CUDA build that breaks ``import transformers`` beside CPU torch) is
removed there. The bench preset (benchmarks/bench.py ``build_model``) is rewritten in the published
4.x layout (tests/helpers.py ``to_published_layout``) and exported offline with
``optimum-cli export openvino --weight-format fp32``.

Load: for each workload (a one-line prompt, with one distinct 224x168 PNG for ``image``) and each
concurrency N, N requests of 32 greedy output tokens (``ignore_eos``) submitted at once: tritonvl's
OfflinePipeline (the three models' code in one process) and OpenVINO GenAI's
ContinuousBatchingPipeline (its continuous-batching scheduler, f32 inference precision) each get all
N together; output tokens / wall seconds. Both are loaded, then each level runs on one and then the
other (alternated, so the machine's load drifts alike for both); the load average is printed with
each figure, and "same text" counts the requests whose greedy text is equal in both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
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
    images = [[tensor(r["image"])] if r["image"] else [] for r in reqs]
    t = time.perf_counter()
    out = pipe.generate(prompts, images=images, generation_config=[cfg] * len(reqs))
    wall = time.perf_counter() - t
    return wall, out

run(job["warmup"])
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--workloads", default="image,text")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--setup-only", action="store_true")
    args = ap.parse_args()

    from bench import build_model, make_image

    setup()
    model_dir = build_model(args.model)
    ov_dir = export(model_dir)
    if args.setup_only:
        print(f"peer venv {VENV}; exported model {ov_dir}")
        return
    levels = [int(x) for x in args.concurrency.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="peer-ov-"))

    def requests(workload: str, n: int, offset: int) -> list[dict]:
        out = []
        for i in range(offset, offset + n):
            img = None
            if workload == "image":
                img = tmp / f"{i}.png"
                img.write_bytes(make_image(i))
            out.append({"text": f"Request {i}: describe the history of lighthouses in detail.",
                        "image": str(img) if img else None})
        return out

    runs = [{"label": f"{w} {n}", "workload": w, "requests": requests(w, n, 1000 * n + (500 if w == "image" else 0))}
            for w in args.workloads.split(",") for n in levels]
    print(f"# {cpu_model()} | model {args.model} | {args.max_tokens} output tokens, greedy | load {load()}")

    # both systems loaded, then each level run by one and then the other (the load drifts alike)
    job = {"model": str(ov_dir), "levels": levels, "max_tokens": args.max_tokens,
           "warmup": requests("text", 2, 99_000)}
    proc = subprocess.Popen([str(venv_python()), "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    proc.stdin.write(json.dumps(job) + "\n")
    proc.stdin.flush()

    def peer_line() -> dict:
        while True:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("the OpenVINO GenAI worker ended early")
            if line.startswith("{"):
                return json.loads(line)

    from tritonvl.handlers.preprocess.preprocessor import RawRequest
    from tritonvl.handlers.tools.offline import OfflinePipeline

    peer, ours = {}, {}
    try:
        peer_line()  # ready
        with OfflinePipeline(model_dir, max_num_seqs=max(64, max(levels))) as pipe:
            def raw(reqs):
                return [RawRequest(text_input=r["text"].encode(),
                                   images=[Path(r["image"]).read_bytes()] if r["image"] else [],
                                   sampling={"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True})
                        for r in reqs]

            pipe.generate(raw(job["warmup"]))
            for r in runs:
                proc.stdin.write(json.dumps({"label": r["label"], "requests": r["requests"]}) + "\n")
                proc.stdin.flush()
                rec = peer_line()
                peer[r["label"]] = (rec["tokens"] / rec["wall"], load(), rec["texts"])
                t = time.perf_counter()
                res = pipe.generate(raw(r["requests"]))
                wall = time.perf_counter() - t
                texts = [x.text[len(q["text"]):] if x.text.startswith(q["text"]) else x.text  # the echoed prompt
                         for x, q in zip(res, r["requests"])]
                ours[r["label"]] = (sum(len(x.token_ids) for x in res) / wall, load(), texts)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    first = runs[0]["label"]
    print(f"first request of '{first}': tritonvl {ours[first][2][0][:80]!r}; OpenVINO {peer[first][2][0][:80]!r}")
    print("\n| workload | concurrency | tritonvl in-process tok/s | OpenVINO GenAI fp32 tok/s | tritonvl / OpenVINO "
          "| same text | load (OpenVINO / tritonvl) |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        w, n = r["label"].split()
        o, p = ours[r["label"]], peer[r["label"]]
        same = sum(a.strip() == b.strip() for a, b in zip(o[2], p[2]))
        print(f"| {w} | {n} | {o[0]:.1f} | {p[0]:.1f} | {o[0] / p[0]:.2f} | {same}/{len(o[2])} | {p[1]} / {o[1]} |")


if __name__ == "__main__":
    main()
