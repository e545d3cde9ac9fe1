"""Tool calls through the OpenAI gateway with the official openai SDK, stream and not, on a real
tritonserver: the test model with a chat template that supports tools (tools_chat_template.jinja,
Qwen3-VL's format) and, for the refusal, the session's server on the tiny models' own template
(Qwen2.5-VL's, which never reads ``tools``).

- ``required`` and a named function: 30 answers each at temperature 1 whose arguments parse and
  validate against the function's schema (structured outputs constrain them).
- ``auto``: the random tiny model never writes a ``<tool_call>`` of itself, so a ``structured_outputs``
  regex makes it write one (live text from the engine); the gateway parses it into ``tool_calls``.
- A tool result round-trips: the prompt the server counts equals the template's rendering of the
  assistant's call and the tool's result (token for token in number).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import jsonschema
import openai
import pytest

from tritonvl.handlers.gateway.process import GatewayProcess
from tritonvl.handlers.tools.launcher import ServerProcess, free_port

TEMPLATE = Path(__file__).with_name("tools_chat_template.jinja")
PARAMS = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                           "unit": {"type": "string", "enum": ["c", "f"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "unit", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": PARAMS}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time"}}
TOOLS = [WEATHER, CLOCK]
ASK = [{"role": "user", "content": "What will the weather be in Paris?"}]
TRIES = 30
MODEL = "tiny-tools"  # the served name of both gateways


def tools_model(model_dir: Path, dst: Path) -> Path:
    """The test model with a chat template that supports tools (weights linked, not copied)."""
    template = TEMPLATE.read_text(encoding="utf-8")
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir).iterdir():
        if f.name == "tokenizer_config.json":
            cfg = json.loads(f.read_text(encoding="utf-8"))
            (dst / f.name).write_text(json.dumps({**cfg, "chat_template": template}), encoding="utf-8")
        elif f.name == "chat_template.json":
            (dst / f.name).write_text(json.dumps({"chat_template": template}), encoding="utf-8")
        elif f.name != "chat_template.jinja":
            os.symlink(f.resolve(), dst / f.name)
    return dst


def _skip_without_server():
    if shutil.which("tritonserver") is None:
        pytest.importorskip("pytriton", reason="no tritonserver: run scripts/setup.sh")


@pytest.fixture(scope="module")
def tools_dir(model_dir, tmp_path_factory):
    return tools_model(model_dir, tmp_path_factory.mktemp("tools") / "tiny-tools")


@pytest.fixture(scope="module")
def gateway(tools_dir, tmp_path_factory):
    """tritonserver on the tools-template model + gateway."""
    _skip_without_server()
    logs = tmp_path_factory.mktemp("gateway_tools")
    with ServerProcess(str(tools_dir), log_path=str(logs / "tritonserver.log")) as srv:
        with GatewayProcess(srv.grpc_url, free_port(), served_model_names=[MODEL], log_path=str(logs / "gateway.log")) as gw:
            yield gw
            assert gw.proc.poll() is None, "the gateway died during the tests"
        assert srv.proc.poll() is None, "the server died during the tests:\n" + srv.log_tail()


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(tools_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tools_dir))


def streamed_calls(chunks) -> tuple[str, list[dict], str | None]:
    """(content, calls assembled from delta.tool_calls by index, finish_reason) of a stream."""
    content, calls, finish = [], {}, None
    for c in chunks:
        if not c.choices:
            continue
        delta = c.choices[0].delta
        assert not (delta.content and "<tool" in delta.content), delta.content
        content.append(delta.content or "")
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            if d.id:
                assert call["id"] is None, "one id per call"
                call["id"] = d.id
            if d.function and d.function.name:
                call["name"] += d.function.name
            if d.function and d.function.arguments:
                call["arguments"] += d.function.arguments
        finish = c.choices[0].finish_reason or finish
    return "".join(content), [calls[i] for i in sorted(calls)], finish


def check_call(name: str, arguments: str) -> None:
    args = json.loads(arguments)
    if name == "get_weather":
        jsonschema.validate(args, PARAMS)
    else:
        assert name == "now" and args == {}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_calls_always_valid(gateway, choice, stream):
    """30 answers at temperature 1: each one call whose arguments validate against its function's schema."""
    aclient = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    tool_choice = {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else "required"

    async def one(seed: int):
        kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=seed,
                      max_tokens=64, parallel_tool_calls=False)
        if not stream:
            out = await aclient.chat.completions.create(**kwargs)
            msg = out.choices[0].message
            assert out.choices[0].finish_reason == "tool_calls" and msg.content is None, out
            return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls]
        chunks = [c async for c in await aclient.chat.completions.create(stream=True, **kwargs)]
        content, calls, finish = streamed_calls(chunks)
        assert finish == "tool_calls" and content == "", (content, finish)
        return calls

    async def run():
        try:
            return await asyncio.gather(*(one(1000 + i) for i in range(TRIES)))
        finally:
            await aclient.close()

    answers = asyncio.run(run())
    names = set()
    for calls in answers:
        assert len(calls) == 1, calls
        assert calls[0]["id"].startswith("call_")
        check_call(calls[0]["name"], calls[0]["arguments"])
        names.add(calls[0]["name"])
    if choice == "named":
        assert names == {"get_weather"}
    # temperature 1: the answers differ (the constraint, not a fixed text, makes them valid)
    assert len({c[0]["arguments"] for c in answers}) > 1


