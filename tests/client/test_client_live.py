"""Client and AsyncClient against a real tritonserver, over gRPC and HTTP."""

from __future__ import annotations

import asyncio
import io
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from tritonvl.client import AsyncClient, Client, InvalidRequest, ModelNotReady, ServerUnavailable, StopRules

PROTOCOLS = ["grpc", "http"]


def url(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.fixture(params=PROTOCOLS)
def client(request, server):
    with Client(url(server, request.param), request.param, timeout=120) as c:
        yield c


def picture(seed: int = 0, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)).resize(size)


def test_generate(client):
    r = client.generate("Say something.", max_tokens=6)
    assert r.finish_reason == "length"
    assert r.text and len(r.output_ids) == 6
    assert r.usage.output_tokens == 6 and r.usage.input_tokens > 5 and r.usage.images == 0
    assert r.latency > 0 and r.ttft is None
    assert "Say something." not in r.text  # the client always asks exclude_input_in_output


def test_stream_equals_generate(client):
    whole = client.generate("Count with me.", max_tokens=8)
    with client.stream("Count with me.", max_tokens=8) as s:
        deltas = list(s)
    assert len(deltas) > 1
    assert "".join(deltas) == whole.text == s.result.text
    assert s.result.output_ids == whole.output_ids
    assert s.result.finish_reason == "length"
    assert 0 < s.result.ttft <= s.result.latency


def test_every_image_source_gives_the_same_answer(client, tmp_path):
    img = picture(1)
    path = tmp_path / "p.png"
    img.save(path)
    answers = {
        kind: client.generate("Describe.", images=[src], max_tokens=5).output_ids
        for kind, src in [("path", path), ("bytes", path.read_bytes()), ("pil", img), ("array", np.asarray(img))]
    }
    assert len({tuple(v) for v in answers.values()}) == 1, answers
    two = client.generate("Compare.", images=[img, picture(2)], max_tokens=3)
    none = client.generate("Compare.", max_tokens=3)
    assert two.usage.images == 2 and two.usage.input_tokens > none.usage.input_tokens


def test_chat_multi_turn(client):
    img = picture(3)
    first = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What?"}]}]
    a = client.chat(first, max_tokens=4)
    second = first + [{"role": "assistant", "content": a.text}, {"role": "user", "content": "And?"}]
    b = client.chat(second, max_tokens=4)
    assert a.usage.images == 1 and b.usage.images == 1
    assert b.usage.input_tokens > a.usage.input_tokens


