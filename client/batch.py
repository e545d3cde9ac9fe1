"""`tritonvl batch`: caption every image and video under a folder into a JSONL file, resumably."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from .aio import AsyncClient
from .commands import client_options, connection, prompt_for, sampling
from .errors import ModelNotReady, ServerUnavailable, TritonVLError
from .images import find_images
from .progress import Progress
from .videos import find_videos, is_video_path


def read_done(out: Path) -> dict[str, bool]:
    """Paths already in ``out`` -> whether their last record is an error. Unreadable lines are ignored
    (a run killed mid-write leaves at most one)."""
    done: dict[str, bool] = {}
    if not out.is_file():
        return done
    with out.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("path"), str):
                done[record["path"]] = "error" in record
    return done


def plan(folder: Path, out: Path, retry_errors: bool) -> tuple[list[tuple[str, Path]], int]:
    """(key, path) pairs still to caption, keys relative to ``folder``; and how many are skipped."""
    done = read_done(out)
    todo, skipped = [], 0
    for path in sorted(find_images(folder) + find_videos(folder)):
        key = path.relative_to(folder).as_posix()
        if key in done and not (retry_errors and done[key]):
            skipped += 1
        else:
            todo.append((key, path))
    return todo, skipped


async def caption_all(args: argparse.Namespace, todo: list[tuple[str, Path]], out: Path,
                      progress: Progress | None) -> tuple[int, int]:
    """Run the captions with ``args.concurrency`` requests in flight; append each record as it ends."""
    url, protocol = connection(args)
    queue: asyncio.Queue = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    ok = failed = 0
    params = sampling(args)
    _end_with_newline(out)
    async with AsyncClient(url, protocol, model=args.model, timeout=args.timeout, **client_options(args)) as client:
        await client.check_ready()
        with out.open("a", encoding="utf-8") as sink:

            async def worker() -> None:
                nonlocal ok, failed
                while not queue.empty():
                    key, path = queue.get_nowait()
                    try:
                        kind = "video" if is_video_path(path) else "image"
                        media = {"videos": [path]} if kind == "video" else {"images": [path]}
                        result = await client.generate(prompt_for(args, kind), **media, **params)
                        record = {"path": key, "text": result.text, "finish_reason": result.finish_reason,
                                  "usage": result.to_dict()["usage"], "latency": round(result.latency, 4)}
                        ok += 1
                    except (ServerUnavailable, ModelNotReady):
                        raise
                    except TritonVLError as exc:
                        record = {"path": key, "error": str(exc)}
                        failed += 1
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    sink.flush()
                    if progress:
                        progress.update(error="error" in record)

            workers = [asyncio.create_task(worker()) for _ in range(max(1, args.concurrency))]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
    return ok, failed


def _end_with_newline(out: Path) -> None:
    """A run killed mid-line leaves a partial last line: start the next record on a line of its own."""
    if out.is_file() and out.stat().st_size:
        with out.open("rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


def batch(args: argparse.Namespace) -> int:
    folder, out = Path(args.dir), Path(args.out)
    if not folder.is_dir():
        raise TritonVLError(f"{folder}: not a directory")
    sampling(args)  # bad values fail here, before any work
    if args.concurrency < 1:
        raise TritonVLError(f"--concurrency {args.concurrency}: must be at least 1")
    todo, skipped = plan(folder, out, args.retry_errors)
    start = time.monotonic()
    progress = Progress(len(todo), label="batch ") if todo and not args.quiet else None
    try:
        ok, failed = asyncio.run(caption_all(args, todo, out, progress)) if todo else (0, 0)
    finally:
        if progress:
            progress.close()
    print(f"batch: {ok} captioned, {failed} failed, {skipped} already in {out} "
          f"({time.monotonic() - start:.1f} s)", file=sys.stderr)
    return 0
