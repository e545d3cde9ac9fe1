"""Tensor parallelism for the decoder (llm parameter ``tensor_parallel_size``, docs/DEVICES.md).

Rank 0 is the llm instance itself (in its Triton stub: scheduler, sampler, responses); ranks
1..N-1 are worker processes it starts (``python -m tritonvl.handlers.engine.parallel``), one per
device. Every rank holds the embeddings, norms and rotary tables whole and a 1/N slice of each
decoder layer, as transformers' ``base_model_tp_plan`` for the Qwen VL decoders lays it out:
q/k/v and gate/up column-parallel (their output rows split: each rank has num_heads/N query heads,
num_kv_heads/N KV heads and its share of the MLP), o_proj and down_proj row-parallel (their input
columns split; the partial sums are all-reduced, so every rank holds the full hidden state after
each). Each rank's paged KV cache holds only its KV heads. Only rank 0 keeps the output layer and
computes logits.

One step: rank 0 broadcasts the packed step (tokens, positions, the attention spans and block
tables, the visual rows) as a pickled object; every rank runs the same forward on its shard. While
idle rank 0 sends a keep-alive every KEEPALIVE_S, so a worker's wait is bounded by the group's
timeout (TIMEOUT_S) too: a rank gone or stuck ends in an error, never a hang.

Process hygiene: the rendezvous is a TCPStore on 127.0.0.1 with a port the kernel picks (port 0);
a worker dies with its stub (PR_SET_PDEATHSIG plus a parent-pid poll), and exits after its load
failed; rank 0 kills its workers (SIGTERM, then SIGKILL) on stop, on a failed load and when a rank
failed. A worker's error goes to rank 0 through the rendezvous store (in rank 0's memory: no file,
no shared memory) and into the message the requests get.

Test-only fault injection: ``TRITONVL_TEST_TP_FAULT`` = ``load:<rank>`` (that rank raises while
loading) or ``step:<rank>:<n>`` (that rank raises in its n-th forward). Never set it in production.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch

from tritonvl.client.rules.errors import Unavailable

log = logging.getLogger("tritonvl.engine")

TIMEOUT_S = float(os.environ.get("TRITONVL_TP_TIMEOUT_S", "60"))  # any collective op (and the rendezvous)
KEEPALIVE_S = 5.0  # rank 0 pings idle workers this often (must stay well under TIMEOUT_S)
FAULT_ENV = "TRITONVL_TEST_TP_FAULT"
WORKER_MODULE = "tritonvl.handlers.engine.parallel"

# transformers' base_model_tp_plan for the Qwen VL decoders (names inside each decoder layer)
COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


class RankFailed(Unavailable):
    """A rank of the tensor-parallel group failed (died, raised, timed out): the requests in flight
    and every later one end with UNAVAILABLE and this message."""


def check_size(family: str, num_heads: int, num_kv_heads: int, size: int, quantization: str = "none") -> None:
    """Refuse a tensor-parallel size the model cannot be split by, naming the numbers."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if size == 1:
        return
    if family == "qwen3_vl_moe":
        raise ValueError("tensor_parallel_size > 1 is not supported for Qwen3-VL-MoE (its experts are not "
                         "sharded here); use tensor_parallel_size 1")
    if quantization != "none":
        raise ValueError(f"tensor_parallel_size > 1 with quantization {quantization!r} is not supported yet "
                         "(the quantized layers are not sharded); use quantization none")
    bad = [f"{name} {n}" for name, n in (("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads))
           if n % size]
    if bad:
        raise ValueError(f"tensor_parallel_size {size} does not divide the model's {' and '.join(bad)}")


def dist_backend(device: str) -> str:
    kind = torch.device(device).type
    return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[kind]


def fault(stage: str, rank: int, count: int = 0) -> None:
    """The test-only fault hook (FAULT_ENV); does nothing unless it names this stage and rank."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] == stage and int(parts[1]) == rank and (stage == "load" or int(parts[2]) == count):
        raise RuntimeError(f"{FAULT_ENV}={spec}: injected fault on rank {rank} ({stage})")


# ---- sharding -----------------------------------------------------------------------------------


def _slice(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    n = t.shape[dim] // size
    return t.narrow(dim, rank * n, n).clone()


class RowParallelLinear(torch.nn.Module):
    """A row-parallel linear: this rank's input columns, the partial products summed over the group
    (all-reduce), the bias added once after the sum. ``group``: a ProcessGroup object to reduce over
    (None: the default group; the unit tests run ranks as threads with groups of their own)."""

    def __init__(self, linear: torch.nn.Linear, rank: int, size: int, group=None) -> None:
        super().__init__()
        self.group = group
        self.weight = torch.nn.Parameter(_slice(linear.weight.data, 1, rank, size), requires_grad=False)
        self.bias = linear.bias
        self.in_features, self.out_features = self.weight.shape[1], self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = torch.nn.functional.linear(x, self.weight)
        if self.group is None:
            dist.all_reduce(out)
        else:
            self.group.allreduce([out]).wait()
        return out if self.bias is None else out + self.bias


def shard_decoder(lm, rank: int, size: int, group=None) -> None:
    """Keep this rank's slice of every decoder layer of ``lm`` (the text model), in place."""
    for layer in lm.layers:
        for path in COLWISE:
            parent, name = path.split(".")
            linear = getattr(getattr(layer, parent), name)
            linear.weight = torch.nn.Parameter(_slice(linear.weight.data, 0, rank, size), requires_grad=False)
            if linear.bias is not None:
                linear.bias = torch.nn.Parameter(_slice(linear.bias.data, 0, rank, size), requires_grad=False)
            linear.out_features = linear.weight.shape[0]
        for path in ROWWISE:
            parent, name = path.split(".")
            module = getattr(layer, parent)
            setattr(module, name, RowParallelLinear(getattr(module, name), rank, size, group))
        attn = layer.self_attn
        for attr in ("num_heads", "num_key_value_heads"):  # informative: HF reshapes with -1
            if hasattr(attn, attr):
                setattr(attn, attr, getattr(attn, attr) // size)


def load_shard(model_dir: str, device: str, dtype, group: TPGroup):
    """This rank's model: loaded on the CPU, its decoder sharded, then moved to ``device``; only
    rank 0 keeps the output layer. On a failure rank 0 stops the group (no worker is left)."""
    from tritonvl.handlers.weights import load_full_model

    try:
        fault("load", group.rank)
        model = load_full_model(model_dir, "cpu", dtype)
        model.model.visual = None
        shard_decoder(model.model.language_model, group.rank, group.size)
        if group.rank:
            model.lm_head = None
        return model.to(device).eval()
    except BaseException:
        if group.rank == 0:
            group.broken = group.broken or "rank 0 failed to load"
            group.close()
        raise


# ---- the group ----------------------------------------------------------------------------------


def python_executable() -> str:
    """The Python to start workers with (inside a Triton stub sys.executable may be the stub)."""
    exe = sys.executable or ""
    if Path(exe).name.startswith("python") and os.access(exe, os.X_OK):
        return exe
    for name in (f"python{sys.version_info.major}.{sys.version_info.minor}", "python3"):
        cand = Path(sys.exec_prefix) / "bin" / name
        if cand.is_file():
            return str(cand)
    return shutil.which("python3") or "python3"


class TPGroup:
    """This process' place in the tensor-parallel group (``rank`` of ``size``), the collective ops
    the runner needs, and on rank 0 the worker processes."""

    def __init__(self, rank: int, size: int, device: str) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.workers: list[subprocess.Popen] = []
        self.broken: str | None = None
        self.last_sent = time.monotonic()
        self._store = None

    # -- set-up --
    @classmethod
    def launch(cls, devices: list[str], worker_args: dict) -> TPGroup:
        """Rank 0: start ranks 1..N-1 on ``devices[1:]`` and join them (the workers load the model
        while rank 0 does; see ModelRunner)."""
        import torch.distributed as dist

        size = len(devices)
        group = cls(0, size, devices[0])
        try:
            if dist_backend(devices[0]) == "gloo":
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
            group._store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=timedelta(seconds=TIMEOUT_S),
                                         wait_for_workers=False)
            port = group._store.port
            for rank in range(1, size):
                args = {**worker_args, "rank": rank, "size": size, "port": port, "device": devices[rank],
                        "parent": os.getpid()}
                cmd = [python_executable(), "-m", WORKER_MODULE, json.dumps(args)]
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                group.workers.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))
            group._init(port)
        except BaseException as exc:
            dead = [f"rank {i + 1} exited with {p.poll()}" for i, p in enumerate(group.workers) if p.poll() is not None]
            reason = group.worker_error() or "; ".join(dead) or f"{type(exc).__name__}: {exc}"
            group.close()
            raise RankFailed(f"tensor-parallel group of {size} did not start: {reason}") from exc
        log.info("tensor parallel: rank 0 of %d on %s, workers %s", size, devices[0],
                 [p.pid for p in group.workers])
        return group

    @classmethod
    def join(cls, rank: int, size: int, port: int, device: str) -> TPGroup:
        """A worker: join rank 0's group."""
        group = cls(rank, size, device)
        if dist_backend(device) == "gloo":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        group._store = __import__("torch.distributed", fromlist=["TCPStore"]).TCPStore(
            "127.0.0.1", port, size, is_master=False, timeout=timedelta(seconds=TIMEOUT_S))
        group._init(port)
        return group

    def _init(self, port: int) -> None:
        import torch.distributed as dist

        kwargs = {}
        if self.device != "cpu":
            kwargs["device_id"] = torch.device(self.device)
        dist.init_process_group(dist_backend(self.device), store=self._store, rank=self.rank, world_size=self.size,
                                timeout=timedelta(seconds=TIMEOUT_S), **kwargs)

    # -- per step --
    def guard(self, what: str, fn):
        if self.broken:
            raise RankFailed(self.broken)
        try:
            return fn()
        except Exception as exc:
            dead = [f"rank {i + 1} (pid {p.pid}) exited with {p.poll()}" for i, p in enumerate(self.workers)
                    if p.poll() is not None]
            reason = self.worker_error() or "; ".join(dead) or f"{type(exc).__name__}: {exc}"
            self.broken = f"tensor-parallel {what} failed on rank {self.rank}: {reason}"
            log.error("%s", self.broken)
            if self.rank == 0:
                self.close()  # the group cannot be used again: its workers go
            raise RankFailed(self.broken) from exc

    def broadcast(self, message) -> object:
        """Rank 0 sends ``message`` (picklable, tensors on the CPU), every other rank gets it."""
        import torch.distributed as dist

        def send():
            box = [message]
            dist.broadcast_object_list(box, src=0, device=self._obj_device())
            return box[0]

        out = self.guard("broadcast", send)
        self.last_sent = time.monotonic()
        return out

    def _obj_device(self):
        return None if self.device == "cpu" else torch.device(self.device)

    def keepalive(self) -> None:
        """Rank 0, idle: ping the workers now and then (their wait is bounded by TIMEOUT_S)."""
        if self.rank == 0 and not self.broken and time.monotonic() - self.last_sent > KEEPALIVE_S:
            self.broadcast(("ping",))

    def all_min(self, value: int) -> int:
        import torch.distributed as dist

        def reduce():
            t = torch.tensor([value], dtype=torch.long, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            return int(t.item())

        return self.guard("start-up", reduce)

    def worker_error(self) -> str | None:
        """The first error a worker told the store before it exited (None: none)."""
        if self.rank != 0 or self._store is None:
            return None
        for rank in range(1, self.size):
            try:
                if self._store.check([f"error-{rank}"]):
                    return f"rank {rank}: " + self._store.get(f"error-{rank}").decode(errors="replace")
            except Exception:  # noqa: BLE001 - no message then; the caller has its own
                return None
        return None

    def tell_error(self, exc: BaseException) -> None:
        """A worker: leave its error for rank 0 (worker_error) before it exits."""
        try:
            self._store.set(f"error-{self.rank}", f"{type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - rank 0 may be gone
            pass

    # -- teardown --
    def close(self, timeout: float = 5.0) -> None:
        """Rank 0: tell the workers to stop, then SIGTERM/SIGKILL what is left; every rank leaves the
        process group (its sockets and the store close). Idempotent."""
        import torch.distributed as dist

        if self.rank == 0 and self.workers and not self.broken and all(p.poll() is None for p in self.workers):
            try:
                box = [("stop",)]
                dist.broadcast_object_list(box, src=0, device=self._obj_device())
            except Exception:  # noqa: BLE001 - they are killed below anyway
                pass
        deadline = time.monotonic() + timeout
        for p in self.workers:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in self.workers:
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.workers = []
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        self._store = None


# ---- the worker process -------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent (the stub) goes: PR_SET_PDEATHSIG, then a poll of the
    parent pid as a back-up (the death signal follows the thread that started us)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="tritonvl-tp-parent", daemon=True).start()


def worker_main(args: dict) -> None:
    rank, group = args["rank"], None
    _die_with_parent(args["parent"])
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    logging.basicConfig(level=logging.INFO, format=f"tritonvl tp rank {rank}: %(message)s")
    from tritonvl.handlers.noise import quiet_library_noise

    quiet_library_noise()  # a worker loads the model too, so torchao's import noise comes here as well
    try:
        from tritonvl.handlers.devices import parse_dtype, prepare_device
        from tritonvl.handlers.modelinfo import load_model_info

        from .model_runner import ModelRunner, PackedStep

        device, dtype = prepare_device(args["device"], args.get("num_threads", 0))
        dtype = parse_dtype(args["dtype"], dtype)
        group = TPGroup.join(rank, args["size"], args["port"], device)
        runner = ModelRunner(args["model_dir"], load_model_info(args["model_dir"]), device, dtype,
                             args["kv_cache_bytes"], args["block_size"], args["attention"],
                             args["kv_cache_fraction"], tp=group)
        steps = 0
        while True:
            message = group.broadcast(None)
            if message[0] == "stop":
                break
            if message[0] == "step":
                steps += 1
                fault("step", rank, steps)
                with torch.inference_mode():
                    runner.forward(PackedStep.from_wire(message[1], device))
        group.close()
    except BaseException as exc:  # noqa: BLE001 - told to rank 0, then gone
        import traceback

        traceback.print_exc()
        if group is not None:
            group.tell_error(exc)
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a tensor-parallel worker of the llm (started by rank 0)")
    parser.add_argument("args", help="JSON: rank, size, port, device, parent and the runner's arguments")
    worker_main(json.loads(parser.parse_args(argv).args))


if __name__ == "__main__":
    main()
