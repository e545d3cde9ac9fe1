"""messages JSON validation (no tokenizer needed)."""

from __future__ import annotations

import json

import pytest

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.handlers.preprocess.prompt import messages_from_text, parse_messages, text_bytes

TEXT = {"type": "text", "text": "What is this?"}


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def test_parts_are_normalized_and_images_kept_in_prompt_order():
    raw = json.dumps(
        [
            {"role": "system", "content": "Be brief."},
            user(
                {"type": "image"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                {"type": "image", "image": "data:image/png;base64,BBB"},
                {"type": "image_url", "image_url": "CCC"},
                TEXT,
            ),
            {"role": "assistant", "content": "A cat."},
            user(TEXT),
        ]
    )
    msgs, sources = parse_messages(raw, [b"tensor-image"])
    assert sources == [b"tensor-image", "data:image/png;base64,AAA", "data:image/png;base64,BBB", "CCC"]
    assert msgs[1]["content"] == [{"type": "image"}] * 4 + [TEXT]
    assert msgs[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    "raw,rule",
    [
        ("[{'role': 'user'}", "not valid JSON"),
        ("[" * 50_000 + "]" * 50_000, "nested too deeply"),
        ('{"role": "user", "content": "hi"}', "non-empty JSON array"),
        ("[]", "non-empty JSON array"),
        ('["hello"]', r"messages\[0\]: expected an object"),
        (json.dumps([{"role": "user"}]), "'role' and 'content'"),
        (json.dumps([{"role": "robot", "content": "hi"}]), r"messages\[0\].role: 'robot'"),
        (json.dumps([{"role": "user", "content": 42}]), "a string or a list of parts"),
        (json.dumps([user("plain string part")]), r"content\[0\].type: None"),
        (json.dumps([user({"type": "audio"})]), "'audio' is not one of"),
        (json.dumps([user({"type": "text", "text": 5})]), r"content\[0\].text: expected a string"),
        (json.dumps([user({"type": "image_url"})]), r"content\[0\].image_url"),
        (json.dumps([user({"type": "image", "image": 7})]), r"content\[0\].image"),
        (json.dumps([user({"type": "image"})]), "needs an element of the image input"),
        (
            json.dumps(
                [
                    {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                    user(TEXT),
                ]
            ),
            "only allowed in user",
        ),
        (json.dumps([user(TEXT), {"role": "assistant", "content": "ok"}]), "last message"),
        ('[{"role": "user", "content": "bad \\ud800"}]', "not valid Unicode"),
        ('[{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]', "not valid Unicode"),
    ],
)
def test_bad_messages_name_the_rule(raw, rule):
    with pytest.raises(InvalidArgument, match=rule):
        parse_messages(raw, [])


def test_images_in_assistant_turns_are_refused():
    raw = json.dumps([user(TEXT), {"role": "assistant", "content": [{"type": "image"}]}, user(TEXT)])
    with pytest.raises(InvalidArgument, match=r"messages\[1\]: images are only allowed in user"):
        parse_messages(raw, [b"img"])


def test_unreferenced_tensor_images_are_refused():
    with pytest.raises(InvalidArgument, match="not referenced"):
        parse_messages(json.dumps([user(TEXT)]), [b"img"])


def test_text_bytes_counts_only_text():
    msgs, _ = parse_messages(
        json.dumps(
            [
                {"role": "system", "content": "ab"},
                user(
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 1000}},
                    {"type": "text", "text": "\u00e9\u4e2d"},
                ),
            ]
        ),
        [],
    )
    assert text_bytes(msgs) == 2 + 2 + 3
    assert text_bytes(messages_from_text("hello", 2)) == 5
