"""The official openai SDK (sync and async, stream and not, images, multi-turn), a vLLM-Ascend-style
body and the /describe-image/ upload, through a real gateway in front of a real tritonserver:
greedy text equals transformers' generate()."""

from __future__ import annotations

import asyncio

import openai
import pytest
import requests
from conftest import text_of
from helpers import data_uri, make_image

from tritonvl.handlers.gateway.process import GatewayProcess
from tritonvl.handlers.tools.launcher import free_port

MAX = 12
IMG = make_image(160, 120, seed=21)
IMG2 = make_image(96, 140, seed=22, fmt="JPEG")


@pytest.fixture(scope="module")
def gateway(server, model_dir, tmp_path_factory):
    """This module's gateway before the session's tritonserver (tests/conftest.py: the test model, default
    settings); the served name is the model path as given (vLLM's default)."""
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    with GatewayProcess(server.grpc_url, free_port(), model=str(model_dir), log_path=str(log)) as gw:
        yield gw
        assert gw.proc.poll() is None, "the gateway died during the tests"


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)


def image_turn(text: str, img: bytes = IMG, text_first: bool = False) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(img)}}, {"type": "text", "text": text}]
    return {"role": "user", "content": parts[::-1] if text_first else parts}


MULTI_TURN = [
    {"role": "system", "content": "You are a terse assistant."},
    image_turn("What is this?"),
    {"role": "assistant", "content": "A picture of noise."},
    {"role": "user", "content": "Are you sure?"},
]


def expected(ref, messages: list[dict], images: list[bytes], **gen) -> tuple[str, int]:
    ids = ref.generate(messages=messages, images=images, max_tokens=MAX, **gen)
    return text_of(ref, ids), len(ids)


def test_models_and_health(gateway, model_dir):
    assert requests.get(f"{gateway.url}/health", timeout=10).json() == {"status": "ok"}
    models = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x").models.list()
    assert [m.id for m in models.data] == [str(model_dir)]


def test_sync_image(client, ref, model_dir):
    messages = [image_turn("Describe the picture.")]
    out = client.chat.completions.create(model=str(model_dir), messages=messages, max_tokens=MAX, temperature=0)
    want, n = expected(ref, messages, [IMG])
    assert out.choices[0].message.content == want
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == n
    assert out.usage.prompt_tokens == ref.inputs(messages=messages, images=[IMG])["input_ids"].shape[1]


def test_sync_stream_multi_turn(client, ref, model_dir):
    chunks = list(client.chat.completions.create(model=str(model_dir), messages=MULTI_TURN, max_completion_tokens=MAX,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    want, n = expected(ref, MULTI_TURN, [IMG])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n


def test_async_stream_and_not_concurrently(gateway, ref, model_dir):
    two_images = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(IMG2, "image/jpeg")}},
        {"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": data_uri(IMG)}}]}]

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0) as aclient:
            whole = aclient.chat.completions.create(model=str(model_dir), messages=MULTI_TURN, max_tokens=MAX,
                                                    temperature=0)

            async def streamed():
                stream = await aclient.chat.completions.create(model=str(model_dir), messages=two_images,
                                                               max_tokens=MAX, temperature=0, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream])

            return await asyncio.gather(whole, streamed())

    whole, streamed = asyncio.run(main())
    assert whole.choices[0].message.content == expected(ref, MULTI_TURN, [IMG])[0]
    assert streamed == expected(ref, two_images, [IMG2, IMG])[0]


