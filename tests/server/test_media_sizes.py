"""media_sizes (issue 29) on the session's real tritonserver: each image's and video's size as sent and
as the model saw it, in the first response only, over HTTP /generate and /generate_stream, gRPC
streams of the public model and of the ensemble, the client's ``result.media``, the gateway's extra
field; and grounding end to end: a box the tiny model is made to answer (a regex grammar: its own
answers are gibberish) mapped to the original pixels, and ``tritonvl ground`` writing a PNG.

The server's pixel budget here is the test model's max_pixels (100 x 28 x 28 = 78400): a 1000x700
image is seen as 308x224 (Qwen's smart_resize), or as 252x168 under a request budget of 50000."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import openai
import pytest
import requests
from helpers import _inputs, data_uri, infer_http, make_image, stream_results
from PIL import Image
from videos import make_video

from tritonvl.client import Client
from tritonvl.client.grounding import COLORS, ground, grounding_prompt
from tritonvl.handlers.gateway.process import GatewayProcess
from tritonvl.handlers.tools.launcher import free_port

IMG = make_image(1000, 700, seed=29)
SMALL = make_image(64, 96, seed=30)
SEEN = {"width": 1000, "height": 700, "resized_width": 308, "resized_height": 224}
GEN = "/v2/models/{}/generate"


def tokens_of(size: dict, frames: int = 2) -> int:
    """Visual tokens of one image (or video) the model saw at this size: 14-pixel patches, 2x2 merged,
    two frames per temporal patch. Checks the reported size against what the llm counted."""
    return frames // 2 * (size["resized_height"] // 14) * (size["resized_width"] // 14) // 4


def test_http_generate_reports_both_sizes_and_the_request_budget_counts(server):
    out = infer_http(server.http_url, text_input="Where?", image=[IMG, SMALL], max_tokens=2,
                     mm_processor_kwargs=json.dumps({"max_pixels": 50000}))
    media = json.loads(out["media_sizes"])
    assert media["family"] == "qwen2_5_vl" and media["coordinates"] == "absolute"
    small = {"width": 64, "height": 96, "resized_width": 56, "resized_height": 84}  # within budget: rounded to 28s
    assert media["images"] == [{"width": 1000, "height": 700, "resized_width": 252, "resized_height": 168}, small]
    assert media["videos"] == []
    assert out["num_image_tokens"] == sum(tokens_of(s) for s in media["images"])  # the sizes the model saw


def test_text_only_request_has_empty_lists(server):
    out = infer_http(server.http_url, text_input="Hello", max_tokens=2)
    assert json.loads(out["media_sizes"]) == {"family": "qwen2_5_vl", "coordinates": "absolute", "images": [],
                                              "videos": []}


@pytest.mark.parametrize("model", ["qwen2_5_vl", "qwen2_5_vl_ensemble"])
def test_grpc_stream_first_response_only(server, model):
    responses = raw_stream(server.grpc_url, model, text_input="Stream it", image=[IMG], max_tokens=4, stream=True)
    whole = raw_stream(server.grpc_url, model, text_input="Stream it", image=[IMG], max_tokens=4)
    assert len(responses) >= 2
    media = [r.get("media_sizes") for r in responses]
    assert media[0] is not None and media[1:] == [None] * (len(media) - 1)
    assert json.loads(media[0])["images"] == [SEEN]
    assert len(whole) == 1 and json.loads(whole[0]["media_sizes"])["images"] == [SEEN]


def raw_stream(url: str, model: str, **fields) -> list[dict]:
    """Each response's outputs (media_sizes as text) of one gRPC stream."""
    import tritonclient.grpc as grpcclient

    out = []
    for result in stream_results(url, model, _inputs(grpcclient, fields)):
        names = {o.name for o in result.get_response().outputs}
        if names:
            out.append({n: result.as_numpy(n).reshape(-1)[0].decode() if n == "media_sizes" else True for n in names})
    return out


def test_http_sse_first_event_only(server):
    body = {"text_input": "Go", "image": [base64.b64encode(IMG).decode()], "max_tokens": 4, "stream": True}
    with requests.post(f"http://{server.http_url}{GEN.format('qwen2_5_vl')}_stream", json=body, stream=True,
                       timeout=120) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data:")]
    assert len(events) >= 2 and json.loads(events[0]["media_sizes"])["images"] == [SEEN]
    assert all("media_sizes" not in e for e in events[1:])


