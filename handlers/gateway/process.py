"""The gateway as a child process (``tritonvl serve --openai-port``, tests, benchmarks).

Imports nothing of the web stack: the child is ``python -m tritonvl.client.cli gateway ...``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tritonvl.handlers.gateway.config import API_KEY_ENV
from tritonvl.handlers.procs import terminate


class GatewayProcess:
    """``with GatewayProcess("localhost:8001", port) as gw: gw.url`` ... stopped (SIGTERM) on exit.

    ``api_keys``: given, they reach the child as $TRITONVL_API_KEY (one per line), never on its
    command line (which any user of the machine can list); None: the child inherits this process's
    $TRITONVL_API_KEY, if any; []: no key, whatever the environment says."""

    def __init__(self, triton_url: str, port: int, host: str = "127.0.0.1", model: str | None = None,
                 served_model_names: list[str] | None = None, args: list[str] | None = None,
                 log_path: str | None = None, api_keys: list[str] | None = None) -> None:
        self.triton_url, self.port, self.host = triton_url, port, host
        self.env = dict(os.environ)
        if api_keys is not None:
            self.env.pop(API_KEY_ENV, None)
            if api_keys:
                self.env[API_KEY_ENV] = "\n".join(api_keys)
        self.cmd = [sys.executable, "-m", "tritonvl.client.cli", "gateway", "--triton-url", triton_url,
                    "--port", str(port), "--host", host, *(["--model", model] if model else [])]
        for name in served_model_names or []:
            self.cmd += ["--served-model-name", name]
        self.cmd += list(args or [])
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"

    def spawn(self) -> GatewayProcess:
        """Start it and return at once (it answers 503 on /health until Triton is ready)."""
        out = None
        if self.log_path:
            self._log = out = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=self.env)
        return self

    def start(self, timeout: float = 60) -> GatewayProcess:
        """Start it and wait until it answers (/v1/models: 200, or 401 with a key; needs no Triton)."""
        self.spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the gateway exited with {self.proc.returncode} (log: {self.log_path})")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2):
                    return self
            except urllib.error.HTTPError:
                return self  # it answers
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the gateway did not answer within {timeout} s (log: {self.log_path})")

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        code = terminate(self.proc, timeout)
        if self._log:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