def test_completions_raw_prompt_equals_chat(client, ref, model_dir):
    """/v1/completions sends the prompt as is: the templated prompt written by hand gives the chat answer."""
    messages = [{"role": "user", "content": "Tell me about lighthouses."}]
    prompt = ref.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = client.completions.create(model=str(model_dir), prompt=prompt, max_tokens=MAX, temperature=0)
    assert out.choices[0].text == expected(ref, messages, [])[0]
    assert out.usage.prompt_tokens == ref.inputs(messages=messages)["input_ids"].shape[1]
    streamed = client.completions.create(model=str(model_dir), prompt=prompt, max_tokens=MAX, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_vllm_ascend_style_body(gateway, ref, model_dir):
    """The body of vLLM-Ascend's online_serving.py: text part first, then the image; vLLM's extras."""
    messages = [image_turn("What is the text in the illustrate?", text_first=True)]
    body = {"model": str(model_dir), "messages": messages, "max_tokens": MAX, "temperature": 0, "top_p": 1.0,
            "top_k": -1, "stop_token_ids": None, "ignore_eos": False, "repetition_penalty": 1.05}
    r = requests.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    want, n = expected(ref, messages, [IMG], repetition_penalty=1.05)
    assert r.json()["choices"][0]["message"]["content"] == want
    assert r.json()["usage"]["completion_tokens"] == n


def test_describe_image_upload(gateway, ref, model_dir):
    r = requests.post(f"{gateway.url}/describe-image/", files={"file": ("photo.png", IMG, "image/png")},
                      data={"prompt": "What is in this image?", "max_tokens": str(MAX)}, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    ids = ref.generate("What is in this image?", [IMG], max_tokens=MAX)
    assert out["description"] == text_of(ref, ids)
    assert out["inference_time"] > 0 and out["model"] == str(model_dir)
    assert out["usage"]["completion_tokens"] == len(ids)


def test_gateway_metrics_count_requests(gateway):
    from conftest import gateway_metrics

    m = gateway_metrics(gateway.url)
    assert m['tritonvl_gateway_requests_total{endpoint="chat",status="200"}'] >= 4
    assert m['tritonvl_gateway_request_duration_seconds_count{endpoint="describe"}'] >= 1
    assert m["tritonvl_gateway_requests_in_flight"] == 0
    assert m["tritonvl_gateway_completion_tokens_total"] >= 4 * MAX


CAPTION = {"type": "object", "properties": {
    "caption": {"type": "string", "maxLength": 20},
    "scene": {"type": "string", "enum": ["indoor", "outdoor"]},
    "objects": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
    "required": ["caption", "scene", "objects"]}


def test_response_format_and_structured_outputs(client, model_dir):
    """The SGLang captioning example through the SDK: json_schema, json_object and vLLM's extra field."""
    import json

    jsonschema = pytest.importorskip("jsonschema")
    messages = [image_turn("Caption the image as JSON.")]
    rf = {"type": "json_schema", "json_schema": {"name": "caption", "schema": CAPTION}}
    for temperature in (0, 1):
        out = client.chat.completions.create(model=str(model_dir), messages=messages, max_tokens=300,
                                             temperature=temperature, seed=3, response_format=rf)
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), CAPTION)
    stream = client.chat.completions.create(model=str(model_dir), messages=messages, max_tokens=300, stream=True,
                                            response_format={"type": "json_object"}, temperature=0)
    chunks = [c.choices[0] for c in stream if c.choices]
    if chunks[-1].finish_reason == "stop":
        assert isinstance(json.loads("".join(c.delta.content or "" for c in chunks)), dict)
    out = client.chat.completions.create(model=str(model_dir), messages=messages, max_tokens=20,
                                         extra_body={"structured_outputs": {"choice": ["cat", "dog"]}})
    assert out.choices[0].message.content in ("cat", "dog") and out.choices[0].finish_reason == "stop"
    done = client.completions.create(model=str(model_dir), prompt="Date:", max_tokens=20,
                                     extra_body={"structured_outputs": {"regex": r"\d{4}-\d{2}"}})
    assert done.choices[0].finish_reason == "stop" and len(done.choices[0].text) == 7


def test_logprobs_chat_whole_and_streamed(client):
    """OpenAI's logprobs: greedy, so the chosen token is the first alternative; the stream carries the same."""
    ask = {"model": client.models.list().data[0].id, "messages": [image_turn("What is this?")], "max_tokens": 5,
           "temperature": 0, "logprobs": True, "top_logprobs": 3}
    whole = client.chat.completions.create(**ask)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == entry.top_logprobs[0].logprob <= 0 and entry.bytes == list(entry.token.encode())
    streamed = [e for c in client.chat.completions.create(**ask, stream=True) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, content))
    plain = client.chat.completions.create(**{**ask, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_logprobs_completions(client):
    out = client.completions.create(model=client.models.list().data[0].id, prompt="Once upon a time", max_tokens=4,
                                    temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert all(len(alts) <= 2 and max(alts.values()) == v for alts, v in zip(lp.top_logprobs, lp.token_logprobs))
