"""StopStringMatcher and OutputParser, table-driven: text arrives in chunks, stops may straddle them."""

from __future__ import annotations

import pytest

from tritonvl.client.params import SamplingParams
from tritonvl.client.parsing import OutputParser, StopRules
from tritonvl.client.rules.stops import StopStringMatcher


def run(matcher: StopStringMatcher, chunks: list[str]) -> tuple[list[str], str]:
    """Released pieces per chunk (the flush appended as a last piece) and their concatenation."""
    pieces = [matcher.feed(c) for c in chunks] + [matcher.flush()]
    return pieces, "".join(pieces)


MATCHER_CASES = [
    # id, stops, include_stop, chunks, expected text, expected stop
    ("no stops", [], False, ["ab", "cd"], "abcd", None),
    ("no hit", ["XYZ"], False, ["abc", "def"], "abcdef", None),
    ("whole in one chunk", ["END"], False, ["abcENDdef"], "abc", "END"),
    ("split over two", ["END"], False, ["abcE", "NDdef"], "abc", "END"),
    ("split over three", ["<|im_end|>"], False, ["hi <|im", "_e", "nd|> more"], "hi ", "<|im_end|>"),
    ("one char per chunk", ["stop"], False, list("a stop b"), "a ", "stop"),
    ("prefix that never completes", ["END"], False, ["abcEN", "x"], "abcENx", None),
    ("held prefix flushed at the end", ["END"], False, ["abcEN"], "abcEN", None),
    ("earliest wins", ["bb", "aa"], False, ["xaabb"], "x", "aa"),
    ("overlap: longer at same start", ["ab", "abc"], False, ["xabcd"], "x", "abc"),
    ("overlap: first completed wins", ["abcX", "bc"], False, ["ab", "c", "X"], "a", "bc"),
    ("overlap: self-overlapping stop", ["aab"], False, ["a", "a", "a", "b", "z"], "a", "aab"),
    ("multibyte", ["。"], False, ["你好", "。再见"], "你好", "。"),
    ("multibyte split stop", ["停止"], False, ["好的停", "止了"], "好的", "停止"),
    ("emoji stop", ["🛑"], False, ["go 🚦", "🛑 no"], "go 🚦", "🛑"),
    ("include stop", ["END"], True, ["abcE", "NDdef"], "abcEND", "END"),
    ("include stop split over three", ["<|im_end|>"], True, ["x<|", "im_end", "|>y"], "x<|im_end|>", "<|im_end|>"),
    ("stop at the very start", ["A"], False, ["Abc"], "", "A"),
    ("empty chunks", ["END"], False, ["", "ab", "", "END"], "ab", "END"),
]


@pytest.mark.parametrize("stops,include,chunks,text,stop", [c[1:] for c in MATCHER_CASES],
                         ids=[c[0] for c in MATCHER_CASES])
def test_matcher(stops, include, chunks, text, stop):
    m = StopStringMatcher(stops, include_stop=include)
    _, out = run(m, chunks)
    assert out == text
    assert m.stopped == stop


@pytest.mark.parametrize("stops,include,chunks,text,stop", [c[1:] for c in MATCHER_CASES],
                         ids=[c[0] for c in MATCHER_CASES])
def test_matcher_never_shows_part_of_a_stop(stops, include, chunks, text, stop):
    """Text once released is never taken back: every prefix shown is a prefix of the final text."""
    m = StopStringMatcher(stops, include_stop=include)
    shown = ""
    for c in chunks:
        shown += m.feed(c)
        assert shown == text[: len(shown)]


def test_after_stop_everything_is_dropped():
    m = StopStringMatcher(["END"])
    assert m.feed("aEND") == "a"
    assert m.feed("more") == ""
    assert m.flush() == ""


STRIP_CASES = [
    ("strip whole", ["<|im_end|>"], ["<|vision_start|>"], ["a<|vision_start|>b"], "ab", None),
    ("strip split", [], ["<|vision_start|>"], ["a<|vision", "_start|>b"], "ab", None),
    ("strip then stop", ["<|im_end|>"], ["<|x|>"], ["<|x|>hi<|im", "_end|>tail"], "hi", "<|im_end|>"),
    ("strip twice", [], ["<p>"], ["<p>a<p>", "b<p"], "ab<p", None),
]