def test_video_sizes_and_frame_times(server):
    # 8 frames at 4 fps, sampled at the default 2 fps (at least 4 frames): frames 0, 2, 5, 7
    out = infer_http(server.http_url, text_input="What happens?", image=[IMG], video=[make_video(8, 112, 84, fps=4)],
                     max_tokens=2)
    media = json.loads(out["media_sizes"])
    assert media["images"] == [SEEN]
    (video,) = media["videos"]
    # 112x84 frames are under the video minimum of 128 tokens (qwen-vl-utils): scaled up, sides multiples of 28
    assert video == {"width": 112, "height": 84, "resized_width": 392, "resized_height": 280,
                     "frame_times": [0.0, 0.5, 1.25, 1.75]}
    assert out["num_image_tokens"] == tokens_of(SEEN) + tokens_of(video, frames=len(video["frame_times"]))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_client_result_media(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with Client(url, protocol, timeout=120) as client:
        result = client.generate("Where?", images=[IMG], max_tokens=2)
        with client.stream("Where?", images=[IMG], max_tokens=3) as stream:
            streamed = stream.until_done()
    for r in (result, streamed):
        assert r.media.family == "qwen2_5_vl" and r.media.coordinates == "absolute"
        (image,) = r.media.images
        assert image.original == (1000, 700) and image.resized == (308, 224) and r.media.videos == ()
    assert result.to_dict()["media"]["images"][0]["resized_width"] == 308


def test_a_box_the_model_answers_is_mapped_to_the_original_pixels(server):
    """Live end to end: the model is held to one answer by a regex grammar (the tiny model's own answers
    are gibberish); the box is on the 308x224 image the model saw, the helper puts it on the 1000x700."""
    answer = '```json\n[{"bbox_2d": [77, 56, 231, 168], "label": "the red car"}]\n```'
    with Client(server.grpc_url, timeout=120) as client:
        result = client.generate(grounding_prompt("the red car"), images=[IMG], max_tokens=64,
                                 structured_outputs={"regex": re.escape(answer)})
    assert result.text == answer
    (car,) = ground(result.text, result.media)
    assert car.label == "the red car" and car.bbox == pytest.approx((250.0, 175.0, 750.0, 525.0))


def test_tritonvl_ground_writes_the_boxes_on_a_copy(server, tmp_path):
    image = tmp_path / "street.png"
    image.write_bytes(IMG)
    out = tmp_path / "boxed.png"
    answer = '[{"bbox_2d": [77, 56, 231, 168], "label": "the red car"}, {"point_2d": [154, 112], "label": "centre"}]'
    proc = cli("ground", str(image), "the red car", "--url", server.grpc_url, "--out", str(out), "--answer", answer)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert {k: printed[k] for k in SEEN} == SEEN and printed["coordinates"] == "absolute"  # live sizes
    assert printed["boxes"] == [{"bbox_2d": [250.0, 175.0, 750.0, 525.0], "label": "the red car"},
                                {"point_2d": [500.0, 350.0], "label": "centre"}]
    drawn = Image.open(out).convert("RGB")
    assert drawn.size == (1000, 700)
    assert drawn.getpixel((750, 350)) == COLORS[0] and drawn.getpixel((500, 525)) == COLORS[0]  # box edges
    assert drawn.getpixel((500, 350)) == COLORS[1]  # the point
    assert drawn.getpixel((400, 300)) == Image.open(image).convert("RGB").getpixel((400, 300))  # inside: untouched


def test_tritonvl_ground_with_the_models_own_answer(server, tmp_path):
    """The whole verb live: the tiny model's answer has no box, so exit status 1 and an empty list; the
    copy is still written."""
    image = tmp_path / "street.png"
    image.write_bytes(IMG)
    proc = cli("ground", str(image), "the red car", "--url", server.grpc_url, "--out", str(tmp_path / "o.png"),
               "--max-tokens", "6")
    printed = json.loads(proc.stdout)
    assert {k: printed[k] for k in SEEN} == SEEN and printed["answer"] and printed["boxes"] == []
    assert proc.returncode == 1 and "no box or point" in proc.stderr
    assert Image.open(tmp_path / "o.png").size == (1000, 700)


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tritonvl.client.cli", *argv], capture_output=True, text=True,
                          timeout=180, check=False)


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    with GatewayProcess(server.grpc_url, free_port(), log_path=str(log)) as gw:
        yield gw
        assert gw.proc.poll() is None, "the gateway died during the tests"


def test_gateway_extra_field(gateway):
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(IMG)}},
                                             {"type": "text", "text": "Where?"}]}]
    whole = sdk.chat.completions.create(model="qwen2_5_vl", messages=messages, max_tokens=2)
    assert whole.model_extra["media_sizes"]["images"] == [SEEN]
    chunks = list(sdk.chat.completions.create(model="qwen2_5_vl", messages=messages, max_tokens=3, stream=True))
    assert chunks[0].model_extra["media_sizes"]["images"] == [SEEN]
    assert all("media_sizes" not in (c.model_extra or {}) for c in chunks[1:])
