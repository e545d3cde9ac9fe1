"""Incremental detokenization and stop handling with Qwen's real tokenizer."""

import pytest

from tritonvl.handlers.engine.sequence import stop_ids_for, token_ending
from tritonvl.handlers.engine.textstream import IncrementalDetokenizer, OutputStream
from tritonvl.handlers.sampling import SamplingParams
from tritonvl.handlers.tiny_model import tokenizer_source_dir


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_source_dir()))


TEXTS = ["Hello, world!", "你好，世界。这是一个测试", "emoji 🎉🚀 and 😀 mixed", "naïve café déjà vu"]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_the_full_text_and_never_split_a_character(tok, text):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_multibyte_tokens_are_held_until_complete(tok):
    # an emoji is several byte-level tokens: the first pieces release nothing
    char = next(c for c in "🦩𝔘龘🫠🧬" if len(tok.encode(c)) > 1)
    ids = tok.encode(char)
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(t) for t in ids][:-1] == [""] * (len(ids) - 1)


class Stream(OutputStream):
    """An OutputStream fed as the engine feeds it: each token with its token_ending verdict."""

    def __init__(self, tok, params, eos_ids=(151645,)):
        super().__init__(tok, params)
        self.stop_ids = stop_ids_for(params.stop_token_ids, params.ignore_eos, eos_ids)

    def add(self, token):
        p = self.params
        return super().add(token, token_ending(token, len(self.ids) + 1, self.stop_ids, p.min_tokens, p.max_tokens))


def run(tok, text, **params):
    stream = Stream(tok, SamplingParams(**{"max_tokens": 1000, **params}))
    out = []
    for t in tok.encode(text):
        out.append(stream.add(t))
        if stream.finished:
            break
    return "".join(out), stream


def test_stop_string_is_cut_and_not_leaked(tok):
    text, stream = run(tok, "The answer is 42. STOP here and more", stop=["STOP"])
    assert text == "The answer is 42. " and stream.finish_reason == "stop"


def test_include_stop_string(tok):
    text, _ = run(tok, "abc END def", stop=["END"], include_stop_str_in_output=True)
    assert text == "abc END"


def test_eos_stops_without_text_and_ignore_eos(tok):
    ids = tok.encode("hi") + [151645] + tok.encode(" more")
    s = Stream(tok, SamplingParams(max_tokens=50))
    text = "".join(s.add(t) for t in ids[: len(tok.encode("hi")) + 1])
    assert s.finish_reason == "stop" and text == "hi"
    s = Stream(tok, SamplingParams(max_tokens=50, ignore_eos=True))
    for t in ids:
        s.add(t)
    assert not s.finished


def test_max_tokens_is_length(tok):
    _, stream = run(tok, "one two three four five six", max_tokens=3)
    assert stream.finish_reason == "length" and len(stream.ids) == 3


def test_min_tokens_delays_stops(tok):
    ids = [151645] + tok.encode("x")
    s = Stream(tok, SamplingParams(max_tokens=10, min_tokens=1))
    s.add(ids[0])
    assert not s.finished


@pytest.mark.parametrize("end", ["length", "eos", "stop_token_ids"])
def test_a_partial_last_character_is_emitted_as_a_full_decode_gives_it(tok, end):
    """A generation that ends inside a multi-byte character (issue 19): the streamed text equals
    a full decode of the ids ("好的 \ufffd"), it does not lose the character and the space before it."""
    ids = tok.encode("好的 🦩")[:-1]  # the flamingo's last byte never comes
    full = tok.decode(ids)
    assert full.endswith(" \ufffd")
    if end == "length":
        s, feed = Stream(tok, SamplingParams(max_tokens=len(ids))), ids
    elif end == "eos":
        s, feed = Stream(tok, SamplingParams(max_tokens=50)), ids + [151645]
    else:
        s, feed = Stream(tok, SamplingParams(max_tokens=50, stop_token_ids=[13])), ids + [13]
    text = "".join(s.add(t) for t in feed)
    assert s.finished and s.finish_reason == ("length" if end == "length" else "stop")
    assert text == full

