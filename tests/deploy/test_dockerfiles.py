"""Docker cannot build here, so the Dockerfiles are checked for what can go wrong without a build:
sources they COPY exist, both start through the tested entrypoint, neither runs as root, no config
is edited in place (settings go through `tritonvl serve --set`), the CUDA image's Triton is one that
NVIDIA's security bulletins call fixed, and neither image turns the OpenAI gateway on by default."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["Dockerfile.triton", "Dockerfile.ascend"])
def test_dockerfile(name):
    text = (ROOT / name).read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("ARG ") and any(ln.startswith("FROM ") for ln in lines)
    for ln in lines:
        if ln.startswith("COPY "):
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path"
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), f"{name} runs as {users[-1:]}"
    assert lines[-1] == 'ENTRYPOINT ["tini", "--", "/opt/tritonvl/scripts/entrypoint.sh"]'
    assert "COPY scripts/entrypoint.sh ./scripts/entrypoint.sh" in lines
    assert "TRITONVL_MODEL_REPOSITORY=/opt/tritonvl/model_repository" in text  # non-editable install
    assert "sed " not in text


# NVIDIA's Triton bulletins name the first fixed release: 25.07 for CVE-2025-23319/-23320/-23334/
# -23310/-23311 (August 2025), r26.03 for the restricted-API authentication bypass CVE-2026-24207
# (the entrypoint relies on restricted APIs), r26.07 for the newest one seen (docs/DEPLOY.md).
FIRST_FIXED = (26, 7)


def ngc_release(text: str) -> tuple[int, int]:
    m = re.search(r"^ARG TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3$", text, re.M)
    assert m, "Dockerfile.triton: TRITON_IMAGE is not an NGC tritonserver YY.MM-py3 tag"
    return int(m.group(1)), int(m.group(2))


def test_cuda_image_triton_carries_the_security_fixes():
    text = (ROOT / "Dockerfile.triton").read_text()
    assert ngc_release(text) >= FIRST_FIXED >= (25, 7)
    assert ngc_release("ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3") < FIRST_FIXED  # the old base
    # nvidia-pytriton (from the server extra) bundles tritonserver 2.51, the launcher's fallback: gone
    assert "pip uninstall -y nvidia-pytriton" in text
    # numpy<2 in the stub's interpreter, as NVIDIA installs it for the Python backend (FACTS.md)
    assert "numpy.__version__.split('.')[0]) >= 2" in text


def test_the_launcher_takes_the_images_tritonserver(monkeypatch):
    """In the CUDA image `tritonvl serve` must run the NGC server on PATH, never a bundled one."""
    from tritonvl.handlers.tools import launcher

    monkeypatch.delenv("TRITONVL_BUNDLED_SERVER", raising=False)
    monkeypatch.setattr(launcher.shutil, "which", lambda name: "/opt/tritonserver/bin/tritonserver")
    monkeypatch.setattr(launcher, "bundled_server", lambda: pytest.fail("fell back to the bundled 2.51"))
    assert launcher.find_server().binary == "/opt/tritonserver/bin/tritonserver"


def image_env(name: str) -> dict[str, str]:
    env = {}
    for line in re.sub(r"\\\n", " ", (ROOT / name).read_text()).splitlines():
        if line.startswith("ENV "):
            env.update(tok.partition("=")[::2] for tok in shlex.split(line[4:]))
    return env


@pytest.mark.parametrize("name", ["Dockerfile.triton", "Dockerfile.ascend"])
def test_the_gateway_is_off_unless_asked_for(name):
    """The entrypoint starts the gateway only with TRITONVL_OPENAI_PORT, and then only with a key:
    no image sets either (a key baked into an image is no secret)."""
    env = image_env(name)
    assert "TRITONVL_MODEL_REPOSITORY" in env  # the parse works
    assert not {"TRITONVL_OPENAI_PORT", "TRITONVL_API_KEY", "TRITONVL_ADMIN_KEY"} & set(env)


def test_cuda_image_uses_ngc_triton_and_gpu_instances():
    text = (ROOT / "Dockerfile.triton").read_text()
    assert "ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:" in text
    assert 'TRITONVL_SET="vision_encoder.instance_kind=KIND_GPU llm.instance_kind=KIND_GPU"' in text
    from tritonvl.handlers.tools.repository import parse_sets

    sets = re.search(r'TRITONVL_SET="([^"]*)"', text).group(1).split()
    assert parse_sets(sets) == {"vision_encoder": {"instance_kind": "KIND_GPU"}, "llm": {"instance_kind": "KIND_GPU"}}


def test_ascend_image_uses_the_bundled_triton_on_npu():
    text = (ROOT / "Dockerfile.ascend").read_text()
    assert "TRITONVL_DEVICE=npu" in text and ".[server,npu]" in text
    assert "bundled_server()" in text  # the stub copied at build time, as root
