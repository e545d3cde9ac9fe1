"""Start a real `tritonserver` on this repository's models (the `tritonvl serve` command).

Uses the `tritonserver` on PATH (as in the NGC container), else the binary bundled in PyPI's
nvidia-pytriton, prepared as the Python backend expects: the stub for this Python version copied
next to libtriton_python.so, and this interpreter's libpython on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tritonvl.handlers.gateway.config import API_KEY_ENV
from tritonvl.handlers.procs import terminate
from tritonvl.handlers.tools.repository import Overrides, default_model_repository, repository_with

__all__ = ["ServerProcess", "free_port", "repository_with", "serve"]



@dataclass
class Server:
    binary: str
    backend_dir: str | None
    env: dict = field(default_factory=dict)


def bundled_server() -> Server:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no tritonserver on PATH and nvidia-pytriton is not installed "
                           "(pip install 'tritonvl[server]' or run scripts/setup.sh)")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    backends = root / "backends"
    stub = backends / "python" / "triton_python_backend_stub"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    src = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists() or stub.stat().st_size != src.stat().st_size:
        # The stub finds its libraries by RPATH relative to this exact place (FACTS.md).
        shutil.copy2(src, stub)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env = {"LD_LIBRARY_PATH": os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)}
    return Server(str(root / "bin" / "tritonserver"), str(backends), env)


def find_server() -> Server:
    on_path = shutil.which("tritonserver")
    if on_path and os.environ.get("TRITONVL_BUNDLED_SERVER") != "1":
        return Server(on_path, None)
    return bundled_server()


def auto_complete_changes_nothing(repo: Path) -> bool:
    """Every model of ``repo`` is an ensemble or a Python-backend model with a config.pbtxt whose
    Python files define no ``auto_complete_config``: Triton's auto-complete step would leave their
    configs as they are (checked: GET /v2/models/<m>/config is the same with and without it), yet it
    runs one stub process per Python model, importing its model.py, before any instance starts
    (~1.5 s of every start on 2 cores)."""
    if not Path(repo).is_dir():  # e.g. an s3:// repository: Triton's to read
        return False
    for model in Path(repo).iterdir():
        if not model.is_dir() or model.name.startswith("."):
            continue
        config = model / "config.pbtxt"
        if not config.is_file():
            return False
        text = config.read_text()
        if re.search(r'platform\s*:\s*"ensemble"', text):
            continue
        if not re.search(r'backend\s*:\s*"python"', text):
            return False
        if any("auto_complete_config" in py.read_text(errors="replace") for py in model.glob("*/*.py")):
            return False
    return True


def server_command(server: Server, repo: Path, http_port: int, grpc_port: int, metrics_port: int,
                   extra: list[str]) -> list[str]:
    cmd = [server.binary, f"--model-repository={repo}", f"--http-port={http_port}",
           f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}", "--log-verbose=0",
           "--exit-timeout-secs=30"]
    if not any(a.startswith(("--disable-auto-complete-config", "--strict-model-config")) for a in extra) \
            and auto_complete_changes_nothing(repo):
        cmd.append("--disable-auto-complete-config")
    if server.backend_dir:
        cmd.append(f"--backend-directory={server.backend_dir}")
    return cmd + list(extra)


def serve(model: str | None, http_port: int, grpc_port: int, metrics_port: int, device: str,
          extra: list[str], repo: Path | None = None, overrides: Overrides | None = None,
          openai_port: int = 0, openai_host: str = "127.0.0.1", api_keys: list[str] | None = None) -> int:
    """Run tritonserver in the foreground; forward SIGINT/SIGTERM; return its exit code.

    ``openai_port``: also run the OpenAI-compatible gateway on that port (0: no gateway) and
    ``openai_host`` (loopback unless told otherwise), stopped with the server. ``api_keys`` (the
    ``--api-key`` flags) reach it through its environment, never its command line; without them it
    reads $TRITONVL_API_KEY as this process has it.

    ``overrides`` ({model: {key: value}}, from ``--set``): served from a temporary repository copy;
    an unknown model or key or a bad value raises ParamError before tritonserver starts.
    """
    tmp = None
    if overrides:
        tmp = tempfile.mkdtemp(prefix="tritonvl-repo-")
        try:
            repo = repository_with(Path(tmp) / "model_repository", overrides, repo)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        sets = " ".join(f"{m}.{k}={v}" for m, kv in overrides.items() for k, v in kv.items())
        print(f"tritonvl: serving a copy of the model repository with {sets}", flush=True)
    try:
        return _serve(model, http_port, grpc_port, metrics_port, device, extra, repo, openai_port, openai_host,
                      api_keys)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def shown(cmd: list[str]) -> list[str]:
    """The command as logged: the values of restricted-API keys (``--http-restricted-api=API:KEY=VALUE``,
    ``--grpc-restricted-protocol ...``) masked, so the admin key does not end up in a container's log."""
    out, mask_next = [], False
    for arg in cmd:
        if mask_next or arg.startswith(("--http-restricted-api=", "--grpc-restricted-protocol=")):
            head, eq, _ = arg.rpartition("=")
            arg = f"{head}=***" if eq and ":" in head else arg if not mask_next else "***"
        mask_next = arg in ("--http-restricted-api", "--grpc-restricted-protocol")
        out.append(arg)
    return out


