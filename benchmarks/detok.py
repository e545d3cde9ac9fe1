"""Incremental detokenising: our two-decode window vs tokenizers' DecodeStream on Qwen's tokenizer.

Checks that both give the same deltas on the test texts and on random token streams (special and
out-of-vocabulary ids included, skip_special_tokens on and off), then prints microseconds per token.

    python benchmarks/detok.py [--tokens 20000]
"""

from __future__ import annotations

import argparse
import random
import time

from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer

from tritonvl.handlers.tiny_model import tokenizer_source_dir

TEXTS = ["Hello, world!", "你好，世界。这是一个测试", "emoji 🎉🚀 and 😀 mixed", "naïve café déjà vu",
         "好的 🦩 and 龘 <|im_end|> tail", "def f(x):\n    return x  # ok\n\n\tdone"]


def two_decodes(tok, ids: list[int], skip: bool) -> list[str]:
    """The windowed detokenizer textstream.py used before DecodeStream (two decode() calls per token)."""
    out, seen, prefix, read = [], [], 0, 0
    for t in ids:
        seen.append(t)
        before = tok.decode(seen[prefix:read], skip_special_tokens=skip)
        after = tok.decode(seen[prefix:], skip_special_tokens=skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            prefix, read = read, len(seen)
            out.append(after[len(before):])
        else:
            out.append("")
    return out


def decode_stream(tok, ids: list[int], skip: bool) -> list[str]:
    stream, backend = DecodeStream(skip_special_tokens=skip), tok.backend_tokenizer
    return [stream.step(backend, t) or "" for t in ids]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20000)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_source_dir()))
    rng = random.Random(0)
    corpora = [tok.encode(t) for t in TEXTS]
    corpora += [[rng.randrange(151936) for _ in range(300)] for _ in range(20)]  # Qwen's padded vocab
    corpora += [[rng.choice([rng.randrange(256), rng.randrange(151600, 151700)]) for _ in range(300)]
                for _ in range(20)]  # byte tokens (split characters) and special tokens
    differ = 0
    for skip in (True, False):
        for ids in corpora:
            a, b = two_decodes(tok, ids, skip), decode_stream(tok, ids, skip)
            if a != b:
                differ += 1
                i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                print(f"differ (skip={skip}) at token {i} id {ids[i]}: {a[i]!r} vs {b[i]!r}")
    print(f"{len(corpora) * 2} streams compared, {differ} differ")
    text = " ".join(TEXTS) * 2000
    ids = tok.encode(text)[: args.tokens]
    for name, fn in (("two decode() calls", two_decodes), ("DecodeStream", decode_stream)):
        t0 = time.perf_counter()
        fn(tok, ids, True)
        print(f"{name}: {1e6 * (time.perf_counter() - t0) / len(ids):.2f} us/token over {len(ids)} tokens")


if __name__ == "__main__":
    main()