def test_stop_string(client):
    free = client.generate("Tell me more.", max_tokens=10)
    word = free.text[len(free.text) // 2:][:3]
    assert word
    r = client.generate("Tell me more.", max_tokens=10, stop=[word])
    assert r.finish_reason == "stop"
    assert r.text == free.text[: free.text.index(word)]


def test_stop_token_id(client):
    free = client.generate("Tell me more.", max_tokens=6)
    stop_id = free.output_ids[2]
    r = client.generate("Tell me more.", max_tokens=6, stop_token_ids=[stop_id])
    assert r.finish_reason == "stop" and r.output_ids == free.output_ids[:3] and r.stop == stop_id
    assert free.text.startswith(r.text) and len(r.text) < len(free.text)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_safety_net_for_a_server_that_ignores_a_stop_id(server, protocol):
    """An end-of-text id the server does not know about (as with another model's eos list): the client
    cuts the streamed text and ids there, reports "stop", and stops reading."""
    with Client(url(server, protocol), protocol) as plain:
        free = plain.stream("Tell me more.", max_tokens=12).until_done()
    stop_id = free.output_ids[3]
    rules = StopRules(eos_token_ids=(0, stop_id, 92542), end_markers=("</s>",))
    with Client(url(server, protocol), protocol, stop_rules=rules) as c:
        s = c.stream("Tell me more.", max_tokens=12)
        text = "".join(s)
        assert s.result.finish_reason == "stop" and s.result.stop == stop_id
        assert s.result.output_ids == free.output_ids[:4]
        # the text is cut at the chunk that carried the stop id: under load the server's response pump
        # merges several tokens into one chunk (its text cannot be split by id), so it is a prefix
        assert free.text.startswith(text)
        assert c.generate("after", max_tokens=2).finish_reason == "length"


def test_metadata(client):
    meta = client.metadata()
    assert {"text_input", "image", "messages"} <= {i["name"] for i in meta["inputs"]}


def test_invalid_requests(client):
    with pytest.raises(InvalidRequest, match=r"image\[0\]"):
        client.generate("x", images=[b"this is not an image"], max_tokens=2)
    with pytest.raises(InvalidRequest, match=r"top_p=3.0: must be in \(0, 1\]"):
        client.generate("x", top_p=3)  # caught by the client, before sending
    assert client.generate("still fine", max_tokens=2).finish_reason == "length"


def test_cancel_mid_stream(client):
    s = client.stream("Go on and on.", max_tokens=48)
    got = []
    for delta in s:
        got.append(delta)
        if len(got) == 2:
            s.cancel()
    assert len(got) == 2
    assert s.result.finish_reason == "cancelled" and s.result.text == "".join(got)
    assert client.generate("after", max_tokens=2).finish_reason == "length"  # the client is still usable


def test_cancel_from_another_thread(client):
    s = client.stream("Go on and on.", max_tokens=48)
    first = next(iter(s))
    threading.Thread(target=client.cancel).start()
    rest = list(s)
    assert s.result.finish_reason == "cancelled"
    assert s.result.text == first + "".join(rest)
    assert len(s.result.output_ids) < 48


def test_leaving_the_loop_cancels(client):
    with client.stream("Go on.", max_tokens=48) as s:
        for _ in s:
            break
    assert s.result.finish_reason == "cancelled"
    assert client.generate("after", max_tokens=2).text


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_async_client(server, protocol):
    async def main():
        async with AsyncClient(url(server, protocol), protocol, timeout=120) as c:
            results = await asyncio.gather(*(c.generate("Same question.", max_tokens=5) for _ in range(3)))
            s = c.stream("Same question.", max_tokens=5)
            deltas = [d async for d in s]
            cancelled = c.stream("Go on and on.", max_tokens=48)
            n = 0
            async for _ in cancelled:
                n += 1
                if n == 2:
                    cancelled.cancel()
            chat = await c.chat([{"role": "user", "content": "hi"}], max_tokens=2)
            return results, deltas, s.result, cancelled.result, n, chat

    results, deltas, streamed, cancelled, n, chat = asyncio.run(main())
    assert len({r.text for r in results}) == 1
    assert "".join(deltas) == results[0].text == streamed.text
    assert cancelled.finish_reason == "cancelled" and n == 2
    assert chat.finish_reason == "length"
    with Client(url(server, protocol), protocol) as sync:
        assert sync.generate("Same question.", max_tokens=5).text == results[0].text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unreachable_and_unknown_model(server, protocol):
    with Client(f"localhost:{_free_port()}", protocol, timeout=10) as c:
        with pytest.raises(ServerUnavailable, match="cannot reach"):
            c.check_ready()
        with pytest.raises(ServerUnavailable):
            c.generate("x", max_tokens=2)
    with Client(url(server, protocol), protocol, model="nosuch") as c:
        assert not c.is_ready()
        with pytest.raises(ModelNotReady):
            c.check_ready()
        with pytest.raises(ModelNotReady):
            c.generate("x", max_tokens=2)


def test_url_image(client):
    from helpers import media_host

    buf = io.BytesIO()
    picture(4).save(buf, "PNG")
    body = buf.getvalue()
    with media_host({"/x.png": (body, "image/png")}) as (port, _):
        fetched = client.generate("Describe.", images=[f"http://127.0.0.1:{port}/x.png"], max_tokens=4)
    assert fetched.output_ids == client.generate("Describe.", images=[body], max_tokens=4).output_ids


def test_usage_reports_image_tokens(server):
    import io

    from PIL import Image

    from tritonvl.client import Client

    buf = io.BytesIO()
    Image.new("RGB", (112, 56), (10, 200, 30)).save(buf, format="PNG")
    with Client(server.grpc_url) as client:
        with_image = client.generate("What is this?", images=[buf.getvalue()], max_tokens=2, temperature=0.0)
        text_only = client.generate("What is this?", max_tokens=2, temperature=0.0)
    # 112x56 -> an 8x4 patch grid -> 8 tokens after the 2x2 merge
    assert with_image.usage.image_tokens == 8
    assert text_only.usage.image_tokens == 0
    assert with_image.usage.input_tokens - text_only.usage.input_tokens == 8 + 2  # + vision start/end
