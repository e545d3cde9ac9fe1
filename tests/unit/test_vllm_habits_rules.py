"""Pure rules of issue 15: vLLM's string numbers in sampling_parameters and the pixel-budget merge."""

from __future__ import annotations

import re

import pytest

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.client.rules.sampling import from_string
from tritonvl.handlers.preprocess.pixels import PixelBudget, budget_for, parse_kwargs
from tritonvl.handlers.sampling import build_sampling_params


@pytest.mark.parametrize("name,text,value", [
    ("temperature", "0.1", 0.1), ("top_p", " 0.95 ", 0.95), ("max_tokens", "100", 100), ("top_k", "-1", -1),
    ("min_tokens", "2.0", 2), ("ignore_eos", "false", False), ("ignore_eos", "True", True),
    ("skip_special_tokens", "0", False), ("n", "1", 1)])
def test_vllm_backend_strings_convert(name, text, value):
    got = from_string(name, text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("json_text,words", [
    ('{"temperature": "hot"}', "expected a number, got 'hot'"), ('{"max_tokens": "2.5"}', "expected an integer"),
    ('{"ignore_eos": "yes"}', "expected a boolean, got 'yes'"),
    ('{"seed": "3"}', "expected an integer"),  # vllm_backend does not convert seed either
    ('{"temperature": "-1"}', "must be >= 0")])
def test_other_strings_are_refused_naming_the_rule(json_text, words):
    with pytest.raises(InvalidArgument, match=words):
        build_sampling_params({}, json_text)


DEPLOYMENT = PixelBudget(3136, 78400)


def test_request_and_part_lower_the_budget_part_wins():
    assert budget_for(DEPLOYMENT, {}, {}, "image[0]") == DEPLOYMENT
    assert budget_for(DEPLOYMENT, {"max_pixels": 50000}, {}, "image[0]") == PixelBudget(3136, 50000)
    assert budget_for(DEPLOYMENT, {"max_pixels": 50000}, {"max_pixels": 12544}, "p") == PixelBudget(3136, 12544)
    assert budget_for(DEPLOYMENT, {"max_pixels": 2000}, {}, "image[0]") == PixelBudget(2000, 2000)  # min follows


@pytest.mark.parametrize("request_kwargs,part,words", [
    ({"max_pixels": 78401}, {}, "mm_processor_kwargs.max_pixels=78401 is above this deployment's max_pixels"),
    ({}, {"min_pixels": 4000}, "p.min_pixels=4000 is above this deployment's min_pixels (3136)"),
    ({"min_pixels": 3000, "max_pixels": 2000}, {}, "min_pixels=3000 is above max_pixels=2000"),
    ({"max_pixels": "big"}, {}, "expected a positive integer"), ({}, {"max_pixels": 0}, "expected a positive integer"),
    ({}, {"max_pixels": True}, "expected a positive integer")])
def test_raising_or_nonsense_is_refused(request_kwargs, part, words):
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        budget_for(DEPLOYMENT, request_kwargs, part, "p")


def test_mm_processor_kwargs_parsing():
    assert parse_kwargs(None) == {} and parse_kwargs('{"max_pixels": 1}') == {"max_pixels": 1}
    # vLLM's Qwen video snippet: {"fps": 2, "do_sample_frames": true}
    assert parse_kwargs('{"fps": 2, "do_sample_frames": true}') == {"fps": 2}
    for bad, words in (("[1]", "JSON object"), ("{x", "not valid JSON"), ('{"size": 1}', "unknown key"),
                       ('{"do_sample_frames": false}', "do_sample_frames=false: videos are always sampled")):
        with pytest.raises(InvalidArgument, match=words):
            parse_kwargs(bad)
