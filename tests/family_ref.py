"""generate() of any Qwen VL family with images and videos: the parity oracle of the family tests.

Videos come in as already-patchified rows (pixel_values_videos, video_grid_thw, second_per_grid_t,
and the sampled frames' times):
transformers' video processor needs torchvision, which does not import here (FACTS.md), so the rows
are produced by the server's own numpy patchify, whose equality with transformers' patchify math is
a test of its own (tests/unit/test_video_intake.py). A Qwen3-VL video's prompt text (a ``<t seconds>``
before each temporal patch, each patch between vision start and end marks) is written by transformers'
own Qwen3VLProcessor.replace_video_token, from the frames' times.
"""

from __future__ import annotations

import io
import json

from PIL import Image

# Small frame budgets (a few tokens per frame) keep the tiny models' videos short on CPU: the server's
# preprocess gets VIDEO (as --set values), the reference's intake the same limits (video_limits()).
VIDEO = {"video_min_pixels": 4096, "video_max_pixels": 24576, "video_total_pixels": 98304}


def video_limits():
    from tritonvl.handlers.preprocess.video_rules import VideoLimits

    return VideoLimits(min_pixels=VIDEO["video_min_pixels"], max_pixels=VIDEO["video_max_pixels"],
                       total_pixels=VIDEO["video_total_pixels"])


class FamilyReference:
    """``dtype``: the weights' (a torch dtype or its name; float32 for the parity tests)."""

    def __init__(self, model_dir, dtype="float32", device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.torch = torch
        self.device = device
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.ip = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.cfg = json.loads(open(f"{model_dir}/config.json").read())
        self.merge = self.cfg["vision_config"]["spatial_merge_size"] ** 2

    def inputs(self, text: str | None = None, images: list[bytes] = (), videos: list[tuple] = (),
               messages: list | None = None) -> dict:
        """``videos``: (pixel_values_videos [patches, dim], video_grid_thw [3], second_per_grid_t,
        frame times in seconds)."""
        torch = self.torch
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        if messages is None:
            content = [{"type": "image"}] * len(pil) + [{"type": "video"}] * len(videos)  # the server's order
            messages = [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
        prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        kwargs = {}
        if pil:
            px = self.ip(images=pil, return_tensors="pt")
            prompt = self._expand(prompt, "<|image_pad|>", [int(g.prod()) // self.merge for g in px["image_grid_thw"]])
            kwargs.update(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        if videos:
            grids = torch.tensor([list(v[1]) for v in videos])
            if self.cfg["model_type"] in ("qwen3_vl", "qwen3_vl_moe"):
                prompt = self._expand_timed(prompt, grids, [v[3] for v in videos])
            else:
                prompt = self._expand(prompt, "<|video_pad|>", [int(g.prod()) // self.merge for g in grids])
            kwargs.update(pixel_values_videos=torch.cat([torch.as_tensor(v[0]) for v in videos]),
                          video_grid_thw=grids)
            if self.cfg["model_type"] == "qwen2_5_vl":
                kwargs["second_per_grid_ts"] = torch.tensor([float(v[2]) for v in videos])
        ids = self.tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        if pil or videos:
            kwargs["mm_token_type_ids"] = ((ids == self.cfg["image_token_id"]).int()
                                           + 2 * (ids == self.cfg["video_token_id"]).int())
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **kwargs}

    @staticmethod
    def _expand(prompt: str, pad: str, counts: list[int]) -> str:
        parts = prompt.split(pad)
        assert len(parts) == len(counts) + 1, (pad, len(parts), counts)
        return parts[0] + "".join(pad * n + p for n, p in zip(counts, parts[1:]))

    def _expand_timed(self, prompt: str, grids, frame_times: list) -> str:
        """transformers' Qwen3-VL video placeholder text; its timestamps are frame index / fps, so the
        frames' times go in as indices at fps 1."""
        from types import SimpleNamespace

        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
        from transformers.video_utils import VideoMetadata

        temporal = self.cfg["vision_config"]["temporal_patch_size"]
        proc = SimpleNamespace(video_processor=SimpleNamespace(merge_size=self.cfg["vision_config"]["spatial_merge_size"],
                                                               temporal_patch_size=temporal),
                               video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
                               vision_end_token="<|vision_end|>")
        proc._calculate_timestamps = lambda idx, fps, merge: Qwen3VLProcessor._calculate_timestamps(proc, idx, fps, merge)
        meta = [VideoMetadata(total_num_frames=len(t), fps=1.0, frames_indices=list(t)) for t in frame_times]
        inputs = {"video_grid_thw": grids, "video_metadata": meta}
        parts = prompt.split("<|video_pad|>")
        assert len(parts) == len(grids) + 1, (len(parts), len(grids))
        return parts[0] + "".join(Qwen3VLProcessor.replace_video_token(proc, inputs, i) + p
                                  for i, p in enumerate(parts[1:]))

    def generate(self, text=None, images=(), videos=(), messages=None, max_tokens: int = 16) -> list[int]:
        inputs = {k: v.to(self.device) for k, v in self.inputs(text, images, videos, messages).items()}
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()