@pytest.mark.parametrize("stops,strip,chunks,text,stop", [c[1:] for c in STRIP_CASES],
                         ids=[c[0] for c in STRIP_CASES])
def test_strip(stops, strip, chunks, text, stop):
    m = StopStringMatcher(stops, strip=strip)
    assert run(m, chunks)[1] == text
    assert m.stopped == stop


# --- OutputParser: the client's safety net --------------------------------------------------------
INTERNVL = StopRules(eos_token_ids=(0, 92543, 92542), end_markers=("<|im_end|>", "</s>"))

PARSER_CASES = [
    # id, params, rules, [(text, ids)], text, ids, stop, finish_reason(server said "length")
    ("clean", {}, StopRules(), [("a", [1]), ("b", [2])], "ab", [1, 2], None, "length"),
    ("im_end leaks", {}, StopRules(), [("hi", [1]), ("<|im_end|>", [151645]), ("junk", [3])],
     "hi", [1, 151645], 151645, "stop"),
    ("im_end text only (no ids)", {}, StopRules(), [("hi<|im_", []), ("end|>junk", [])], "hi", [], "<|im_end|>",
     "stop"),
    ("include stop, marker without its id", {"include_stop_str_in_output": True}, StopRules(),
     [("x<|im_end|>", [])], "x", [], "<|im_end|>", "stop"),
    ("eos id at the very end, text skipped", {}, StopRules(), [("a", [5]), ("", [151643])], "a", [5, 151643],
     151643, "stop"),
    ("stop word across chunks", {"stop": ["STOP"]}, StopRules(), [("xS", [1]), ("TO", [2]), ("Py", [3])],
     "x", [1, 2, 3], "STOP", "stop"),
    ("include stop word", {"stop": ["STOP"], "include_stop_str_in_output": True}, StopRules(),
     [("xST", [1]), ("OPy", [2])], "xSTOP", [1, 2], "STOP", "stop"),
    ("include stop never shows end markers", {"include_stop_str_in_output": True}, StopRules(),
     [("x", [1]), ("<|im_end|>", [151645])], "x", [1, 151645], 151645, "stop"),
    ("user stop id", {"stop_token_ids": [7]}, StopRules(), [("a", [1]), ("b", [7]), ("c", [8])], "ab", [1, 7], 7,
     "stop"),
    ("ignore_eos keeps going", {"ignore_eos": True}, StopRules(eos_token_ids=(9,), end_markers=()),
     [("a", [9]), ("b", [2])], "ab", [9, 2], None, "length"),
    ("InternVL ids", {}, INTERNVL, [("x", [11]), ("", [92542]), ("y", [12])], "x", [11, 92542], 92542, "stop"),
    ("InternVL eos 0 at the very end", {}, INTERNVL, [("x", [11]), ("</s>", [0])], "x", [11, 0], 0, "stop"),
    ("special tokens stripped", {}, StopRules(), [("<|vision_start|>a", [1]), ("<|image_pad|>b", [2])], "ab",
     [1, 2], None, "length"),
    ("stop id in a multi-token response", {}, StopRules(), [("ab<|im_end|>zz", [1, 2, 151645, 4])], "ab",
     [1, 2, 151645], 151645, "stop"),
    ("min_tokens: stops ignored before", {"stop": ["S"], "min_tokens": 2, "stop_token_ids": [7]}, StopRules(),
     [("S", [7]), ("a", [1]), ("S", [2])], "Sa", [7, 1, 2], "S", "stop"),
    ("multibyte", {"stop": ["。"]}, StopRules(), [("你", [1]), ("好。", [2]), ("再", [3])], "你好", [1, 2], "。", "stop"),
]


@pytest.mark.parametrize("params,rules,responses,text,ids,stop,reason", [c[1:] for c in PARSER_CASES],
                         ids=[c[0] for c in PARSER_CASES])
def test_output_parser(params, rules, responses, text, ids, stop, reason):
    p = OutputParser(SamplingParams.from_kwargs(**params), rules)
    out = "".join(p.feed(t, i) for t, i in responses) + p.flush()
    assert out == text
    assert p.ids == ids
    assert p.stop == stop
    assert p.finish_reason("length") == reason