# The tiny model's words are random: a regex makes it write Qwen's tool-call text, which the gateway must read.
CALL_TEXT = (r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
             r'"unit": "c", "days": [1-7]\}\}\n</tool_call>')


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_auto_parses_the_models_tool_call(client, tok, stream):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0, max_tokens=80,
                  extra_body={"structured_outputs": {"regex": CALL_TEXT}})
    if stream:
        content, calls, finish = streamed_calls(client.chat.completions.create(stream=True, **kwargs))
        assert content == "Checking."
    else:
        out = client.chat.completions.create(**kwargs)
        msg, finish = out.choices[0].message, out.choices[0].finish_reason
        assert msg.content == "Checking."
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls]
        # the tools were rendered by the template: the prompt is the template's, tools included
        text = tok.apply_chat_template(ASK, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        assert out.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))
    assert finish == "tool_calls"
    assert len(calls) == 1 and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    check_call(calls[0]["name"], calls[0]["arguments"])


def test_auto_plain_text_and_none(client):
    """Without a call in the answer, auto is plain content; none does not render the tools at all."""
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=8)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")
    none = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", temperature=0,
                                          max_tokens=8)
    assert none.usage.prompt_tokens < out.usage.prompt_tokens


def test_tool_result_round_trips(client, tok):
    """A named call, then its result fed back: the server's prompt is the template's rendering of both."""
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0, max_tokens=64,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    result = "18 degrees and sunny in Paris"
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": result}]
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=4)
    rendered = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "content": result}]
    text = tok.apply_chat_template(rendered, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "<tool_response>\n18 degrees and sunny in Paris\n</tool_response>" in text
    assert call.function.arguments.replace(" ", "") in text.replace(" ", "")
    assert out.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))
    assert out.usage.prompt_tokens > first.usage.prompt_tokens


def test_bad_tool_requests_are_400(client, gateway):
    bad = [({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
           ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            "tools[0].function.parameters.type"),
           ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope' is not one"),
           ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice: 'sometimes'"),
           ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format: cannot be combined"),
           ({"tool_choice": "required"}, "'required' needs a non-empty tools list")]
    for extra, message in bad:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **extra)
        assert message in err.value.body["message"], (extra, err.value.body)
    # a tool call whose arguments are not JSON, fed back: the server's 400
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\].tool_calls\[0\].function.arguments"):
        client.chat.completions.create(model=MODEL, max_tokens=4, tools=TOOLS, messages=ASK + [
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                  "function": {"name": "now", "arguments": "{not json"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "noon"}])
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2).choices[0].message.content is not None


@pytest.fixture(scope="module")
def plain_gateway(server, tmp_path_factory):
    """A gateway on the session's server, whose model keeps the tiny models' template (no tools)."""
    logs = tmp_path_factory.mktemp("gateway_plain")
    with GatewayProcess(server.grpc_url, free_port(), served_model_names=[MODEL], log_path=str(logs / "gateway.log")) as gw:
        yield gw


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_template_without_tools_is_400(plain_gateway, stream):
    client = openai.OpenAI(base_url=f"{plain_gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    for choice in ("auto", "required"):
        with pytest.raises(openai.BadRequestError, match="this model's chat template does not support tools"):
            out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                 max_tokens=4, stream=stream)
            list(out) if stream else None
    # tool_choice none: the tools are not rendered, so any template answers
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert out.choices[0].message.content is not None
