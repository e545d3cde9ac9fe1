"""Docker cannot build here, so the Dockerfiles are checked for what can go wrong without a build:
sources they COPY exist, both start through the tested entrypoint, neither runs as root, and no
config is edited in place (settings go through `tritonvl serve --set`)."""

from __future__ import annotations

import re
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


def test_cuda_image_uses_ngc_triton_and_gpu_instances():
    text = (ROOT / "Dockerfile.triton").read_text()
    assert "ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3" in text
    assert 'TRITONVL_SET="vision_encoder.instance_kind=KIND_GPU llm.instance_kind=KIND_GPU"' in text
    from tritonvl.handlers.tools.repository import parse_sets

    sets = re.search(r'TRITONVL_SET="([^"]*)"', text).group(1).split()
    assert parse_sets(sets) == {"vision_encoder": {"instance_kind": "KIND_GPU"}, "llm": {"instance_kind": "KIND_GPU"}}


def test_ascend_image_uses_the_bundled_triton_on_npu():
    text = (ROOT / "Dockerfile.ascend").read_text()
    assert "TRITONVL_DEVICE=npu" in text and ".[server,npu]" in text
    assert "bundled_server()" in text  # the stub copied at build time, as root
