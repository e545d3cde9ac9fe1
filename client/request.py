"""One request in protocol-neutral form, and its two encodings: gRPC tensors and HTTP generate JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidRequest
from .images import ImageOptions, ImageSource, for_grpc, for_http, load_image
from .params import SamplingParams
from .videos import VideoOptions, VideoSource, load_video

_NUMPY = {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": np.bool_, "BYTES": np.object_}


@dataclass
class Request:
    """A prompt (``text_input``) or chat ``messages``, images and videos each in prompt order, sampling."""

    params: SamplingParams
    prompt: str | None = None
    messages: list[dict] | None = None
    images: list[bytes | str] = field(default_factory=list)
    stream: bool = False
    videos: list[bytes | str] = field(default_factory=list)  # the `video` input (docs/VIDEO.md)

    def fields(self) -> dict[str, tuple[object, str]]:
        """Public input name -> (value, Triton datatype); images and videos excluded."""
        out: dict[str, tuple[object, str]] = {}
        if self.messages is not None:
            out["messages"] = (json.dumps(self.messages, ensure_ascii=False), "BYTES")
        else:
            out["text_input"] = (self.prompt or "", "BYTES")
        out.update(self.params.tensors())
        out["stream"] = (self.stream, "BOOL")
        # the server's default prefixes the prompt to non-streamed text (vLLM's convention)
        out["exclude_input_in_output"] = (True, "BOOL")
        return out

    def grpc_inputs(self, module) -> list:
        """``module``: tritonclient.grpc or tritonclient.grpc.aio (their InferInput)."""
        inputs = []
        for name, (value, dtype) in self.fields().items():
            inputs.append(_infer_input(module, name, value, dtype))
        if self.images:
            inputs.append(_infer_input(module, "image", [for_grpc(i) for i in self.images], "BYTES"))
        if self.videos:
            inputs.append(_infer_input(module, "video", [for_grpc(v) for v in self.videos], "BYTES"))
        return inputs

    def http_body(self) -> bytes:
        body = {name: value for name, (value, _) in self.fields().items()}
        if self.images:
            body["image"] = [for_http(i) for i in self.images]
        if self.videos:
            body["video"] = [for_http(v) for v in self.videos]
        return json.dumps(body, ensure_ascii=False).encode("utf-8")


def _infer_input(module, name: str, value, dtype: str):
    values = value if isinstance(value, list) else [value]
    if dtype == "BYTES":
        values = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
    arr = np.array([values], dtype=_NUMPY[dtype])  # [1, n]: the batch dimension first
    inp = module.InferInput(name, list(arr.shape), dtype)
    inp.set_data_from_numpy(arr)
    return inp


def build_request(prompt: str | None, images: Sequence[ImageSource] | ImageSource | None,
                  messages: list[dict] | None, params: SamplingParams, stream: bool,
                  image_options: ImageOptions, videos: Sequence[VideoSource] | VideoSource | None = None,
                  video_options: VideoOptions | None = None) -> Request:
    """Load the images and videos and normalize chat messages; raises InvalidRequest / ImageError / VideoError.

    ``videos``: one video (a path, bytes or a data: URI) or a list of videos; a video made of frames
    is a list inside that list (``videos=[[frame1, frame2, ...]]``).
    """
    images = _as_list(images)
    videos = _as_list(videos)
    if messages is None:
        if not isinstance(prompt, str):
            raise InvalidRequest(f"prompt: expected a string, got {type(prompt).__name__}")
        return Request(params, prompt=prompt, images=[load_image(i, image_options) for i in images], stream=stream,
                       videos=[load_video(v, video_options or VideoOptions()) for v in videos])
    msgs, loaded, clips = normalize_messages(messages, images, image_options, videos, video_options)
    return Request(params, messages=msgs, images=loaded, stream=stream, videos=clips)


def _as_list(items) -> list:
    if items is None:
        return []
    return list(items) if isinstance(items, (list, tuple)) else [items]


def normalize_messages(messages: list[dict], images: list[ImageSource], options: ImageOptions,
                       videos: Sequence[VideoSource] = (), video_options: VideoOptions | None = None,
                       ) -> tuple[list[dict], list[bytes | str], list[bytes | str]]:
    """OpenAI-style messages with images and videos inline -> messages with bare image / video parts, and
    the images and the videos in order.

    Image parts: ``{"type": "image", "image": SOURCE}``, ``{"type": "image_url", "image_url":
    {"url": URL}}`` (http(s) URLs are fetched here) or a bare ``{"type": "image"}``, which takes the
    next element of ``images``. Video parts: ``{"type": "video", "video": SOURCE}``, ``{"type":
    "video_url", "video_url": {"url": SOURCE}}`` or a bare ``{"type": "video"}`` taking the next of
    ``videos``; their other keys (fps, num_frames, max_pixels, ...) stay on the part for the server.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: expected a non-empty list of {role, content} dicts")
    pending, loaded, out = list(images), [], []
    pending_videos, clips = list(videos), []
    video_options = video_options or VideoOptions()
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise InvalidRequest(f"messages[{i}]: expected a dict with 'role' and 'content'")
        content = msg["content"]
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("image", "image_url"):
                    src = part.get("image") if kind == "image" else part.get("image_url")
                    src = src.get("url") if isinstance(src, dict) else src
                    if src is None:
                        if not pending:
                            raise InvalidRequest(f"messages[{i}].content[{j}]: image part without an image")
                        src = pending.pop(0)
                    loaded.append(load_image(src, options))
                    parts.append({"type": "image"})
                elif kind in ("video", "video_url"):
                    src = part.get(kind)
                    src = src.get("url") if kind == "video_url" and isinstance(src, dict) else src
                    if src is None:
                        if not pending_videos:
                            raise InvalidRequest(f"messages[{i}].content[{j}]: video part without a video")
                        src = pending_videos.pop(0)
                    clips.append(load_video(src, video_options))
                    parts.append({**{k: v for k, v in part.items() if k != kind}, "type": "video"})
                else:
                    parts.append(part)
            content = parts
        out.append({**msg, "content": content})
    if pending:
        raise InvalidRequest(f"images: {len(pending)} image(s) given but no image part of messages takes them")
    if pending_videos:
        raise InvalidRequest(f"videos: {len(pending_videos)} video(s) given but no video part of messages takes them")
    return out, loaded, clips
