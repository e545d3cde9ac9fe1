"""Videos through the OpenAI gateway (the official openai SDK, sync and async, stream and not, and the
/describe-image/ upload) in front of a real tritonserver with small video budgets: greedy text equals
the same request sent straight to the server (whose parity with generate() is tests/server/test_video.py);
bad videos are 400s carrying the server's message, with the gateway and the server still ready."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
import requests
from helpers import data_uri, infer_http, make_image
from videos import frame_list, make_video

from tritonvl.handlers.gateway.process import GatewayProcess
from tritonvl.handlers.tools.launcher import free_port

MAX = 8
CLIP = make_video(n=8, width=112, height=84, fps=8, seed=71)
WEBM = make_video(n=6, width=84, height=112, fps=4, fmt="webm", seed=72)
NOT_A_VIDEO = b"\x00\x01not a video" * 40


@pytest.fixture(scope="module")
def stack(video_server, tmp_path_factory):
    """(the session's video server: tests/conftest.py VIDEO_SETTINGS, this module's gateway before it)."""
    logs = tmp_path_factory.mktemp("gateway_video")
    with GatewayProcess(video_server.grpc_url, free_port(), log_path=str(logs / "gateway.log")) as gw:
        yield video_server, gw
        assert gw.proc.poll() is None, "the gateway died during the tests"


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack[1].url}/v1", api_key="unused", max_retries=0, timeout=120)


def direct(srv, messages: list[dict]) -> dict:
    """The same messages straight to the server's generate endpoint (greedy)."""
    return infer_http(srv.http_url, text_input="", messages=json.dumps(messages), temperature=0.0, max_tokens=MAX,
                      exclude_input_in_output=True)


def video_url(data: bytes, mime: str = "video/mp4", **keys) -> dict:
    return {"type": "video_url", "video_url": {"url": data_uri(data, mime)}, **keys}


