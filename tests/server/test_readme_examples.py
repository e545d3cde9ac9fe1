"""The README's examples, extracted from README.md and run as written against the README's own plain
`tritonserver --model-repository` command (the test model in TRITONVL_MODEL; only hosts and ports
substituted, and photo.jpg a real JPEG made here). A changed README is tested as it then reads."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import make_image

ROOT = Path(__file__).resolve().parents[2]


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block of README.md."""
    return re.findall(r"^```(\w*)\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


def block_with(lang: str, *needles: str) -> str:
    found = [text for la, text in readme_blocks() if la == lang and all(n in text for n in needles)]
    assert len(found) == 1, f"README: expected one {lang} block with {needles}, found {len(found)}"
    return found[0]


def commands(block: str) -> list[str]:
    """Split a bash block into its commands (a line that starts a word at column 0 starts a command)."""
    out: list[str] = []
    for line in block.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            out.append(line)
        elif out and line.strip():
            out[-1] += "\n" + line
    return out


@pytest.fixture(scope="module")
def readme_server(model_dir, tmp_path_factory):
    """The README's plain tritonserver line, with the no-Docker notes the README gives after it."""
    import pytriton

    from tritonvl.handlers.tools.launcher import free_port

    line = next(c for c in commands(block_with("bash", "tritonserver --model-repository")) if "tritonserver" in c)
    words = shlex.split(line)
    env = dict(os.environ)
    while "=" in words[0]:  # leading VAR=value assignments
        name, _, _ = words.pop(0).partition("=")
        assert name == "TRITONVL_MODEL", line
        env[name] = str(model_dir)
    assert words[0] == "tritonserver", line
    # the README's note for machines without Docker: where the binary and backends are, LIBDIR
    readme = " ".join((ROOT / "README.md").read_text().split())
    site = str(Path(pytriton.__file__).parents[1])
    binary = re.search(r"`tritonserver` is `(<site-packages>/\S+)`", readme).group(1).replace("<site-packages>", site)
    backends = re.search(r"`--backend-directory (<site-packages>/\S+)`", readme).group(1).replace(
        "<site-packages>", site)
    assert "`LIBDIR` on `LD_LIBRARY_PATH`" in readme
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [sysconfig.get_config_var("LIBDIR"),
                                                            env.get("LD_LIBRARY_PATH")]))
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    cmd = [binary, *words[1:], f"--backend-directory={backends}",
           *(f"--{k}-port={v}" for k, v in ports.items())]
    log_path = tmp_path_factory.mktemp("readme") / "tritonserver.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600  # a loaded 2-core machine
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    with urllib.request.urlopen(f"http://localhost:{ports['http']}/v2/health/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "not ready:\n" + log_path.read_text()[-3000:]
                time.sleep(0.5)
            yield ports
        finally:
            proc.terminate()
            rc = proc.wait(120)
    assert rc == 0, log_path.read_text()[-3000:]


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(make_image(160, 120, seed=21, fmt="JPEG"))
    return tmp_path


def localize(text: str, ports: dict) -> str:
    return text.replace("localhost:8000", f"localhost:{ports['http']}").replace(
        "localhost:8001", f"localhost:{ports['grpc']}")


def run_bash(script: str, cwd: Path) -> str:
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (script, r.stderr)
    return r.stdout


def curl_examples() -> tuple[str, list[str]]:
    """The IMG line and every curl of the README's query blocks."""
    first = commands(block_with("bash", "IMG=", "/generate_stream"))
    img = [c for c in first if c.startswith("IMG=")]
    curls = [c for c in first if c.startswith("curl")] + [
        c for c in commands(block_with("bash", "curl", "messages")) if c.startswith("curl")]
    assert len(img) == 1 and len(curls) == 3, (img, curls)
    return img[0], curls


def test_readme_generate_curl(readme_server, workdir):
    img, curls = curl_examples()
    (generate,) = [c for c in curls if "/generate " in c + " " and "messages" not in c]
    out = json.loads(run_bash(img + "\n" + localize(generate, readme_server), workdir))
    assert out.get("finish_reason") in ("stop", "length") and out["num_output_tokens"] > 0, out
    assert out["num_input_tokens"] > 40  # the image's tokens are in the prompt (text alone: under 30)


def test_readme_generate_stream_curl(readme_server, workdir):
    img, curls = curl_examples()
    (stream,) = [c for c in curls if "/generate_stream" in c]
    text = run_bash(img + "\n" + localize(stream, readme_server), workdir)
    events = [json.loads(line[len("data:"):]) for line in text.splitlines() if line.startswith("data:")]
    assert len(events) >= 2 and all("error" not in e for e in events), text[:2000]
    assert events[-1]["finish_reason"] in ("stop", "length") and "finish_reason" not in events[0]


def test_readme_messages_curl(readme_server, workdir):
    img, curls = curl_examples()
    (messages,) = [c for c in curls if "messages" in c]
    out = json.loads(run_bash(img + "\n" + localize(messages, readme_server), workdir))
    assert out.get("finish_reason") in ("stop", "length") and out["num_output_tokens"] > 0, out
    assert out["num_input_tokens"] > 40


def test_readme_tritonclient_snippet(readme_server, workdir):
    code = localize(block_with("python", "tritonclient.grpc", "start_stream"), readme_server)
    r = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines and not any("Error" in line or "exception" in line.lower() for line in lines), r.stdout
    assert len(lines) > 1 and all(line.startswith("[[b") for line in lines), r.stdout  # one per response
