"""Bad-input corpus against the real server: every case is INVALID_ARG (HTTP 400) naming the problem,
answered at once, the server ready throughout, and a normal request unchanged afterwards."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib

import pytest
import requests
from helpers import data_uri, make_image, stream_grpc
from PIL import Image

GEN = "/v2/models/qwen2_5_vl/generate"
FAST = 3.0  # seconds: a refusal must not wait for decoding, tokenizing or the engine
NORMAL = {
    "text_input": "Describe the picture.",
    "max_tokens": 6,
    "temperature": 0,
    "exclude_input_in_output": True,
}
IMAGE = make_image(96, 64, seed=21)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int, mode: int = 2) -> bytes:
    """A PNG whose header claims width x height but whose data is a few bytes (a bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


def zero_png(width: int, height: int) -> bytes:
    """A real, valid grey PNG of zeros: a few kB on the wire, width*height pixels decoded."""
    rows = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    body = b"".join(rows.compress(row) for _ in range(height)) + rows.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + _chunk(b"IDAT", body)
        + _chunk(b"IEND", b"")
    )


def gif_claiming(width: int, height: int) -> bytes:
    return (
        b"GIF89a"
        + struct.pack("<HH", width, height)
        + b"\0\0\0"
        + b","
        + struct.pack("<HHHH", 0, 0, 1, 1)
        + b"\0\x02\x02\x4c\x01\x00;"
    )


def solid(width: int, height: int, fmt: str = "PNG") -> bytes:
    return encoded(Image.new("RGB", (width, height), (120, 30, 200)), fmt)


JPEG = make_image(64, 64, seed=22, fmt="JPEG")
PNG = make_image(64, 64, seed=23)


def msgs(*messages) -> str:
    return json.dumps(list(messages))


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": "What is this?"}
DEEP = "[" * 100_000 + "]" * 100_000


def deep_schema(levels: int) -> str:
    """A JSON schema nesting ``levels`` deep (arrays of arrays), as text."""
    return '{"type": "array", "items": ' * (levels - 1) + '{"type": "integer"}' + "}" * (levels - 1)


