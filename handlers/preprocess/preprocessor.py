"""The `preprocess` step: request tensors in, model inputs out.

Decodes and checks images, runs the model's own image processor (pixel values identical to
transformers'), builds the prompt with the chat template, and validates every sampling parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tritonvl.client.rules.errors import InvalidArgument, checked_text
from tritonvl.client.rules.sampling import MAX_TOP_LOGPROBS, TENSOR_FIELDS
from tritonvl.client.rules.structured import GrammarSpec, parse_guide_tensors
from tritonvl.handlers.engine.grammar.xgr import check_syntax
from tritonvl.handlers.modelinfo import ModelInfo, load_model_info
from tritonvl.handlers.options import RequestOptions, fit_to_context
from tritonvl.handlers.params import PreprocessParams, typed
from tritonvl.handlers.preprocess.clipcache import ClipCache
from tritonvl.handlers.preprocess.images import each_image, limits_from_params
from tritonvl.handlers.preprocess.media import media_sizes
from tritonvl.handlers.preprocess.pixels import (
    VIDEO_KEYS,
    PixelBudget,
    budget_for,
    deployment_budget,
    parse_kwargs,
)
from tritonvl.handlers.preprocess.prompt import (
    PromptBuilder,
    VideoParts,
    messages_from_text,
    parse_messages,
    parse_tools,
    text_bytes,
)
from tritonvl.handlers.preprocess.video import (
    in_prompt_order,
    load_videos,
    video_geometry,
    video_limits_from_params,
)
from tritonvl.handlers.sampling import SamplingParams, build_sampling_params, sets_max_tokens


@dataclass
class RawRequest:
    """One request as read from Triton tensors (strings still bytes)."""

    text_input: bytes | None = None
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)  # elements of the `video` input (docs/VIDEO.md)
    messages: bytes | None = None
    sampling_parameters: bytes | None = None
    sampling: dict = field(default_factory=dict)  # explicit tensors, SamplingParams field names
    stream: bool = False
    exclude_input_in_output: bool = False
    guide_type: bytes | None = None  # TensorRT-LLM's guided_decoding_guide_type / _guide tensors
    guide: bytes | None = None
    apply_chat_template: bool = True  # false: text_input is the whole prompt (images: the caller's placeholders)
    mm_processor_kwargs: bytes | None = None  # JSON {min_pixels, max_pixels} for every image (vLLM's name)
    return_logprobs: bool = False
    top_logprobs: int | None = None
    tools: bytes | None = None  # JSON list of OpenAI function tools, rendered by the chat template


def raw_request(inputs) -> RawRequest:
    """The public request's tensors as one RawRequest. ``inputs`` reads a tensor by name: ``scalar``,
    ``strings`` (a list of its elements) and ``array`` (tritonserver.adapter.Inputs)."""
    sampling = {}  # the fields with a tensor of their own (client/rules/sampling.py FIELDS), by field name
    for name, f in TENSOR_FIELDS.items():
        if f.kind == "strs":  # bytes: decoded strictly below (invalid UTF-8 is an error)
            sampling[f.name] = inputs.strings(name) or None
        elif f.kind == "ints":
            ids = inputs.array(name)
            sampling[f.name] = None if ids is None or not ids.size else [int(x) for x in ids.reshape(-1)]
        else:
            sampling[f.name] = inputs.scalar(name)
    return RawRequest(
        text_input=inputs.scalar("text_input"),
        images=inputs.strings("image"),
        videos=inputs.strings("video"),
        messages=inputs.scalar("messages"),
        sampling_parameters=inputs.scalar("sampling_parameters"),
        sampling=sampling,
        stream=bool(inputs.scalar("stream") or False),
        exclude_input_in_output=bool(inputs.scalar("exclude_input_in_output") or False),
        apply_chat_template=inputs.scalar("apply_chat_template") is not False,  # absent: true
        guide_type=inputs.scalar("guided_decoding_guide_type"),
        guide=inputs.scalar("guided_decoding_guide"),
        mm_processor_kwargs=inputs.scalar("mm_processor_kwargs"),
        return_logprobs=bool(inputs.scalar("return_logprobs") or False),
        top_logprobs=inputs.scalar("top_logprobs"),
        tools=inputs.scalar("tools"),
    )


@dataclass
class ModelInputs:
    input_ids: np.ndarray  # int32 [L]
    pixel_values: np.ndarray  # float32 [patches, patch_dim]
    image_grid_thw: np.ndarray  # int64 [images, 3]
    request: str  # JSON: sampling params and response options (see RequestOptions)
    media_sizes: str = "{}"  # JSON: each image's and video's size, sent and as the model saw it (media.py)


def utf8(value: bytes | None, name: str) -> str | None:
    return None if value is None else checked_text(value, name)


class Preprocessor:
    def __init__(self, model_dir: str, params: PreprocessParams | None = None) -> None:
        """``params``: the preprocess model's typed parameters (handlers/params.py), taken whole; None: the
        defaults (``params.typed("preprocess", ...)`` changes some)."""
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.info: ModelInfo = load_model_info(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
        info = self.info
        self.prompts = PromptBuilder(self.tokenizer, info.image_token_id, info.video_token_id,
                                     info.vision_start_token_id, info.vision_end_token_id)
        self.video_geometry = geo = video_geometry(self.image_processor)
        p = params or typed("preprocess")
        self.video_limits = video_limits_from_params(p).resolved(geo.patch * geo.merge)
        self.clips = ClipCache(p.video_cache_bytes)
        self.limits = limits_from_params(p)
        self.max_model_len = p.max_model_len or self.info.max_position_embeddings
        self.sampling_defaults = {"max_tokens": p.default_max_tokens, **self.info.sampling_defaults}
        self.clamp_max_tokens = p.clamp_max_tokens
        self.budget = deployment_budget(self.image_processor.size, p.min_pixels, p.max_pixels)

    def process(self, raw: RawRequest) -> ModelInputs:
        """One request's tensors -> the llm's prompt ids, the vision step's pixel rows and the options."""
        text = utf8(raw.text_input, "text_input")
        messages, sources, parts, videos = self.conversation(raw, text)
        tools = parse_tools(utf8(raw.tools, "tools"))
        if tools and not raw.apply_chat_template:
            raise InvalidArgument("tools: the chat template renders them; apply_chat_template=false takes none")
        request_pixels = parse_kwargs(utf8(raw.mm_processor_kwargs, "mm_processor_kwargs"))
        budgets = [budget_for(self.budget, request_pixels, p, p["where"]) for p in parts]
        logprobs = self.logprobs(raw)
        size = text_bytes(messages) + len(raw.tools or b"")
        if size > self.limits.max_prompt_bytes:  # refused before the tokenizer spends seconds on it
            raise InvalidArgument(f"prompt: {size} bytes of text is over the max_prompt_bytes limit "
                                  f"({self.limits.max_prompt_bytes}; max_model_len={self.max_model_len} tokens)")
        sampling, sampling_json = self.sampling(raw)
        sizes: list[tuple[int, int]] = []  # (width, height) of each decoded image
        pixel_values, grid = self.pixels(each_image(sources, self.limits), budgets, sizes)  # one decoded at a time
        clips = load_videos(videos.found, self.video_limits, self.limits, self.video_geometry,
                            {k: v for k, v in request_pixels.items() if k in VIDEO_KEYS}, self.clips,
                            max_tokens=self.max_model_len)
        media = media_sizes(self.info.family, self.info.patch_size, sizes, grid, clips)  # grid: images only here
        ids = self.prompt_ids(raw, messages, text, grid, clips, tools)
        if clips:  # the vision step's rows in prompt order: images and videos as their placeholders come
            pixel_values, grid = in_prompt_order(np.asarray(ids), self.info, pixel_values, grid, clips)
        # a max_tokens the request set is never cut silently (vLLM's rule), unless the deployment says so
        clamp = self.clamp_max_tokens or not sets_max_tokens(raw.sampling, sampling_json)
        fit_to_context(len(ids), sampling, self.max_model_len, clamp,
                       " (preprocess parameter clamp_max_tokens=true cuts it instead)")
        # second_per_grid_ts: Qwen2.5-VL's mRoPE time step per video (other families' positions ignore it)
        options = RequestOptions(sampling, raw.stream, raw.exclude_input_in_output, text or "", clamp, logprobs,
                                 [c.second_per_grid_t for c in clips] if self.info.family == "qwen2_5_vl" else [])
        return ModelInputs(np.asarray(ids, dtype=np.int32), pixel_values, grid, options.to_json(), media)

    def conversation(self, raw: RawRequest, text: str | None) -> tuple[list, list, list[dict], VideoParts]:
        """The request's messages (from ``messages``, else one user turn of ``text_input``), its image
        sources with each one's message-part keys, and its videos."""
        messages_json = utf8(raw.messages, "messages")
        if not raw.apply_chat_template and messages_json:
            raise InvalidArgument("apply_chat_template=false takes a raw text_input, not messages")
        parts: list[dict] = []  # per image: its message part's pixel keys
        videos = VideoParts(raw.videos)
        if messages_json:
            messages, sources = parse_messages(messages_json, raw.images, parts, videos)
        elif text is None:
            raise InvalidArgument("text_input: required (or give messages)")
        else:
            messages, sources = messages_from_text(text, len(raw.images), len(raw.videos)), list(raw.images)
            parts = [{"where": f"image[{i}]"} for i in range(len(sources))]
            videos.found = [(v, {}, f"video[{i}]") for i, v in enumerate(videos.pending)]
        return messages, sources, parts, videos

    def sampling(self, raw: RawRequest) -> tuple[SamplingParams, str | None]:
        """The request's sampling fields (defaults < JSON < tensors, structured output checked) and its
        ``sampling_parameters`` JSON text."""
        guide = parse_guide_tensors(raw.guide_type, raw.guide)
        if guide is not None:
            raw.sampling["structured_outputs"] = guide
        sampling_json = utf8(raw.sampling_parameters, "sampling_parameters")
        sampling = build_sampling_params(raw.sampling, sampling_json, self.sampling_defaults, self.info.vocab_size)
        check_syntax(GrammarSpec.from_dict(sampling.structured_outputs))  # the llm step compiles it
        return sampling, sampling_json

    def prompt_ids(self, raw: RawRequest, messages: list, text: str | None, grid: np.ndarray, clips: list,
                   tools: list[dict] | None = None) -> list[int]:
        """Token ids with each image's and video's placeholders expanded to its visual token count."""
        tokens = [int(np.prod(g)) // self.info.merge_unit for g in grid]
        timed = self.info.timestamps_videos  # Qwen3-VL: a <t seconds> text before each temporal patch
        clip_texts = [self.prompts.video_text(int(np.prod(c.grid)) // self.info.merge_unit,
                                              c.patch_seconds() if timed else None) for c in clips]
        ids = (self.prompts.build(messages, tokens, clip_texts, tools) if raw.apply_chat_template
               else self.prompts.expand(text, tokens, clip_texts))
        if not ids:
            raise InvalidArgument("text_input: an empty raw prompt (apply_chat_template=false) has no tokens")
        return ids

    @staticmethod
    def logprobs(raw: RawRequest) -> int:
        """-1 (off) or how many top alternatives each token's logprob entry lists."""
        top = raw.top_logprobs
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs={top}: must be between 0 and {MAX_TOP_LOGPROBS}")
        if not raw.return_logprobs:
            if top:
                raise InvalidArgument(f"top_logprobs={top} needs return_logprobs=true")
            return -1
        return top or 0

    def pixels(self, images, budgets: list[PixelBudget] | None = None,
               sizes: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Qwen's image processor (its smart_resize) with each image's pixel budget, one image at a time
        (rows concatenated in image order: the processor treats images one by one, so they are one
        call's). ``images`` may be an iterator that decodes each only when asked (``each_image``): the
        decoded image is dropped before the next is asked for, so one is held at a time. ``sizes``, if
        given, gets each image's (width, height)."""
        values, grids = [], []
        for i, image in enumerate(images):
            budget = budgets[i] if budgets else self.budget
            if sizes is not None:
                sizes.append(image.size)
            try:
                out = self.image_processor(images=[image], size=budget.size(), return_tensors="np")
            except ValueError as exc:
                raise InvalidArgument(f"image: refused by Qwen's size rules ({exc})") from None
            del image
            values.append(np.asarray(out["pixel_values"], dtype=np.float32))
            grids.append(np.asarray(out["image_grid_thw"], dtype=np.int64))
        if not values:
            return np.zeros((0, self.info.patch_dim), np.float32), np.zeros((0, 3), np.int64)
        return np.ascontiguousarray(np.concatenate(values)), np.concatenate(grids)
