"""The `vision_encoder` step: one forward over every image of every request in a batch."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.handlers.lru import BytesLRU


def content_hash(*arrays: np.ndarray) -> bytes:
    """Content key of an image's processed pixels and grid (embedding cache and prefix cache)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.digest()


@dataclass
class EncodedImages:
    embeds: np.ndarray  # float32 [tokens of all images of the request, out_hidden]
    hashes: list[bytes]  # one content key per image (for the llm's prefix cache)




class TowerRuntime(Protocol):
    """The vision tower behind ``VisionEncoder``: one call over the patches of several images."""

    merge_unit: int  # patches per output token
    hidden: int  # width of one output token

    def __call__(self, pixels: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """pixels FP32 [patches, patch_dim], grid INT64 [images, 3] -> FP32 [patches / merge_unit, hidden]."""
        ...


class TorchTower:
    """transformers' own tower module, in torch."""

    def __init__(self, model_dir: str, device: str, dtype) -> None:
        import torch

        from tritonvl.handlers.modelinfo import load_model_info
        from tritonvl.handlers.weights import load_visual

        self.torch, self.device, self.dtype = torch, device, dtype
        self.visual = load_visual(model_dir, device, dtype)
        self.merge_unit = self.visual.spatial_merge_size**2
        info = load_model_info(model_dir)
        self.hidden = info.embed_width
        self.patch_dim = info.patch_dim

    def __call__(self, pixels: np.ndarray, grid: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.visual(torch.from_numpy(pixels).to(self.device, self.dtype),
                              grid_thw=torch.from_numpy(grid).to(self.device))
            # Qwen3-VL: each token's deepstack features ride beside its embedding ([n, hidden * (1 + k)])
            rows = torch.cat([out.pooler_output, *(getattr(out, "deepstack_features", None) or ())], dim=-1)
        return rows.float().cpu().numpy()


RUNTIMES = ("torch", "onnxruntime")


def load_tower(model_dir: str, device: str, dtype, runtime: str = "torch", onnx_path: str = "",
               num_threads: int = 0, providers: list[str] | None = None) -> TowerRuntime:
    """The ``runtime`` parameter: ``torch``, or ``onnxruntime`` on the graph at ``onnx_path``
    (default DIR/onnx/vision_encoder.onnx, exported once from the checkpoint when missing)."""
    if runtime == "torch":
        return TorchTower(model_dir, device, dtype)
    if runtime == "onnxruntime":
        from tritonvl.handlers.modelinfo import load_model_info
        from tritonvl.handlers.vision.layout import TowerGeometry

        family = load_model_info(model_dir).family
        if family != "qwen2_5_vl":  # the exported graph is Qwen2.5-VL's windowed tower
            raise ValueError(f"vision_encoder runtime onnxruntime serves Qwen2.5-VL towers only; {model_dir} is "
                             f"{family}: use runtime torch")
        from tritonvl.handlers.vision.onnx_export import ensure_exported
        from tritonvl.handlers.vision.onnx_runtime import OnnxTower

        path = ensure_exported(model_dir, onnx_path or None)
        return OnnxTower(str(path), TowerGeometry.from_model_dir(model_dir), device, num_threads, providers)
    raise ValueError(f"vision_encoder runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")


class VisionEncoder:
    """The embedding cache and the batching around a tower (``load_tower``)."""

    def __init__(self, tower: TowerRuntime, cache_bytes: int = 256 * 1024 * 1024) -> None:
        self.tower = tower
        self.merge_unit = self.tower.merge_unit
        self.hidden = self.tower.hidden
        self.cache = BytesLRU(cache_bytes)  # embeddings of images and videos by content hash

    def snapshot(self):
        from tritonvl.handlers.metrics import Snapshot

        return Snapshot(counters={"image_cache_hits": self.cache.hits, "image_cache_misses": self.cache.misses})

    def check(self, pixels, grid) -> None:
        """One request's inputs against the tower (the model is callable directly): INVALID_ARG naming
        the problem, so that a bad request fails alone instead of the batch's one forward."""
        if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or pixels.dtype != np.float32:
            raise InvalidArgument("pixel_values: expected FP32 [patches, patch_dim]")
        width = getattr(self.tower, "patch_dim", None)
        if width is not None and pixels.shape[0] and pixels.shape[1] != width:
            raise InvalidArgument(f"pixel_values: {pixels.shape[1]} values per patch, the model takes {width}")
        if not isinstance(grid, np.ndarray) or grid.ndim != 2 or grid.shape[1] != 3:
            raise InvalidArgument("image_grid_thw: expected INT64 [images, 3]")
        merge = int(round(self.merge_unit ** 0.5))
        if grid.size and ((grid < 1).any() or (grid[:, 1:] % merge).any()):
            raise InvalidArgument(f"image_grid_thw: t, h, w must be positive and h, w multiples of {merge}")
        patches = int(np.prod(grid, axis=1).sum()) if grid.size else 0
        if patches != pixels.shape[0]:
            raise InvalidArgument(f"pixel_values: {pixels.shape[0]} patches for an image_grid_thw of {patches}")
        if pixels.size and not np.isfinite(pixels).all():
            raise InvalidArgument("pixel_values: not all finite")

    def encode(self, batch: list) -> list:
        """``batch``: per request, (pixel_values [patches, patch_dim], grid_thw [images, 3]); per request
        its EncodedImages, or the exception that refused it (the rest of the batch carries on).

        Images already in the cache are skipped; the rest run in ONE forward (the tower keeps
        images apart through cu_seqlens) and are split back by each image's own token count.
        """
        checked: list = []
        for pixels, grid in batch:
            try:
                self.check(pixels, grid)
                checked.append(None)
            except Exception as exc:
                checked.append(exc)
        good = [item for item, err in zip(batch, checked) if err is None]
        try:
            encoded = iter(self._encode(good))
        except Exception:  # the forward itself failed: find the request that did it, one at a time
            encoded = iter(self._one_by_one(good))
        return [err if err is not None else next(encoded) for err in checked]

    def _one_by_one(self, batch: list) -> list:
        out = []
        for item in batch:
            try:
                out.extend(self._encode([item]))
            except Exception as exc:
                out.append(exc)
        return out

    def _encode(self, batch: list[tuple[np.ndarray, np.ndarray]]) -> list[EncodedImages]:
        per_image: list[list] = []  # per request: [(hash, pixels, grid_row)]
        for pixels, grid in batch:
            items, start = [], 0
            for row in grid:
                n = int(np.prod(row))
                chunk = pixels[start:start + n]
                start += n
                items.append((content_hash(chunk, row.astype(np.int64)), chunk, row))
            per_image.append(items)
        results: dict[bytes, np.ndarray] = {}
        todo = {}
        for items in per_image:
            for key, chunk, row in items:
                if key in results or key in todo:
                    continue
                hit = self.cache.get(key)
                if hit is not None:
                    results[key] = hit
                else:
                    todo[key] = (chunk, row)
        if todo:
            keys = list(todo)
            pixels = np.concatenate([todo[k][0] for k in keys])
            grid = np.stack([todo[k][1] for k in keys])
            out = self.tower(pixels, grid)
            sizes = np.cumsum([int(np.prod(todo[k][1])) // self.merge_unit for k in keys])[:-1]
            for key, arr in zip(keys, np.split(out, sizes)):
                arr = np.ascontiguousarray(arr)
                results[key] = arr
                self.cache.put(key, arr, arr.nbytes)
        return [EncodedImages(np.concatenate([results[k] for k, _, _ in items]) if items
                              else np.zeros((0, self.hidden), np.float32), [k for k, _, _ in items])
                for items in per_image]
