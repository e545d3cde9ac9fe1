"""Tool calls, the pure parts: the tools / tool_choice rules (client/rules/tools.py), the forced call's
JSON schema (compiled by xgrammar, checked with jsonschema), Qwen's ``<tool_call>`` parser whole and
streamed (gateway/tools.py), the gateway's mapping, and preprocess's tool messages and template check."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.client.rules.structured import parse_structured_outputs
from tritonvl.client.rules.tools import check_tool_choice, check_tools, forced_schema
from tritonvl.handlers.engine.grammar.xgr import check_syntax
from tritonvl.handlers.gateway.errors import APIError
from tritonvl.handlers.gateway.mapping import parse_chat
from tritonvl.handlers.gateway.tools import ToolPlan, parse_forced, parse_tool_calls, plan
from tritonvl.handlers.preprocess.prompt import PromptBuilder, parse_messages, parse_tools, template_reads

ROOT = Path(__file__).resolve().parents[2]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "now"}}
TOOLS = check_tools([WEATHER, CLOCK])


@pytest.mark.parametrize("tools, message", [
    ({"type": "function"}, "tools: expected a list"),
    (["x"], "tools[0]: expected an object"),
    ([{"type": "retrieval", "function": {"name": "a"}}], "tools[0].type: 'retrieval' is not supported"),
    ([{"type": "function"}], "tools[0].function: expected an object"),
    ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name: expected 1-64"),
    ([{"type": "function", "function": {"name": "a", "extra": 1}}], "tools[0].function: unknown key(s) ['extra']"),
    ([CLOCK, CLOCK], "tools[1].function.name: 'now' is given twice"),
    ([{"type": "function", "function": {"name": "a", "parameters": []}}], "tools[0].function.parameters: expected"),
    ([{"type": "function", "function": {"name": "a", "parameters": {"type": "string"}}}],
     "tools[0].function.parameters.type: the arguments are a JSON object"),
    ([{"type": "function", "function": {"name": "a", "parameters": {"type": "object", "required": "x"}}}],
     "tools[0].function.parameters.required"),
    ([{"type": "function", "function": {"name": "a", "description": 3}}], "tools[0].function.description"),
])
def test_bad_tools_are_named(tools, message):
    with pytest.raises(InvalidArgument, match="^" + message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        check_tools(tools)


def test_tool_choice():
    assert check_tool_choice(None, TOOLS) == "auto" and check_tool_choice(None, []) == "none"
    assert [check_tool_choice(c, TOOLS) for c in ("none", "auto", "required")] == ["none", "auto", "required"]
    assert check_tool_choice({"type": "function", "function": {"name": "now"}}, TOOLS) == "now"
    with pytest.raises(InvalidArgument, match=r"tool_choice.function.name: 'nope' is not one of the tools"):
        check_tool_choice({"type": "function", "function": {"name": "nope"}}, TOOLS)
    with pytest.raises(InvalidArgument, match="'required' needs a non-empty tools list"):
        check_tool_choice("required", [])
    for bad in ("any", {"name": "now"}, 3):
        with pytest.raises(InvalidArgument, match="^tool_choice"):
            check_tool_choice(bad, TOOLS)


def _compiles(schema: dict) -> None:
    check_syntax(parse_structured_outputs({"json": schema}))  # what preprocess does before the llm compiles it


def test_forced_schemas_compile_and_validate():
    named = forced_schema(TOOLS, "get_weather")
    _compiles(named)
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}}, named)
    for bad in ({"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Rome"}},
                {"name": "get_weather"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, named)
    required = forced_schema(TOOLS, "required")
    _compiles(required)
    jsonschema.validate([{"name": "now", "arguments": {}},
                         {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "f"}}], required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], required)
    single = forced_schema(TOOLS, "required", parallel=False)
    _compiles(single)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "now", "arguments": {}}] * 2, single)
    assert forced_schema(TOOLS, "auto") is None and forced_schema(TOOLS, "none") is None
    with pytest.raises(jsonschema.ValidationError):  # no parameters: no arguments
        jsonschema.validate({"name": "now", "arguments": {"x": 1}}, forced_schema(TOOLS, "now"))


TEXT = ('I will look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "now", "arguments": "{}"}\n</tool_call>')


def test_parser_on_fixed_text():
    content, calls = parse_tool_calls(TEXT)
    assert content == "I will look."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "c"}
    assert calls[1]["function"]["arguments"] == "{}"
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    # no call: the text as it is; a block that is no call stays text; an unclosed call at the end still parses
    assert parse_tool_calls("just words") == ("just words", [])
    assert parse_tool_calls("<tool_call>oops</tool_call>") == ("<tool_call>oops</tool_call>", [])
    content, calls = parse_tool_calls('<tool_call>\n{"name": "now", "arguments": {}}')
    assert content is None and [c["function"]["name"] for c in calls] == ["now"]
    assert parse_tool_calls('<tool_call>\n{"name": "now", "argu') == ('<tool_call>\n{"name": "now", "argu', [])
    # parallel_tool_calls=false keeps the first call
    assert len(ToolPlan(TOOLS, "auto", parallel=False).parse(TEXT)[1]) == 1


def test_forced_answers():
    calls = parse_forced('[{"name": "now", "arguments": {}}]', "required")
    assert [c["function"]["name"] for c in calls] == ["now"]
    assert parse_forced('{"name": "now", "arguments": {}}', "now")[0]["function"]["arguments"] == "{}"
    assert parse_forced('{"name": "now", "argum', "now") is None  # cut off by max_tokens
    assert ToolPlan(TOOLS, "now").parse('{"name": "now"') == ('{"name": "now"', [])


def _streamed(text: str, step: int, tool_plan: ToolPlan) -> tuple[list[str], list[dict]]:
    stream, contents, calls = tool_plan.stream(), [], []
    for i in range(0, len(text), step):
        content, done = stream.feed(text[i:i + step])
        contents.append(content)
        calls += done
    content, done = stream.finish()
    return contents + [content], calls + done


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_streamed_calls_equal_the_whole_parse(step):
    contents, calls = _streamed(TEXT, step, ToolPlan(TOOLS, "auto"))
    assert "".join(contents) == "I will look."
    assert not any("<" in c for c in contents)  # no piece of a tag leaks into the content
    assert [c["index"] for c in calls] == [0, 1]
    whole = parse_tool_calls(TEXT)[1]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole]
    # text that only looks like the start of a tag is content, held only until told apart
    contents, calls = _streamed("a <tool box> b <tool_c", step, ToolPlan(TOOLS, "auto"))
    assert "".join(contents) == "a <tool box> b <tool_c" and not calls
    # forced: held whole, read at the end
    contents, calls = _streamed('[{"name": "now", "arguments": {}}]', step, ToolPlan(TOOLS, "required"))
    assert "".join(contents) == "" and [c["function"]["name"] for c in calls] == ["now"]


def test_gateway_plan_and_mapping():
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, CLOCK]}
    parsed = parse_chat({**body, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert json.loads(parsed.request.extra["tools"][0]) == TOOLS
    assert parsed.request.params.structured_outputs == {"json": forced_schema(TOOLS, "get_weather")}
    parsed = parse_chat(body)  # auto: rendered, free text
    assert parsed.tools.choice == "auto" and parsed.request.params.structured_outputs is None
    parsed = parse_chat({**body, "tool_choice": "none"})  # none: not rendered
    assert parsed.tools is None and "tools" not in parsed.request.extra
    assert parse_chat({"messages": body["messages"], "tool_choice": "auto", "tools": []}).tools is None
    cases = [({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
             ({"tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice"),
             ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
             ({"parallel_tool_calls": "yes"}, "parallel_tool_calls")]
    for extra, param in cases:
        with pytest.raises(APIError) as err:
            plan({**body, **extra})
        assert err.value.status == 400 and err.value.param == param, extra


def test_tool_messages_pass_validation():
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18 C"}]}]
    out, _ = parse_messages(json.dumps(msgs), [])
    assert out[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}, "id": "call_1"}]}
    assert out[2] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}
    bad = [({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]},
            "messages[0].tool_calls[0].function.arguments"),
           ({"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}, "messages[0]"),
           ({"role": "tool", "content": "x", "tool_call_id": 3}, "messages[0].tool_call_id")]
    for msg, where in bad:
        with pytest.raises(InvalidArgument, match="^" + where.replace("[", r"\[").replace("]", r"\]")):
            parse_messages(json.dumps([msg, {"role": "user", "content": "go"}]), [])
    assert parse_tools(None) is None and parse_tools("[]") is None and parse_tools(json.dumps([CLOCK])) == [CLOCK]


def test_which_templates_support_tools():
    from transformers import AutoTokenizer

    from tritonvl.handlers.tiny_model import chat_template, tokenizer_source_dir

    tools_template = (ROOT / "tests" / "gateway" / "tools_chat_template.jinja").read_text()
    assert not template_reads(chat_template(), "tools")  # the tiny models': Qwen2.5-VL's published template
    assert template_reads(tools_template, "tools")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_source_dir()))
    assert template_reads(tok.chat_template, "tools")  # the Qwen3 text template shipped with the tokenizer files
    tok.chat_template = chat_template()
    builder = PromptBuilder(tok, tok.convert_tokens_to_ids("<|image_pad|>"))
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidArgument, match="^tools: this model's chat template does not support tools"):
        builder.build(msgs, [], tools=TOOLS)
    assert builder.build(msgs, [])  # no tools: as before
    tok.chat_template = tools_template
    builder = PromptBuilder(tok, tok.convert_tokens_to_ids("<|image_pad|>"))
    text = tok.decode(builder.build(msgs, [], tools=TOOLS))
    assert '"name": "get_weather"' in text and "<tools>" in text
