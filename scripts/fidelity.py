#!/usr/bin/env python3
"""docs/FIDELITY.md: greedy answers of the served pipeline (a real tritonserver on model_repository/)
against transformers' generate() on the same weights, case by case, with the raw JSON beside it.

    python scripts/fidelity.py                                 # every family's tiny model, float32
    python scripts/fidelity.py --dtype float32,bfloat16        # the committed report (fp32 and bf16)
    python scripts/fidelity.py --model /models/Qwen2.5-VL-3B-Instruct --doc /tmp/F.md --json /tmp/f.json
    python scripts/fidelity.py --families qwen2_5_vl --cases text,image --doc /tmp/F.md --json /tmp/f.json

Per model and dtype: one server (``ServerProcess``, as ``tritonvl serve --set``: the model's
``llm.dtype`` and ``vision_encoder.dtype`` and a small video frame budget), one transformers
reference (tests/family_ref.py ``FamilyReference``, the oracle of the family parity tests; videos go
in as the rows the server's own intake builds, tests/videos.py ``intake``). Cases: text, one image,
two images, a video, a concurrent batch (``--batch`` requests at once), a prefix-cache hit (the same
image and prompt twice, then the prompt extended). float32: every answer must equal generate()'s
token for token (the exit status is 1 otherwise); bfloat16 (served and reference both in bf16):
the share of identical answers and the first position where each differs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the parity tests' oracle and media makers (tests/), the machine line of the benchmarks
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from family_ref import VIDEO, FamilyReference, video_limits  # noqa: E402
from helpers import GaugePeak, infer_http, make_image, metrics  # noqa: E402
from machine import cpu_model, load  # noqa: E402
from videos import intake, make_video  # noqa: E402

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
CASES = ("text", "image", "two_images", "video", "batch", "prefix_cache")
DTYPES = ("float32", "bfloat16")
DOC = ROOT / "docs" / "FIDELITY.md"
JSON_OUT = ROOT / "docs" / "fidelity" / "fidelity.json"
DESCRIPTION = {
    "text": "a text-only prompt",
    "image": "one image (200x150)",
    "two_images": "two images of different sizes and aspect ratios",
    "video": "one MP4 video (2 s at 8 fps, 4 frames sampled: 2 temporal patches)",
    "batch": "N requests sent at once (text, one image, two images, video in turn), batched by the engine",
    "prefix_cache": "the same image and prompt twice (the second a prefix-cache hit), then the prompt extended",
}


@dataclass
class Req:
    name: str
    text: str
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)


@dataclass
class Case:
    name: str
    requests: list
    mode: str = "sequential"  # or "concurrent"


def build_cases(names: list[str], batch: int) -> list[Case]:
    clip = make_video(n=16, width=112, height=84, fps=8, seed=1)
    out = {
        "text": Case("text", [Req("text", "Tell me about lighthouses.")]),
        "image": Case("image", [Req("image", "What is in the picture?", [make_image(200, 150, seed=1)])]),
        "two_images": Case("two_images", [Req("two_images", "Compare the two images.",
                                              [make_image(300, 120, seed=4), make_image(64, 200, seed=5)])]),
        "video": Case("video", [Req("video", "What happens in this video?", videos=[clip])]),
    }
    reqs = []
    for i in range(batch):
        kind = i % 4
        images = [make_image(120 + 16 * i, 90, seed=20 + i)] * (kind if kind < 3 else 0)
        videos = [make_video(n=8, width=96, height=64, fps=4, seed=40 + i)] if kind == 3 else []
        reqs.append(Req(f"batch[{i}]", f"Describe request {i}.", images, videos))
    out["batch"] = Case("batch", reqs, "concurrent")
    img = make_image(168, 112, seed=4242)
    first = "First question about this picture."
    out["prefix_cache"] = Case("prefix_cache", [Req("first", first, [img]), Req("again", first, [img]),
                                                Req("extended", first + " And a second one.", [img])])
    return [out[n] for n in names]


def compare(served: list[int], reference: list[int]) -> dict:
    """Token match of one answer: the first position where the two differ (a missing token counts)."""
    first = next((i for i, (a, b) in enumerate(zip(served, reference)) if a != b), None)
    if first is None and len(served) != len(reference):
        first = min(len(served), len(reference))
    return {"tokens": max(len(served), len(reference)), "match": first is None, "first_divergence": first,
            "served": served, "reference": reference}


def served_answers(srv, case: Case, max_tokens: int) -> tuple[list[list[int]], dict]:
    def send(req: Req) -> list[int]:
        fields = {"text_input": req.text, "temperature": 0.0, "max_tokens": max_tokens,
                  "exclude_input_in_output": True}
        if req.images:
            fields["image"] = req.images
        if req.videos:
            fields["video"] = req.videos
        return infer_http(srv.http_url, **fields)["output_ids"]

    extra: dict = {}
    if case.mode == "concurrent":
        # every 5 ms: on a fast machine 4 short tiny-model answers overlap for only tens of ms
        with GaugePeak(srv, "tritonvl_num_requests_running", interval=0.005) as peak:
            with ThreadPoolExecutor(len(case.requests)) as pool:
                outs = list(pool.map(send, case.requests))
        extra["requests_running_peak"] = int(peak.peak)
        return outs, extra
    outs, hits = [], []
    for req in case.requests:
        before = metrics(srv).get("tritonvl_prefix_cache_hit_tokens_total", 0.0)
        outs.append(send(req))
        hits.append(int(metrics(srv).get("tritonvl_prefix_cache_hit_tokens_total", 0.0) - before))
    if case.name == "prefix_cache":
        extra["prefix_cache_hit_tokens"] = hits
    return outs, extra


def reference_answers(ref: FamilyReference, rows, case: Case, max_tokens: int) -> list[list[int]]:
    return [ref.generate(r.text, r.images, videos=[rows(v) for v in r.videos], max_tokens=max_tokens)
            for r in case.requests]


def server_overrides(dtype: str, sets: dict) -> dict:
    out = {"preprocess": {k: str(v) for k, v in VIDEO.items()},
           "llm": {"dtype": dtype}, "vision_encoder": {"dtype": dtype}}
    for model, values in sets.items():
        out.setdefault(model, {}).update(values)
    return out


def tritonserver_version(srv) -> str:
    import requests

    try:
        return requests.get(f"http://{srv.http_url}/v2", timeout=10).json().get("version", "?")
    except (OSError, ValueError):
        return "?"


def run_model(label: str, model_dir: str, dtype: str, cases: list[Case], args, info: dict) -> dict:
    """One server and one reference for (model, dtype): every case through both."""
    from tritonvl.handlers.modelinfo import load_model_info
    from tritonvl.handlers.tools.launcher import ServerProcess

    t0 = time.monotonic()
    overrides = server_overrides(dtype, args.sets)
    log = Path(args.workdir) / f"tritonserver-{label}-{dtype}.log"
    env = {"TRITONVL_DEVICE": args.device} if args.device else None
    srv = ServerProcess(model_dir, overrides=overrides, log_path=str(log), env=env)
    started: dict = {}

    def start():  # the server's stubs load while the reference loads and answers
        try:
            srv.start()
        except BaseException as e:  # noqa: B036 -- handed to the main thread
            started["error"] = e

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    try:
        ref = FamilyReference(model_dir, dtype=dtype, device=args.device or "cpu")
        rows = intake(ref.ip, video_limits())
        refs = {c.name: reference_answers(ref, rows, c, args.max_tokens) for c in cases}
        t_ref = time.monotonic() - t0
        thread.join()
        if "error" in started:
            raise started["error"]
        info.setdefault("tritonserver", tritonserver_version(srv))
        records = []
        for case in cases:
            t = time.monotonic()
            outs, extra = served_answers(srv, case, args.max_tokens)
            reqs = [{"name": r.name, **compare(o, w)} for r, o, w in zip(case.requests, outs, refs[case.name])]
            diverged = [r["first_divergence"] for r in reqs if r["first_divergence"] is not None]
            records.append({"case": case.name, "requests": len(reqs),
                            "identical": sum(r["match"] for r in reqs),
                            "tokens_compared": sum(r["tokens"] for r in reqs),
                            "match": not diverged, "first_divergence": min(diverged) if diverged else None,
                            "served_seconds": round(time.monotonic() - t, 2), **extra, "answers": reqs})
            mark = "ok" if not diverged else f"DIVERGED at {min(diverged)}"
            print(f"  {label} {dtype} {case.name}: {records[-1]['identical']}/{len(reqs)} identical, "
                  f"{records[-1]['tokens_compared']} tokens: {mark}", flush=True)
        alive = srv.proc.poll() is None
    finally:
        thread.join()
        srv.stop()
    if not alive:
        raise RuntimeError(f"the server of {label} ({dtype}) died during the run; log: {log}")
    return {"model": label, "family": load_model_info(model_dir).family, "dtype": dtype,
            "server_sets": [f"{m}.{k}={v}" for m, kv in overrides.items() for k, v in kv.items()],
            "match": all(c["match"] for c in records), "cases": records,
            "reference_seconds": round(t_ref, 1), "seconds": round(time.monotonic() - t0, 1)}


def versions() -> dict:
    import torch
    import transformers

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "?"
    if git("status", "--porcelain", "--untracked-files=no", "--", "handlers", "client", "model_repository"):
        commit += " + uncommitted changes"
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "tritonvl_commit": commit}


def compact_json(obj) -> str:
    """Indented JSON with each list of numbers (token ids) on one line."""
    text = json.dumps(obj, indent=1)
    def one_line(m):
        return "[" + ", ".join(x for x in re.split(r"[\s,]+", m.group(0)[1:-1]) if x) + "]"
    return re.sub(r"\[[-\d\s,.]*\]", one_line, text) + "\n"


# ---- the report -------------------------------------------------------------------------------

def _div(c: dict) -> str:
    firsts = [a["first_divergence"] for a in c["answers"]]
    if all(f is None for f in firsts):
        return "-"
    if len(firsts) == 1:
        return str(firsts[0])
    return ", ".join("-" if f is None else str(f) for f in firsts)


def _notes(c: dict) -> str:
    out = []
    if "prefix_cache_hit_tokens" in c:
        out.append("prefix-cache hit tokens per request: " + ", ".join(map(str, c["prefix_cache_hit_tokens"])))
    if "requests_running_peak" in c:
        out.append(f"{c['requests_running_peak']} running at once (peak)")
    return "; ".join(out)


def markdown(report: dict) -> str:
    m, v = report["machine"], report["versions"]
    tiny = any(r["model"].startswith("tiny-") for r in report["runs"])
    lines = [
        "# Fidelity: served answers against transformers' generate()",
        "",
        f"Generated by `{report['command']}` on {report['date']}; the raw data (every answer's token ids, "
        f"served and reference) is in [{report['json_name']}]({report['json_name']}).",
        "",
        "Each case goes through a real `tritonserver` on `model_repository/` (public model `qwen2_5_vl`: "
        "preprocess -> vision_encoder -> llm, continuous batching, paged KV cache, prefix cache) and through "
        "transformers' `generate()` on the same weights, both greedy, "
        f"{report['max_tokens']} new tokens at most. A case passes in float32 when every answer is the reference's "
        "token for token; in bfloat16 (server and reference both in bf16) the table gives the share of identical "
        "answers and, per answer, the first position where it differs (`-`: identical; positions count from 0).",
        "",
    ]
    if tiny:
        lines += ["**Models `tiny-*` are random-weight tiny models** (handlers/tiny_model.py, one per family, a few "
                  "MB, wide initializer so greedy tokens vary): they show the serving path computes what "
                  "transformers computes, not answer quality. Pass `--model DIR` to run a real checkpoint.", ""]
    lines += [
        "## Machine and versions", "",
        "| | |", "|---|---|",
        f"| machine | {m['cpu']}, {m['platform']} (load average at the start: {m['load']}) |",
        f"| device | {m['device']} |",
        f"| torch | {v['torch']} |", f"| transformers | {v['transformers']} |",
        f"| tritonserver | {v.get('tritonserver', '?')} |", f"| python | {v['python']} |",
        f"| tritonvl | commit {v['tritonvl_commit']} |",
        f"| run time | {report['seconds']} s (per model and dtype, server start included: "
        + ", ".join(f"{r['model']} {r['dtype']} {r['seconds']:.0f} s" for r in report["runs"]) + ") |", "",
        "## Cases", "",
    ]
    batch = f"{report['batch']} requests"
    lines += [f"- `{name}`: {DESCRIPTION[name].replace('N requests', batch)}" for name in report["cases"]]
    if {"video", "batch"} & set(report["cases"]):
        lines += [f"- videos: frame budget `{', '.join(f'preprocess.{k}={x}' for k, x in VIDEO.items())}` "
                  "(a few tokens per frame), the same limits for the reference's rows"]
    lines.append("")
    for dtype in DTYPES:
        runs = [r for r in report["runs"] if r["dtype"] == dtype]
        if not runs:
            continue
        answers = [a for r in runs for c in r["cases"] for a in c["answers"]]
        same = sum(a["match"] for a in answers)
        if dtype == "float32":
            verdict = ("every answer identical" if same == len(answers)
                       else f"**{len(answers) - same} answers differ**")
            lines += [f"## float32: token match ({same}/{len(answers)} answers identical: {verdict})", ""]
        else:
            lines += [f"## bfloat16: {same}/{len(answers)} answers identical ({100 * same / max(len(answers), 1):.0f}%)",
                      "", "Server and reference both run in bf16 but not the same kernels in the same order (paged "
                      "attention over KV blocks, a batch's rows packed together, the vision tower over the step's "
                      "images), and bf16 keeps 8 bits of mantissa: where two logits are closer than its rounding, "
                      "greedy picks split and the answers go separate ways from there. A divergence here is a "
                      "measurement, not a failure; the float32 table is the correctness check."
                      + (" The tiny models' random weights make no claim about a real checkpoint's margins."
                         if tiny else ""), ""]
        lines += ["| model | family | case | answers identical | tokens compared | first divergence | notes |",
                  "|---|---|---|---|---|---|---|"]
        for r in runs:
            for c in r["cases"]:
                lines.append(f"| {r['model']} | {r['family']} | {c['case']} | {c['identical']}/{c['requests']} | "
                             f"{c['tokens_compared']} | {_div(c)} | {_notes(c)} |")
        lines.append("")
    lines += [
        "## Regenerate", "",
        "```bash",
        "source scripts/env.sh",
        "python scripts/fidelity.py --dtype float32,bfloat16         # this page and its JSON (tiny models)",
        "python scripts/fidelity.py --model /models/Qwen2.5-VL-3B-Instruct --doc /tmp/FIDELITY.md "
        "--json /tmp/fidelity.json",
        "```", "",
        "Options: `--families`, `--cases`, `--max-tokens`, `--batch`, `--set MODEL.KEY=VALUE` (any "
        "config.pbtxt parameter, as `tritonvl serve --set`, e.g. `llm.attention_backend=triton`), `--device`. "
        "The exit status is 1 when a float32 answer differs. tests/server/test_fidelity.py regenerates a "
        "subset (to a temporary path) in CI.", "",
    ]
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------

def _list(values: list[str] | None, allowed: tuple, what: str) -> list[str]:
    out = [x for v in values or [] for x in v.split(",") if x]
    if out == ["all"]:
        return list(allowed)
    if out == ["none"]:
        return []
    bad = [x for x in out if x not in allowed]
    if bad:
        raise SystemExit(f"fidelity.py: unknown {what} {', '.join(bad)}: expected {', '.join(allowed)} or all")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--families", action="append",
                    help=f"tiny models to run (comma list of {', '.join(FAMILIES)}, all, none); "
                    "default: all, none when --model is given")
    ap.add_argument("--model", action="append", default=[], metavar="DIR", help="a model directory (repeatable)")
    ap.add_argument("--cases", action="append", help=f"comma list of {', '.join(CASES)}; default: all")
    ap.add_argument("--dtype", action="append", help="float32 and/or bfloat16 (comma list); default: float32")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8, help="requests of the concurrent case")
    ap.add_argument("--set", action="append", default=[], dest="set_values", metavar="MODEL.KEY=VALUE",
                    help="a config.pbtxt value for every server (as tritonvl serve --set)")
    ap.add_argument("--device", default="", help="cpu, cuda, npu (server and reference); default: cpu")
    ap.add_argument("--doc", default=str(DOC), help="the markdown report (default docs/FIDELITY.md)")
    ap.add_argument("--json", default=str(JSON_OUT), help="the raw JSON (default docs/fidelity/fidelity.json)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite --doc from a report's JSON (no run)")
    args = ap.parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
        report["json_name"] = os.path.relpath(args.render, Path(args.doc).parent)
        Path(args.doc).write_text(markdown(report))
        return 0

    from tritonvl.handlers.tools.repository import parse_sets

    args.sets = parse_sets(args.set_values)
    families = _list(args.families or (["none"] if args.model else ["all"]), FAMILIES, "family")
    case_names = _list(args.cases or ["all"], CASES, "case")
    aliases = {"fp32": "float32", "bf16": "bfloat16"}
    dtypes = _list([",".join(aliases.get(d, d) for d in v.split(",")) for v in args.dtype or ["float32"]],
                   DTYPES, "dtype")
    if not (families or args.model) or not case_names or not dtypes:
        raise SystemExit("fidelity.py: nothing to run")
    cases = build_cases(case_names, args.batch)
    start, t0 = datetime.datetime.now(datetime.timezone.utc), time.monotonic()
    info = versions()
    report = {
        "date": start.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python scripts/fidelity.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "machine": {"cpu": cpu_model(), "platform": f"{platform.system()} {platform.machine()}", "load": load(),
                    "device": args.device or "cpu"},
        "versions": info, "max_tokens": args.max_tokens, "batch": args.batch, "cases": case_names,
        "json_name": os.path.relpath(args.json, Path(args.doc).parent), "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="tritonvl-fidelity-") as work:
        args.workdir = work
        models = []
        if families:
            from tritonvl.handlers.tiny_model import PRESETS, build_tiny_model

            for fam in families:
                preset = None if fam == "qwen2_5_vl" else PRESETS[fam]  # the embedded default is Qwen2.5-VL
                models.append((f"tiny-{fam}", str(build_tiny_model(Path(work) / fam, preset))))
        models += [(Path(d).resolve().name, str(Path(d).resolve())) for d in args.model]
        for label, model_dir in models:
            for dtype in dtypes:
                print(f"fidelity: {label} in {dtype}", flush=True)
                report["runs"].append(run_model(label, model_dir, dtype, cases, args, info))
    report["seconds"] = round(time.monotonic() - t0, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(compact_json(report))
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text(markdown(report))
    bad = [f"{r['model']} {c['case']}" for r in report["runs"] if r["dtype"] == "float32"
           for c in r["cases"] if not c["match"]]
    print(f"fidelity: wrote {args.doc} and {args.json} in {report['seconds']} s"
          + (f"; float32 answers differ: {', '.join(bad)}" if bad else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
