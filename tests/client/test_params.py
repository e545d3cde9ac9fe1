"""SamplingParams: the server's ranges, checked before sending; and how they are encoded."""

from __future__ import annotations

import json

import pytest

from tritonvl.client.errors import InvalidRequest
from tritonvl.client.params import SamplingParams

BAD = [
    ({"max_tokens": 0}, "max_tokens=0: must be at least 1"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens=5: must be between 0 and max_tokens (4)"),
    ({"min_tokens": -1}, "min_tokens=-1"),
    ({"temperature": -0.1}, "temperature=-0.1: must be >= 0"),
    ({"temperature": float("nan")}, "temperature=nan: must be a finite number"),
    ({"top_p": 0}, "top_p=0.0: must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p=1.5: must be in (0, 1]"),
    ({"top_k": -2}, "top_k=-2"),
    ({"min_p": 2}, "min_p=2.0: must be in [0, 1]"),
    ({"repetition_penalty": 0}, "repetition_penalty=0.0: must be > 0"),
    ({"presence_penalty": 3}, "presence_penalty=3.0: must be in [-2, 2]"),
    ({"frequency_penalty": -2.5}, "frequency_penalty=-2.5: must be in [-2, 2]"),
    ({"seed": -1}, "seed=-1: must be in [0, 2**64)"),
    ({"seed": 2**64}, "seed="),
    ({"stop": ["ok", ""]}, "stop: empty strings are not allowed"),
    ({"stop_token_ids": [-3]}, "stop_token_ids: -3 is not a token id"),
    ({"stop_token_ids": ["1"]}, "stop_token_ids: expected a list of integers"),
    ({"max_tokens": 1.5}, "max_tokens: expected an integer, got 1.5"),
    ({"max_tokens": True}, "max_tokens: expected an integer, got True"),
    ({"temperature": "hot"}, "temperature: expected a number, got 'hot'"),
    ({"ignore_eos": 1}, "ignore_eos: expected a boolean, got 1"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_values_fail_before_sending(kwargs, message):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams.from_kwargs(**kwargs)
    assert message in str(err.value)


def test_unknown_name_is_a_type_error():
    with pytest.raises(TypeError, match="unknown sampling parameter.*max_token"):
        SamplingParams.from_kwargs(max_token=3)


def test_good_values_and_defaults():
    p = SamplingParams.from_kwargs(max_tokens=8, temperature=1, top_k=-1, seed=2**64 - 1, stop="END")
    assert p.temperature == 1.0 and isinstance(p.temperature, float)
    assert p.stop == ["END"]
    assert SamplingParams().tensors() == {}  # nothing set: the server's defaults apply


def test_base_params_are_overridden_not_mutated():
    base = SamplingParams.from_kwargs(max_tokens=8, stop=["a"])
    p = SamplingParams.from_kwargs(base, max_tokens=4)
    assert (p.max_tokens, p.stop, base.max_tokens) == (4, ["a"], 8)


def test_tensors():
    p = SamplingParams.from_kwargs(max_tokens=8, temperature=0.5, seed=3, stop=["x", "y"], stop_token_ids=[7],
                                   ignore_eos=True, min_p=0.1, include_stop_str_in_output=True)
    t = p.tensors()
    assert t["max_tokens"] == (8, "INT32")
    assert t["temperature"] == (0.5, "FP32")
    assert t["seed"] == (3, "UINT64")
    assert t["ignore_eos"] == (True, "BOOL")
    assert t["stop_words"] == (["x", "y"], "BYTES")
    assert t["stop_token_ids"] == ([7], "INT32")
    assert json.loads(t["sampling_parameters"][0]) == {"min_p": 0.1, "include_stop_str_in_output": True}
    assert "top_p" not in t