# (case id, fields merged into NORMAL (None removes one), keyword expected in the error message)
HTTP_CASES = [
    # images: corrupt, empty, truncated, bombs, unsupported, extreme aspect
    ("image-corrupt", {"image": [b64(b"\x00\x01garbage" * 50)]}, "not a recognizable image"),
    ("image-empty", {"image": [""]}, "empty image"),
    ("image-png-magic-then-garbage", {"image": [b64(b"\x89PNG\r\n\x1a\n" + b"\x07" * 300)]}, "image[0]"),
    ("image-truncated-png", {"image": [b64(PNG[:60])]}, "truncated"),
    ("image-truncated-jpeg", {"image": [b64(JPEG[: len(JPEG) // 2])]}, "truncated"),
    ("image-jpeg-without-end", {"image": [b64(JPEG[:-2])]}, "truncated"),
    ("image-bomb-png-header-50000x50000", {"image": [b64(png_claiming(50000, 50000))]}, "pixel"),
    ("image-bomb-gif-header-65535x65535", {"image": [b64(gif_claiming(65535, 65535))]}, "pixel"),
    ("image-bomb-real-zero-png-7000x7000", {"image": [b64(zero_png(7000, 7000))]}, "pixel"),
    ("image-zero-size-png", {"image": [b64(png_claiming(0, 0))]}, "image[0]"),
    ("image-format-tiff", {"image": [b64(solid(32, 32, "TIFF"))]}, "allowed formats JPEG, PNG"),
    ("image-format-ico", {"image": [b64(solid(32, 32, "ICO"))]}, "allowed formats"),
    (
        "image-format-svg",
        {"image": [data_uri(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")]},
        "not a recognizable image",
    ),
    ("image-aspect-1x300", {"image": [b64(solid(1, 300))]}, "aspect ratio"),
    ("image-aspect-6000x28", {"image": [b64(solid(6000, 28))]}, "aspect ratio"),
    ("image-second-of-two-corrupt", {"image": [b64(PNG), b64(b"nope" * 10)]}, "image[1]"),
    # base64 and data URIs
    ("base64-invalid-chars", {"image": ["@@@ this is not base64 @@@"]}, "base64"),
    ("base64-bad-padding", {"image": [b64(PNG)[:-3]]}, "base64"),
    ("data-uri-text-media-type", {"image": [data_uri(PNG, "text/plain")]}, "not an image"),
    ("data-uri-not-base64", {"image": ["data:image/png,rawbytes"]}, "data URI"),
    ("data-uri-bad-payload", {"image": ["data:image/png;base64,%%%%"]}, "base64"),
    ("data-uri-empty-payload", {"image": ["data:image/png;base64,"]}, "empty image"),
    # URLs, as image elements and as messages image_url parts
    ("url-metadata", {"image": ["http://169.254.169.254/latest/meta-data/iam/"]}, "URL"),
    ("url-loopback", {"image": ["http://localhost:8000/v2/health/ready"]}, "URL"),
    ("url-file", {"image": ["file:///etc/passwd"]}, "URL"),
    ("url-ftp", {"image": ["ftp://example.com/cat.png"]}, "URL"),
    ("url-https", {"image": ["https://example.com/cat.png"]}, "URL"),
    (
        "messages-url-metadata",
        {"messages": msgs(user(url_part("http://169.254.169.254/latest/meta-data/"), TEXT))},
        "URL",
    ),
    ("messages-url-file", {"messages": msgs(user(url_part("file:///etc/passwd"), TEXT))}, "URL"),
    ("messages-url-loopback-ipv6", {"messages": msgs(user(url_part("http://[::1]:8000/"), TEXT))}, "URL"),
    (
        "messages-qwen-style-file-path",
        {"messages": msgs(user({"type": "image", "image": "file:///etc/passwd"}, TEXT))},
        "URL",
    ),
    ("messages-url-gopher", {"messages": msgs(user(url_part("gopher://127.0.0.1:6379/_INFO"), TEXT))}, "URL"),
    # too many images (default limit 8)
    ("too-many-images", {"image": [b64(solid(28, 28))] * 9}, "limit of 8"),
    # sampling tensors out of range
    ("temperature-negative", {"temperature": -0.5}, "temperature"),
    ("top_p-zero", {"top_p": 0.0}, "top_p"),
    ("top_p-above-one", {"top_p": 1.5}, "top_p"),
    ("top_k-below-minus-one", {"top_k": -2}, "top_k"),
    ("max_tokens-zero", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens-negative", {"max_tokens": -7}, "max_tokens"),
    ("min_tokens-negative", {"min_tokens": -1}, "min_tokens"),
    ("min_tokens-above-max_tokens", {"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ("repetition_penalty-zero", {"repetition_penalty": 0.0}, "repetition_penalty"),
    ("repetition_penalty-negative", {"repetition_penalty": -1.0}, "repetition_penalty"),
    ("presence_penalty-above-2", {"presence_penalty": 2.5}, "presence_penalty"),
    ("frequency_penalty-below-minus-2", {"frequency_penalty": -3.0}, "frequency_penalty"),
    ("stop_token_ids-outside-vocab", {"stop_token_ids": [10**9]}, "stop_token_ids"),
    ("stop_token_ids-negative", {"stop_token_ids": [-1]}, "stop_token_ids"),
    ("stop_words-empty-string", {"stop_words": [""]}, "stop_words"),
    # sampling_parameters JSON
    ("sp-not-json", {"sampling_parameters": "{temperature: 1"}, "not valid JSON"),
    ("sp-not-object", {"sampling_parameters": "[1, 2]"}, "JSON object"),
    ("sp-unknown-key", {"sampling_parameters": '{"temprature": 0.5}'}, "unknown key"),
    ("sp-temperature-word", {"sampling_parameters": '{"temperature": "hot"}'}, "temperature"),  # "0.5" is fine (vLLM's habit)
    ("sp-temperature-nan", {"sampling_parameters": '{"temperature": NaN}'}, "temperature"),
    ("sp-top_p-infinity", {"sampling_parameters": '{"top_p": Infinity}'}, "top_p"),
    ("sp-max_tokens-bool", {"sampling_parameters": '{"max_tokens": true}'}, "max_tokens"),
    ("sp-max_tokens-fraction", {"sampling_parameters": '{"max_tokens": 2.5}'}, "max_tokens"),
    ("sp-min_p-above-one", {"sampling_parameters": '{"min_p": 1.5}'}, "min_p"),
    ("sp-n-two", {"sampling_parameters": '{"n": 2}'}, "n=2"),
    ("sp-seed-negative", {"sampling_parameters": '{"seed": -1}'}, "seed"),
    ("sp-seed-too-big", {"sampling_parameters": json.dumps({"seed": 2**64})}, "seed"),
    ("sp-stop-not-strings", {"sampling_parameters": '{"stop": [1, 2]}'}, "stop"),
    ("sp-stop_token_ids-not-list", {"sampling_parameters": '{"stop_token_ids": "7"}'}, "stop_token_ids"),
    ("sp-ignore_eos-string", {"sampling_parameters": '{"ignore_eos": "yes"}'}, "ignore_eos"),
    ("sp-deeply-nested", {"sampling_parameters": "[" * 100_000 + "]" * 100_000}, "sampling_parameters"),
    # prompts beyond max_model_len (the test model: 4096 positions)
    ("prompt-too-long", {"text_input": "hello " * 5000}, "max_model_len"),
    ("prompt-far-too-long-8MB", {"text_input": "a" * 8_000_000}, "prompt"),
    (
        "messages-too-long",
        {"text_input": None, "messages": msgs(user({"type": "text", "text": "word " * 6000}))},
        "max_model_len",
    ),
    # messages JSON
    ("messages-not-json", {"messages": "[{'role': 'user'}"}, "not valid JSON"),
    ("messages-not-a-list", {"messages": '{"role": "user", "content": "hi"}'}, "array"),
    ("messages-empty-list", {"messages": "[]"}, "non-empty"),
    ("messages-bad-role", {"messages": msgs({"role": "robot", "content": "hi"})}, "role"),
    ("messages-missing-content", {"messages": msgs({"role": "user"})}, "content"),
    ("messages-content-number", {"messages": msgs({"role": "user", "content": 42})}, "content"),
    ("messages-item-not-object", {"messages": '["hello"]'}, "messages[0]"),
    (
        "messages-image-in-assistant",
        {
            "image": [b64(PNG)],
            "messages": msgs(user(TEXT), {"role": "assistant", "content": [{"type": "image"}]}, user(TEXT)),
        },
        "only allowed in user",
    ),
    (
        "messages-image-url-in-system",
        {"messages": msgs({"role": "system", "content": [url_part(data_uri(PNG))]}, user(TEXT))},
        "only allowed in user",
    ),
    ("messages-unknown-part-type", {"messages": msgs(user({"type": "audio", "audio": "x"}))}, "'audio'"),
    ("messages-part-not-object", {"messages": msgs(user("just a string"))}, "type"),
    ("messages-text-not-string", {"messages": msgs(user({"type": "text", "text": 5}))}, "text"),
    ("messages-image-part-without-image", {"messages": msgs(user({"type": "image"}, TEXT))}, "image input"),
    ("messages-unreferenced-image", {"image": [b64(PNG)], "messages": msgs(user(TEXT))}, "not referenced"),
    (
        "messages-last-from-assistant",
        {"messages": msgs(user(TEXT), {"role": "assistant", "content": "ok"})},
        "last message",
    ),
    (
        "messages-image-pad-in-text",
        {"messages": msgs(user({"type": "text", "text": "<|image_pad|> hi"}))},
        "placeholder",
    ),
    ("text-image-pad-in-text", {"text_input": "look: <|image_pad|><|image_pad|>"}, "placeholder"),
    ("messages-deeply-nested", {"messages": "[" * 100_000 + "]" * 100_000}, "messages"),
    ("messages-lone-surrogate", {"messages": '[{"role": "user", "content": "bad \\ud800 text"}]'}, "Unicode"),
    ("sp-stop-lone-surrogate", {"sampling_parameters": '{"stop": ["\\udfff"]}'}, "Unicode"),
    ("image-part-lone-surrogate", {"messages": '[{"role": "user", "content": [{"type": "image", "image": "\\ud800"}]}]'},
     "Unicode"),
    ("video-part-lone-surrogate", {"messages": '[{"role": "user", "content": [{"type": "video", "video": "\\ud800"}]}]'},
     "Unicode"),
    ("messages-image-url-missing", {"messages": msgs(user({"type": "image_url"}, TEXT))}, "image_url"),
    # neither text_input nor messages
    ("no-text-no-messages", {"text_input": None}, "text_input"),
    # JSON nested past 64 levels (client.rules.structured MAX_JSON_DEPTH): was an INTERNAL RecursionError
    # (guide, structured_outputs as text) or a minute of schema conversion (900 levels) before
    ("guide-deeply-nested", {"guided_decoding_guide_type": "json_schema", "guided_decoding_guide": DEEP},
     "guided_decoding_guide: JSON nested too deeply"),
    ("guide-schema-900-levels", {"guided_decoding_guide_type": "json_schema",
                                 "guided_decoding_guide": deep_schema(900)},
     "guided_decoding_guide: JSON nested too deeply"),
    ("guide-schema-65-levels", {"guided_decoding_guide_type": "json_schema",
                                "guided_decoding_guide": deep_schema(65)},
     "guided_decoding_guide: JSON nested too deeply"),
    ("sp-structured-outputs-json-text-deeply-nested",
     {"sampling_parameters": json.dumps({"structured_outputs": {"json": DEEP}})},
     "sampling_parameters.structured_outputs.json: JSON nested too deeply"),
    ("sp-structured-outputs-text-deeply-nested", {"sampling_parameters": json.dumps({"structured_outputs": DEEP})},
     "sampling_parameters.structured_outputs: JSON nested too deeply"),
    ("sp-structured-outputs-schema-900-levels",
     {"sampling_parameters": '{"structured_outputs": {"json": %s}}' % deep_schema(898)},
     "sampling_parameters: JSON nested too deeply"),
    ("messages-part-nested-900-levels",
     {"text_input": None, "messages": '[{"role": "user", "content": [{"type": "text", "text": "hi", "x": %s}]}]'
      % ("[" * 900 + "]" * 900)}, "messages: JSON nested too deeply"),
    # stop bounds (client.rules.sampling: 64 stop strings of at most 1024 characters, 64 stop ids)
    ("stop_words-65", {"stop_words": ["x"] * 65}, "stop_words: 65 strings is over the limit of 64"),
    ("stop_words-1025-characters", {"stop_words": ["ok", "y" * 1025]},
     "stop_words[1] has 1025 characters, over the limit of 1024"),
    ("sp-stop-100k-strings", {"sampling_parameters": json.dumps({"stop": ["ab"] * 100_000})},
     "sampling_parameters.stop_words: 100000 strings is over the limit of 64"),
    ("sp-stop-1MB-string", {"sampling_parameters": json.dumps({"stop": ["z" * (1 << 20)]})},
     "sampling_parameters.stop_words[0] has 1048576 characters"),
    ("stop_token_ids-65", {"stop_token_ids": list(range(65))}, "stop_token_ids: 65 ids is over the limit of 64"),
]


def post(server, body: dict) -> requests.Response:
    return requests.post(f"http://{server.http_url}{GEN}", json=body, timeout=60)


def ready(server) -> bool:
    return requests.get(f"http://{server.http_url}/v2/health/ready", timeout=5).status_code == 200


def normal(server) -> dict:
    r = post(server, {**NORMAL, "image": [b64(IMAGE)]})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def before(server) -> dict:
    """A normal request made before any bad one: the reference for the one made after."""
    return normal(server)


@pytest.mark.parametrize("fields,keyword", [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES])
def test_http_bad_input_is_invalid_arg(server, before, fields, keyword):
    body = {k: v for k, v in {**NORMAL, **fields}.items() if v is not None}
    start = time.monotonic()
    r = post(server, body)
    elapsed = time.monotonic() - start
    assert r.status_code == 400, r.text[:500]
    message = r.json()["error"]
    assert keyword.lower() in message.lower(), message
    assert elapsed < FAST, f"{elapsed:.1f}s to refuse"
    assert ready(server)


# Values Triton's HTTP frontend cannot turn into the declared tensor types never reach the model:
# Triton 2.51 refuses them itself, with HTTP 500 and a parse error (not 400; nothing to do in the model).
FRONTEND_CASES = [
    ("temperature-string", {"temperature": "hot"}, "parse"),
    ("max_tokens-string", {"max_tokens": "ten"}, "parse"),
    ("seed-negative", {"seed": -1}, "parse"),
    ("text_input-lone-surrogate", {"text_input": "bad \ud800 text"}, "surrogate"),
]


@pytest.mark.parametrize(
    "fields,keyword", [c[1:] for c in FRONTEND_CASES], ids=[c[0] for c in FRONTEND_CASES]
)
def test_http_refused_by_tritons_frontend(server, before, fields, keyword):
    r = post(server, {**NORMAL, **fields})
    assert r.status_code in (400, 500), r.text[:500]
    assert keyword in r.json()["error"].lower(), r.text
    assert ready(server)


# (case id, gRPC fields (raw bytes reach the model unchanged), keyword)
GRPC_CASES = [
    ("text_input-invalid-utf8", {"text_input": b"caf\xe9 \xff"}, "text_input: not valid UTF-8"),
    (
        "messages-invalid-utf8",
        {"messages": b'[{"role": "user", "content": "\xc3\x28"}]'},
        "messages: not valid UTF-8",
    ),
    (
        "sampling_parameters-invalid-utf8",
        {"sampling_parameters": b'{"stop": "\xed\xa0\x80"}'},
        "sampling_parameters: not valid UTF-8",
    ),
    (
        "stop_words-invalid-utf8",
        {"stop_words": [b"ok", b"\x80\x81"]},
        "stop_words",
    ),
    ("raw-image-garbage", {"image": [b"\x89PNG\r\n\x1a\n" + bytes(range(256))]}, "image[0]"),
    ("raw-image-not-an-image", {"image": [bytes(range(256))]}, "not a recognizable image"),
    ("temperature-nan", {"temperature": float("nan")}, "temperature"),
    ("top_p-infinity", {"top_p": float("inf")}, "top_p"),
    ("streamed-bad-top_k", {"top_k": -5, "stream": True}, "top_k"),
    ("max_tokens-wrong-dtype", {"max_tokens": 2.5}, "max_tokens"),
    ("messages-lone-surrogate-escape", {"messages": b'[{"role": "user", "content": "\\ud800"}]'}, "Unicode"),
]


@pytest.mark.parametrize("fields,keyword", [pytest.param(*c[1:3], id=c[0], marks=c[3:]) for c in GRPC_CASES])
def test_grpc_bad_input_is_invalid_arg(server, before, fields, keyword):
    from tritonclient.utils import InferenceServerException

    start = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        stream_grpc(server.grpc_url, timeout=30, **{"text_input": "Hi", "max_tokens": 2, **fields})
    elapsed = time.monotonic() - start
    assert keyword.lower() in info.value.message().lower(), info.value.message()
    assert elapsed < FAST, f"{elapsed:.1f}s to refuse"
    assert ready(server)


# Odd but legal values: served, never an engine fault (a sampler overflow would fail the whole step).
EDGE_CASES = [
    ("temperature-tiny", {"temperature": 1e-40, "seed": 3}),
    (
        "sp-temperature-tiny",
        {"temperature": None, "sampling_parameters": '{"temperature": 1e-300, "seed": 1}'},
    ),
    ("repetition_penalty-tiny-sampled", {"repetition_penalty": 1e-40, "temperature": 1.0, "seed": 3}),
    ("repetition_penalty-huge-sampled", {"repetition_penalty": 1e30, "temperature": 1.0, "seed": 3}),
    ("temperature-huge", {"temperature": 1e30, "seed": 3}),
    ("top_k-beyond-vocab", {"top_k": 10**9, "temperature": 1.0, "seed": 3}),
    (
        "sp-everything-at-its-bound",
        {
            "sampling_parameters": json.dumps(
                {
                    "top_p": 1.0,
                    "min_p": 1.0,
                    "presence_penalty": 2,
                    "frequency_penalty": -2,
                    "top_k": -1,
                    "seed": 2**64 - 1,
                    "temperature": 0.7,
                }
            )
        },
    ),
    ("base64-with-newlines", {"image": [base64.encodebytes(IMAGE).decode()]}),
    ("empty-text", {"text_input": ""}),
]


@pytest.mark.parametrize("fields", [c[1] for c in EDGE_CASES], ids=[c[0] for c in EDGE_CASES])
def test_edge_values_are_served(server, before, fields):
    r = post(server, {k: v for k, v in {**NORMAL, **fields}.items() if v is not None})
    assert r.status_code == 200, r.text[:500]
    assert r.json()["num_output_tokens"] >= 1
    assert ready(server)


def test_normal_request_unchanged_after_the_bad_ones(server, before):
    after = normal(server)
    assert after["output_ids"] == before["output_ids"]
    assert after["text_output"] == before["text_output"]
    assert after["num_input_tokens"] == before["num_input_tokens"]
    assert ready(server)


def test_a_bad_request_beside_good_ones_leaves_them_intact(server, before):
    """Bad and good requests in flight together: each good one gets its normal answer."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [
        {**NORMAL, "image": [b64(IMAGE)]} if i % 2 else {**NORMAL, "image": [b64(b"junk" * 9)]}
        for i in range(8)
    ]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: post(server, b), bodies))
    for i, r in enumerate(answers):
        if i % 2:
            assert r.status_code == 200 and r.json()["output_ids"] == before["output_ids"], r.text
        else:
            assert r.status_code == 400 and "image[0]" in r.json()["error"]
    assert ready(server)
