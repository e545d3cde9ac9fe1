"""Chat messages in, prompt token ids out (with image placeholders expanded).

Two request shapes: ``text_input`` plus ``image`` (one user turn: the images in order, then the
text, as Qwen's examples do) or ``messages`` (OpenAI chat JSON, which overrides ``text_input``).
"""

from __future__ import annotations

import json
import re

import jinja2
import jinja2.meta

from tritonvl.client.rules.errors import InvalidArgument, checked_text
from tritonvl.client.rules.structured import load_json
from tritonvl.client.rules.tools import check_tools

ROLES = ("system", "user", "assistant", "tool")


def messages_from_text(text: str, num_images: int, num_videos: int = 0) -> list[dict]:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "video"} for _ in range(num_videos)]
    content += [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def parse_messages(raw: str, tensor_images: list, pixels: list | None = None,
                   videos: VideoParts | None = None) -> tuple[list[dict], list]:
    """Validate OpenAI-style messages JSON.

    Returns messages normalized for the chat template (image parts become ``{"type": "image"}``)
    and the image sources in prompt order: ``image_url`` parts carry their URL string, as do
    Qwen-style ``{"type": "image", "image": "<data URI>"}`` parts; bare ``{"type": "image"}``
    parts take the next element of the ``image`` tensor. The sources are checked later, as images.
    ``pixels``, when given, receives one dict per image: the part's own min_pixels / max_pixels
    keys and where they were (Qwen's per-image budget, checked by preprocess.pixels).
    ``videos``, when given, takes ``video_url`` / ``video`` parts (else they are refused).
    """
    msgs = load_json(raw, "messages")  # at most MAX_JSON_DEPTH levels of arrays and objects
    if not isinstance(msgs, list) or not msgs:
        raise InvalidArgument("messages: expected a non-empty JSON array of {role, content} objects")
    out, images = [], []
    pending = list(tensor_images)
    for i, msg in enumerate(msgs):
        where = f"messages[{i}]"
        calls = msg.get("tool_calls") if isinstance(msg, dict) and msg.get("role") == "assistant" else None
        if not isinstance(msg, dict) or "role" not in msg or ("content" not in msg and not calls):
            raise InvalidArgument(f"{where}: expected an object with 'role' and 'content'")
        role, content = msg["role"], msg.get("content")
        if role not in ROLES:
            raise InvalidArgument(f"{where}.role: {role!r} is not one of {ROLES}")
        extra = _tool_keys(msg, role, where)
        if content is None and calls:  # OpenAI: an assistant turn that only calls tools has null content
            content = ""
        if isinstance(content, str):
            out.append({"role": role, "content": _text(content, f"{where}.content"), **extra})
            continue
        if not isinstance(content, list):
            raise InvalidArgument(f"{where}.content: expected a string or a list of parts")
        parts = [_part(part, f"{where}.content[{j}]", pending, images, pixels, videos)
                 for j, part in enumerate(content)]
        if role != "user" and any(p["type"] in ("image", "video") for p in parts):
            raise InvalidArgument(f"{where}: images are only allowed in user messages (videos too)")
        if role == "tool":  # a tool's result as one text (the templates write it as a string)
            out.append({"role": role, "content": "".join(p["text"] for p in parts), **extra})
            continue
        out.append({"role": role, "content": parts, **extra})
    if pending:
        raise InvalidArgument(
            f"image: {len(pending)} image(s) given but not referenced by an image part of messages")
    if videos is not None and videos.pending:
        raise InvalidArgument(
            f"video: {len(videos.pending)} video(s) given but not referenced by a video part of messages")
    if out[-1]["role"] == "assistant":
        raise InvalidArgument("messages: the last message must not be from the assistant")
    return out, images


class VideoParts:
    """Video parts of messages: ``pending`` elements of the ``video`` input (taken by bare
    ``{"type": "video"}`` parts, in order), ``found`` (element, the part's own keys, where) per video."""

    def __init__(self, tensor_videos: list) -> None:
        self.pending = list(tensor_videos)
        self.found: list[tuple[object, dict, str]] = []

    def take(self, part: dict, kind: str, where: str) -> dict:
        if kind == "video_url":
            url = part.get("video_url")
            item = url.get("url") if isinstance(url, dict) else url
            if not isinstance(item, str) or not item:
                raise InvalidArgument(f"{where}.video_url: expected {{'url': 'data:video/...;base64,...'}}")
        elif part.get("video") is not None:
            item = part["video"]
            if not (isinstance(item, str) and item) and not isinstance(item, list):
                raise InvalidArgument(f"{where}.video: expected a data: URI, base64, or a list of frame images")
        elif self.pending:
            item = self.pending.pop(0)
        else:
            raise InvalidArgument(f"{where}: a video part without data needs an element of the video input")
        self.found.append((item, part, where))
        return {"type": "video"}


def _tool_keys(msg: dict, role: str, where: str) -> dict:
    """The tool-call keys of one message, checked: an assistant's ``tool_calls`` (each one's
    ``function.arguments`` JSON text becomes an object, as the chat templates write it with ``tojson``)
    and a tool result's ``tool_call_id`` / ``name``."""
    extra: dict = {}
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if msg.get(key) is not None:
                if not isinstance(msg[key], str):
                    raise InvalidArgument(f"{where}.{key}: expected a string")
                extra[key] = msg[key]
        return extra
    calls = msg.get("tool_calls")
    if calls is None or calls == []:
        return extra
    if role != "assistant":
        raise InvalidArgument(f"{where}.tool_calls: only assistant messages carry tool calls")
    if not isinstance(calls, list):
        raise InvalidArgument(f"{where}.tool_calls: expected a list of {{id, type, function}} objects")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidArgument(f"{at}: expected {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            args = load_json(args or "{}", f"{at}.function.arguments")
        if not isinstance(args, dict):
            raise InvalidArgument(f"{at}.function.arguments: expected a JSON object (as text or an object)")
        one = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            one["id"] = call["id"]
        out.append(one)
    extra["tool_calls"] = out
    return extra


def parse_tools(raw: str | None) -> list[dict] | None:
    """The ``tools`` input (a JSON list of OpenAI function tools), checked; None when absent or empty."""
    if raw is None or not raw.strip():
        return None
    tools = check_tools(load_json(raw, "tools"))
    return tools or None


def _part(part, where: str, pending: list, images: list, pixels: list | None, videos: VideoParts | None) -> dict:
    """One content part, normalized; an image part appends its source to ``images``."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return {"type": "text", "text": _text(part.get("text"), f"{where}.text")}
    if kind in ("video_url", "video") and videos is not None:
        return videos.take(part, kind, where)
    if kind in ("image_url", "image") and pixels is not None:
        pixels.append({"where": where, **{k: part[k] for k in ("min_pixels", "max_pixels") if k in part}})
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url:
            raise InvalidArgument(f"{where}.image_url: expected {{'url': 'data:image/...;base64,...'}}")
        images.append(url)
    elif kind == "image" and part.get("image") is not None:
        if not isinstance(part["image"], str) or not part["image"]:
            raise InvalidArgument(f"{where}.image: expected a data: URI or base64 string")
        images.append(part["image"])
    elif kind == "image":
        if not pending:
            raise InvalidArgument(f"{where}: an image part without a URL needs an element of the image input")
        images.append(pending.pop(0))
    else:
        known = "'text', 'image_url', 'image'" + (", 'video_url', 'video'" if videos is not None else "")
        raise InvalidArgument(f"{where}.type: {kind!r} is not one of {known}")
    return {"type": "image"}


def _text(value, where: str) -> str:
    """A message's text: a ``str`` with a UTF-8 form."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: expected a string")
    return checked_text(value, where)


def text_bytes(messages: list[dict]) -> int:
    """UTF-8 bytes of all the text in normalized messages (bounds the tokenizer's work)."""
    total = 0
    for msg in messages:
        content = msg["content"]
        parts = [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]
        total += sum(len(t.encode("utf-8")) for t in parts)
        total += sum(len(json.dumps(c, ensure_ascii=False).encode("utf-8")) for c in msg.get("tool_calls", ()))
    return total


def template_reads(source: str, name: str) -> bool:
    """Whether a Jinja template reads the variable ``name`` from its context."""
    try:
        return name in jinja2.meta.find_undeclared_variables(
            jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source))
    except jinja2.TemplateError:
        return re.search(rf"\b{re.escape(name)}\b", source) is not None


class PromptBuilder:
    """Applies the model's chat template and expands each ``<|image_pad|>`` to its token count."""

    def __init__(self, tokenizer, image_token_id: int, video_token_id: int | None = None,
                 vision_start_id: int | None = None, vision_end_id: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        self.video_token_id = video_token_id
        self.video_token = tokenizer.convert_ids_to_tokens(video_token_id) if video_token_id is not None else None
        self.frame_marks = (tokenizer.convert_ids_to_tokens(vision_start_id or 0),
                            tokenizer.convert_ids_to_tokens(vision_end_id or 0))

    def video_text(self, tokens: int, patch_seconds: list[float] | None = None) -> str:
        """What one video's placeholder becomes: its tokens, or (Qwen3-VL, ``patch_seconds`` given) per
        temporal patch ``<t seconds>`` then that patch's tokens between vision start and end marks,
        as transformers' Qwen3VLProcessor writes it."""
        if patch_seconds is None:
            return self.video_token * tokens
        start, end = self.frame_marks
        per_patch = tokens // len(patch_seconds)
        return "".join(f"<{t:.1f} seconds>{start}{self.video_token * per_patch}{end}" for t in patch_seconds)

    @property
    def supports_tools(self) -> bool:
        """Whether the model's chat template renders tools: its source reads a ``tools`` variable
        (Qwen3-VL's and Qwen2.5's text templates do; Qwen2-VL's and Qwen2.5-VL's published ones do not)."""
        if not hasattr(self, "_supports_tools"):
            self._supports_tools = template_reads(self.template_source(tools=True), "tools")
        return self._supports_tools

    def template_source(self, tools: bool = False) -> str:
        """The chat template apply_chat_template uses (of a dict of named ones: ``tool_use`` when tools
        are given and there is one, else ``default``, as transformers picks)."""
        source = getattr(self.tokenizer, "chat_template", None) or ""
        if isinstance(source, dict):
            source = source.get("tool_use") if tools and "tool_use" in source else source.get("default", "")
        return source or ""

    def build(self, messages: list[dict], image_tokens: list[int], videos: list[str] = (),
              tools: list[dict] | None = None) -> list[int]:
        calls = next((i for i, m in enumerate(messages) if m.get("tool_calls")), None)
        if (tools or calls is not None) and not self.supports_tools:
            where = "tools" if tools else f"messages[{calls}].tool_calls"
            raise InvalidArgument(f"{where}: this model's chat template does not support tools (it never reads a "
                                  "'tools' variable); serve a model whose template does, e.g. Qwen3-VL")
        kwargs = {"tools": tools} if tools else {}
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- jinja errors from a model's own template
            raise InvalidArgument(f"messages: the chat template refused them ({exc})") from None
        return self.expand(text, image_tokens, videos)

    def expand(self, text: str, image_tokens: list[int], videos: list[str] = ()) -> list[int]:
        """A finished prompt (template applied, or raw with one ``<|image_pad|>`` per image and one
        ``<|video_pad|>`` per video) -> ids, each image placeholder repeated to its token count, each
        video's replaced by its ``video_text``."""
        if self.video_token is not None and (videos or self.video_token in text):
            return self._expand_both(text, list(image_tokens), list(videos))
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(image_tokens):
            raise InvalidArgument(
                f"the prompt holds {len(pieces) - 1} image placeholders for {len(image_tokens)} images "
                f"(with the chat template, do not put {self.image_token} in the text; without it, put "
                f"<|vision_start|>{self.image_token}<|vision_end|> once per image)")
        expanded = pieces[0] + "".join(self.image_token * n + p for n, p in zip(image_tokens, pieces[1:]))
        ids = self.tokenizer.encode(expanded, add_special_tokens=False)
        if sum(1 for t in ids if t == self.image_token_id) != sum(image_tokens):
            raise InvalidArgument(f"the text must not contain the image placeholder token {self.image_token}")
        return ids

    def _expand_both(self, text: str, image_tokens: list[int], videos: list[str]) -> list[int]:
        pieces = re.split(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})", text)
        marks = pieces[1::2]
        for token, counts, what in ((self.image_token, image_tokens, "image"), (self.video_token, videos, "video")):
            if marks.count(token) != len(counts):
                raise InvalidArgument(
                    f"the prompt holds {marks.count(token)} {what} placeholders for {len(counts)} {what}s (with the "
                    f"chat template, do not put {token} in the text; without it, put "
                    f"<|vision_start|>{token}<|vision_end|> once per {what})")
        left = {self.image_token: iter([self.image_token * n for n in image_tokens]), self.video_token: iter(videos)}
        expanded = pieces[0] + "".join(next(left[m]) + p for m, p in zip(marks, pieces[2::2]))
        ids = self.tokenizer.encode(expanded, add_special_tokens=False)
        if (sum(1 for t in ids if t == self.image_token_id) != sum(image_tokens)
                or sum(1 for t in ids if t == self.video_token_id) != sum(v.count(self.video_token) for v in videos)):
            raise InvalidArgument(f"the text must not contain the placeholder tokens {self.image_token} / "
                                  f"{self.video_token}")
        return ids
