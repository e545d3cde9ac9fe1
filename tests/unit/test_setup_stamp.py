"""scripts/setup.sh's "already set up" check: a stamp is not enough, the install must be this checkout's.

Cheap form (no pip): the installed tritonvl resolves to the repository these tests run from; a second
checkout with its own stamp must still be found "not set up" (its python imports the other clone).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import tritonvl.handlers

REPO = Path(__file__).resolve().parents[2]


def setup_sh(checkout: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    return subprocess.run(["bash", str(checkout / "scripts" / "setup.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_stamp_of_another_checkout_does_not_count_as_set_up(tmp_path):
    if Path(tritonvl.handlers.__file__).resolve().parents[1] != REPO:
        pytest.skip("tritonvl is installed from another checkout than these tests")
    if shutil.which("perf_analyzer") is None:
        pytest.skip("not set up here (no perf_analyzer): source scripts/env.sh")
    cache = tmp_path / "cache"
    other = tmp_path / "other-clone"
    (other / "scripts").mkdir(parents=True)
    for f in ("pyproject.toml", "scripts/setup.sh"):
        shutil.copy(REPO / f, other / f)

    for checkout in (REPO, other):  # both "set up": their stamps exist
        stamp = Path(setup_sh(checkout, cache, "--stamp").stdout.strip())
        assert stamp.parent == cache / "tritonvl"
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()

    here = setup_sh(REPO, cache, "--check")
    assert here.returncode == 0, here.stdout + here.stderr
    there = setup_sh(other, cache, "--check")
    assert there.returncode == 1
    assert f"installed from {REPO}" in there.stdout and str(other.resolve()) in there.stdout
