import json

import pytest

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.handlers.sampling import build_sampling_params


@pytest.mark.parametrize("explicit,json_text,field", [
    ({"temperature": -0.1}, None, "temperature"),
    ({"top_p": 0.0}, None, "top_p"),
    ({"top_p": 1.01}, None, "top_p"),
    ({"top_k": -2}, None, "top_k"),
    ({"max_tokens": 0}, None, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, None, "min_tokens"),
    ({"repetition_penalty": 0.0}, None, "repetition_penalty"),
    ({"presence_penalty": 2.5}, None, "presence_penalty"),
    ({"frequency_penalty": -3.0}, None, "frequency_penalty"),
    ({"temperature": float("nan")}, None, "temperature"),
    ({"stop_token_ids": [200000]}, None, "stop_token_ids"),
    ({}, '{"temprature": 0.5}', "unknown"),
    ({}, "{not json", "sampling_parameters"),
    ({}, '{"max_tokens": "ten"}', "max_tokens"),
    ({}, '{"n": 2}', "n"),
    ({}, '{"min_p": 1.5}', "min_p"),
])
def test_rejected_with_the_field_named(explicit, json_text, field):
    with pytest.raises(InvalidArgument, match=field):
        build_sampling_params(explicit, json_text)


def test_explicit_tensors_win_over_json_and_defaults():
    p = build_sampling_params({"temperature": 0.5, "max_tokens": None},
                              json.dumps({"temperature": 0.9, "top_k": 5, "stop": "END", "max_tokens": 7}),
                              defaults={"max_tokens": 256, "top_p": 0.8})
    assert (p.temperature, p.top_k, p.stop, p.max_tokens, p.top_p) == (0.5, 5, ["END"], 7, 0.8)


def test_top_k_minus_one_is_off():
    assert build_sampling_params({"top_k": -1}, None).top_k == 0
