"""Which torch device an instance runs on, from its Triton instance group."""

from __future__ import annotations

import os
import re
import threading
from typing import Callable


def instance_index(instance_name: str) -> int:
    """Triton names instances `<group>_<index>`; the trailing number is the index in the group."""
    m = re.search(r"_(\d+)$", instance_name or "")
    return int(m.group(1)) if m else 0


def pick_device(kind: str, device_id: int | str, instance_name: str = "", npu_ids: str = "",
                requested: str = "") -> str:
    """Return a torch device string.

    - ``requested`` (the `device` parameter) "cpu" forces the CPU whatever the group says.
    - KIND_GPU: ``cuda:<device_id>`` (Triton makes one instance per listed GPU).
    - Ascend has no Triton kind: KIND_MODEL/KIND_CPU plus ``npu_ids`` ("0,1,...") maps the
      group's instances round-robin onto NPUs: ``npu:<id>``.
    - otherwise the CPU.
    """
    requested = (requested or "").strip().lower()
    if requested == "cpu":
        return "cpu"
    kind = (kind or "").upper().removeprefix("KIND_")
    ids = [s.strip() for s in (npu_ids or "").split(",") if s.strip()]
    if requested == "npu" or ids:
        if not ids:
            ids = ["0"]
        return f"npu:{ids[instance_index(instance_name) % len(ids)]}"
    if kind == "GPU" or requested == "cuda":
        return f"cuda:{int(device_id or 0)}"
    return "cpu"


def tp_devices(first: str, size: int, kind: str = "", instance_name: str = "", npu_ids: str = "") -> list[str]:
    """The devices of an instance's ``size`` tensor-parallel ranks, ``first`` (pick_device's) for rank 0.

    - CPU: every rank on the CPU (gloo; for tests).
    - CUDA, KIND_GPU: the GPU Triton gave the instance and the next ``size - 1`` (list one GPU per
      instance in the group's ``gpus``: 0, 2, ... for size 2).
    - CUDA otherwise (``device`` cuda with KIND_MODEL/KIND_CPU): instance k takes GPUs k*size .. k*size+size-1.
    - Ascend: instance k takes ``npu_device_ids`` k*size .. k*size+size-1 (all NPUs from 0 when unset).
    """
    if size <= 1:
        return [first]
    kind_type, _, index = first.partition(":")
    if kind_type == "cpu":
        return ["cpu"] * size
    k = instance_index(instance_name)
    if kind_type == "npu":
        ids = [s.strip() for s in (npu_ids or "").split(",") if s.strip()]
        if not ids:
            return [f"npu:{k * size + r}" for r in range(size)]
        if (k + 1) * size > len(ids):
            raise ValueError(f"tensor_parallel_size {size}: instance {k} needs npu_device_ids {k * size}.."
                             f"{(k + 1) * size - 1}, but only {len(ids)} are listed")
        return [f"npu:{ids[k * size + r]}" for r in range(size)]
    base = int(index or 0)
    if (kind or "").upper().removeprefix("KIND_") != "GPU":
        base = k * size
    return [f"{kind_type}:{base + r}" for r in range(size)]


def cpu_threads(value: str, share: float = 1.0) -> int:
    """The ``num_threads`` parameter: a count, 0 for torch's default (one per core), or ``auto`` for
    ``share`` of the cores (at least 1)."""
    if value.strip().lower() == "auto":
        return max(1, int((os.cpu_count() or 1) * share))
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"num_threads {value!r}: expected a number or auto") from None
    if count < 0:
        raise ValueError(f"num_threads must be >= 0, got {count}")
    return count


def prepare_device(device: str, num_threads: int = 0):
    """Import what the device needs (torch_npu only for Ascend) and return (device, dtype).

    ``num_threads`` > 0 caps torch's CPU threads for this instance (several instances on one CPU
    otherwise each start one thread per core and slow each other down).
    """
    import torch

    if num_threads > 0:
        torch.set_num_threads(num_threads)
    if device.startswith("npu"):
        import torch_npu  # noqa: F401  (registers the npu device)

        torch.npu.set_device(device)
        return device, torch.bfloat16
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        return device, torch.bfloat16
    return device, torch.float32


def start_compute_thread(name: str, device: str, load: Callable[[], None], loop: Callable[[], None]) -> threading.Thread:
    """Start the thread that does a model's torch work: ``load()`` on it (``device`` bound to it
    first), then ``loop()``. Returns the thread once the load is done; a load error is raised here
    (the thread has ended). One thread for both: torch's GNU OpenMP keeps a worker team per thread
    that ran parallel work, and with two teams in a process libgomp throttles its spin-wait, so each
    small op of a step waits for a wake-up (docs/DEVICES.md, "one thread does the engine's torch work")."""
    failed: list[BaseException] = []
    ready = threading.Event()

    def main() -> None:
        try:
            bind_thread(device)
            load()
        except BaseException as exc:  # raised in the caller
            failed.append(exc)
            return
        finally:
            ready.set()
        loop()

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    ready.wait()
    if failed:
        thread.join()
        raise failed[0]
    return thread


def bind_thread(device: str) -> None:
    """Make ``device`` the calling thread's current CUDA / Ascend device (per thread in both runtimes);
    nothing on CPU."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)
    elif device.startswith("npu"):
        import torch

        torch.npu.set_device(device)


def free_device_bytes(device: str, fraction: float) -> int:
    """``fraction`` of the memory now free on a GPU or NPU (CPU: 1 GiB)."""
    import torch

    if not 0 < fraction <= 1:
        raise ValueError(f"kv_cache_fraction must be in (0, 1], got {fraction}")
    if device.startswith("npu"):
        free, _total = torch.npu.mem_get_info(torch.device(device))
    elif device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
    else:
        return 1 << 30
    return int(free * fraction)


def parse_dtype(name: str, default):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if not name or name == "auto":
        return default
    if name not in table:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(table)} or auto")
    return table[name]