def turn(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def test_video_url_equals_the_server(stack, client):
    srv, _ = stack
    messages = turn({"type": "text", "text": "What happens in the clip?"}, video_url(CLIP))
    out = client.chat.completions.create(model="qwen2_5_vl", messages=messages, max_tokens=MAX, temperature=0)
    want = direct(srv, messages)
    assert out.choices[0].message.content == want["text_output"]
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == len(want["output_ids"]) == MAX
    assert out.usage.prompt_tokens == want["num_input_tokens"]


def test_mm_processor_kwargs_extra_reaches_the_server(stack, client):
    """vLLM's extra_body mm_processor_kwargs (fps / num_frames for every video) goes to the server's input."""
    srv, _ = stack
    clip = make_video(n=16, width=112, height=84, fps=8, seed=75)
    messages = turn(video_url(clip), {"type": "text", "text": "Count the frames."})
    out = client.chat.completions.create(model="qwen2_5_vl", messages=messages, max_tokens=MAX, temperature=0,
                                         extra_body={"mm_processor_kwargs": {"num_frames": 4, "do_sample_frames": True}})
    want = infer_http(srv.http_url, text_input="", messages=json.dumps(messages), temperature=0.0, max_tokens=MAX,
                      exclude_input_in_output=True, mm_processor_kwargs=json.dumps({"num_frames": 4}))
    default = direct(srv, messages)  # the default 2 fps of this 2 s clip: 4 frames
    assert out.choices[0].message.content == want["text_output"]
    assert out.usage.prompt_tokens == want["num_input_tokens"]
    fewer = client.chat.completions.create(model="qwen2_5_vl", messages=messages, max_tokens=MAX, temperature=0,
                                           extra_body={"mm_processor_kwargs": {"num_frames": 2}})
    assert fewer.usage.prompt_tokens < default["num_input_tokens"]
    with pytest.raises(openai.BadRequestError, match="mm_processor_kwargs"):
        client.chat.completions.create(model="qwen2_5_vl", messages=messages, max_tokens=MAX,
                                       extra_body={"mm_processor_kwargs": {"num_frames": "many"}})


def test_stream_frames_and_sampling_keys(stack, client):
    """A frame list part with its own fps, a webm with num_frames, an image and a system turn, streamed."""
    srv, _ = stack
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "video", "video": json.loads(frame_list(5, seed=73)), "fps": 1},
                    video_url(WEBM, "video/webm", num_frames=4, max_pixels=12 * 28 * 28),
                    {"type": "image_url", "image_url": {"url": data_uri(make_image(90, 70, seed=74))}},
                    {"type": "text", "text": "Compare them."}]}]
    chunks = list(client.chat.completions.create(model="qwen2_5_vl", messages=messages, max_tokens=MAX,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    want = direct(srv, messages)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want["text_output"]
    assert chunks[-1].usage.completion_tokens == MAX and chunks[-1].usage.prompt_tokens == want["num_input_tokens"]


def test_async_concurrent_videos_and_an_image(stack):
    srv, gw = stack
    jobs = [turn(video_url(make_video(n=8 + 2 * i, fps=8, seed=75 + i)), {"type": "text", "text": "Go."})
            for i in range(3)]
    jobs.append(turn({"type": "image_url", "image_url": {"url": data_uri(make_image(80, 60, seed=79))}},
                     {"type": "text", "text": "Go."}))

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(c.chat.completions.create(model="qwen2_5_vl", messages=m, max_tokens=MAX,
                                                                    temperature=0) for m in jobs))

    outs = asyncio.run(run())
    assert [o.choices[0].message.content for o in outs] == [direct(srv, m)["text_output"] for m in jobs]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("part,words", [
    (video_url(NOT_A_VIDEO), "not a decodable video"),
    ({"type": "video_url", "video_url": {"url": "https://example.com/clip.mp4"}}, "URLs are not accepted for videos"),
    (video_url(make_video(n=124, width=56, height=56, fps=4)), "longer than the 30 s limit"),
    ({"type": "video", "video": []}, "frame list is empty"),
    (video_url(CLIP, num_frames=4, fps=2), "not both"),
])
def test_bad_video_is_a_400_with_the_servers_message(stack, client, part, words, stream):
    srv, gw = stack
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="qwen2_5_vl", messages=turn(part, {"type": "text", "text": "x"}),
                                       max_tokens=2, stream=stream)
    assert info.value.status_code == 400 and words in info.value.message, info.value.message
    assert requests.get(f"{gw.url}/health", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"http://{srv.http_url}/v2/health/ready", timeout=10).status_code == 200


def describe(gw, file: tuple, **form) -> requests.Response:
    return requests.post(f"{gw.url}/describe-image/", files={"file": file}, data={"max_tokens": MAX, **form},
                         timeout=120)


def test_describe_upload_of_a_video(stack):
    """A video/* upload, or a video file name with no telling content type, goes as a video."""
    srv, gw = stack
    r = describe(gw, ("clip.mp4", CLIP, "video/mp4"))
    assert r.status_code == 200, r.text
    want = direct(srv, turn({"type": "video_url", "video_url": {"url": data_uri(CLIP, "video/mp4")}},
                            {"type": "text", "text": "Describe this video."}))
    assert r.json()["description"] == want["text_output"]
    assert r.json()["usage"]["prompt_tokens"] == want["num_input_tokens"]
    r = describe(gw, ("clip.webm", WEBM, "application/octet-stream"), prompt="What moves?")
    want = direct(srv, turn(video_url(WEBM, "video/webm"), {"type": "text", "text": "What moves?"}))
    assert r.status_code == 200 and r.json()["description"] == want["text_output"], r.text


def test_describe_upload_of_a_bad_video(stack):
    srv, gw = stack
    r = describe(gw, ("clip.mp4", NOT_A_VIDEO, "video/mp4"))
    assert r.status_code == 400 and "not a decodable video" in r.json()["error"]["message"], r.text
    r = describe(gw, ("clip.mp4", CLIP[:400], "video/mp4"))  # truncated
    assert r.status_code == 400 and "messages[0].content[0]" in r.json()["error"]["message"], r.text
    assert describe(gw, ("p.png", make_image(40, 30, seed=80), "image/png")).status_code == 200  # images still
    assert requests.get(f"{gw.url}/health", timeout=10).json() == {"status": "ok"}
