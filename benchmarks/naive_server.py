"""Baseline (A): the per-request generate() HTTP server the tutorials show.

FastAPI, one global model, one request at a time (a lock around generate()), no streaming.
Run: python benchmarks/naive_server.py MODEL_DIR PORT
"""

from __future__ import annotations

import base64
import io
import sys
import threading

import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

MODEL_DIR = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
processor = Qwen2VLImageProcessorPil.from_pretrained(MODEL_DIR)
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(MODEL_DIR).eval()
lock = threading.Lock()
app = FastAPI()


class Request(BaseModel):
    text_input: str
    image: list[str] = []
    max_tokens: int = 32


@app.post("/generate")
def generate(req: Request) -> dict:
    images = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in req.image]
    messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": req.text_input}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = {}
    if images:
        px = processor(images=images, return_tensors="pt")
        merge = model.config.vision_config.spatial_merge_size ** 2
        parts = prompt.split("<|image_pad|>")
        counts = [int(g.prod()) // merge for g in px["image_grid_thw"]]
        prompt = parts[0] + "".join("<|image_pad|>" * n + p for n, p in zip(counts, parts[1:]))
        kwargs = {"pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"]}
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if images:
        kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    with lock, torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=req.max_tokens,
                             do_sample=False, eos_token_id=None, **kwargs)
    new = out[0, ids.shape[1]:].tolist()
    return {"text_output": tokenizer.decode(new, skip_special_tokens=True), "output_ids": new,
            "num_output_tokens": len(new)}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