def _serve(model: str | None, http_port: int, grpc_port: int, metrics_port: int, device: str,
           extra: list[str], repo: Path | None, openai_port: int = 0, openai_host: str = "127.0.0.1",
           api_keys: list[str] | None = None) -> int:
    model = model or os.environ.get("TRITONVL_MODEL")  # e.g. docker run -e TRITONVL_MODEL=...
    if model:
        model_dir = str(Path(model).resolve())
        if not (Path(model_dir) / "config.json").is_file():
            raise SystemExit(f"tritonvl serve: {model_dir} has no config.json (not a Hugging Face model directory)")
    else:
        from tritonvl.handlers.tiny_model import ensure_default_model

        print("tritonvl: no --model given: serving the embedded tiny random-weight Qwen2.5-VL", flush=True)
        model_dir = str(ensure_default_model())
    check_quantization(model_dir, repo or default_model_repository(), device)
    server = find_server()
    env = {**os.environ, **server.env, "TRITONVL_MODEL": model_dir}
    env.pop(API_KEY_ENV, None)  # the gateway's key is the gateway's: not in tritonserver's (and our stubs') env
    if device:
        env["TRITONVL_DEVICE"] = device
    cmd = server_command(server, repo or default_model_repository(), http_port, grpc_port, metrics_port, extra)
    print("tritonvl: " + " ".join(shown(cmd)), flush=True)
    proc = subprocess.Popen(cmd, env=env)
    gateway = None
    if openai_port:
        from tritonvl.handlers.gateway.process import GatewayProcess

        # served name: --model as given (vLLM's default), so clients can send the path they know
        gateway = GatewayProcess(f"localhost:{grpc_port}", openai_port, host=openai_host, model=model,
                                 api_keys=api_keys).spawn()

    def forward(signum, _frame):
        proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    try:
        return proc.wait()
    finally:
        if gateway is not None:
            gateway.stop()


def check_quantization(model_dir: str, repo: Path, device: str = "") -> None:
    """Before tritonserver starts: the llm model's quantization (llm.quantization, llm.backend and the
    checkpoint's quantization_config) passes the checks its load would make (handlers/quant.py) on the
    device its first instance would get; else exit non-zero with the message (not after every model's load)."""

    from tritonvl.handlers import params, quant
    from tritonvl.handlers.devices import pick_device
    from tritonvl.handlers.tools.repository import config_parameters

    config = Path(repo) / "llm" / "config.pbtxt"
    if not config.is_file():
        return
    text = config.read_text()
    p = params.read("llm", config_parameters(text))
    kind = re.search(r"kind\s*:\s*(KIND_\w+)", text)
    where = pick_device(kind[1] if kind else "", 0, "", ",".join(map(str, p.npu_device_ids)),
                        p.device or device or os.environ.get("TRITONVL_DEVICE", ""))
    try:
        quant.check_serving(p.model_path or model_dir, where, p.quantization, p.backend)
    except quant.QuantizationError as e:
        raise SystemExit(f"tritonvl serve: the llm model would not load: {e}") from None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A tritonserver in the background (for tests, benchmarks and perf runs).

    ``with ServerProcess(model_dir) as srv: srv.http_url`` ... stops it (SIGTERM) on exit.
    ``overrides`` ({model: {key: value}}, as ``tritonvl serve --set``) serve a temporary copy of
    ``repo`` (checked here: ParamError before anything starts), removed by stop().
    """

    def __init__(self, model_dir: str, repo: Path | None = None, extra: list[str] | None = None,
                 log_path: str | None = None, env: dict | None = None, ready_timeout: float = 300,
                 overrides: Overrides | None = None) -> None:
        self.model_dir = str(model_dir)
        self.repo = repo or default_model_repository()
        self._tmp = None
        if overrides:
            self._tmp = tempfile.mkdtemp(prefix="tritonvl-repo-")
            try:
                self.repo = repository_with(Path(self._tmp) / "model_repository", overrides, self.repo)
            except BaseException:
                shutil.rmtree(self._tmp, ignore_errors=True)
                raise
        self.extra = extra or []
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_path = log_path or f"/tmp/tritonvl-server-{self.http_port}.log"
        self.env = env or {}
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.metrics_port}/metrics"

    def start(self) -> ServerProcess:
        import time
        import urllib.request

        server = find_server()
        env = {**os.environ, **server.env, "TRITONVL_MODEL": self.model_dir, **self.env}
        cmd = server_command(server, self.repo, self.http_port, self.grpc_port, self.metrics_port, self.extra)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}; log: {self.log_path}\n"
                                   + self.log_tail())
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)  # a local HTTP probe is cheap; each start here saves up to a poll's wait
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {self.ready_timeout}s; log: {self.log_path}\n"
                           + self.log_tail())

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.log_path).read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 60) -> int | None:
        try:
            return self._stop(timeout)
        finally:
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)

    def _stop(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        code = terminate(self.proc, timeout)
        self._log.close()
        return code

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
