"""The tritonserver command line: Triton's auto-complete step is skipped only where it would change
nothing (this repository's Python and ensemble models); any other repository keeps it."""

import shutil

from tritonvl.handlers.tools.launcher import Server, auto_complete_changes_nothing, server_command
from tritonvl.handlers.tools.repository import default_model_repository

FLAG = "--disable-auto-complete-config"


def command(repo, extra=()):
    return server_command(Server("tritonserver", None), repo, 1, 2, 3, list(extra))


def test_this_repository_starts_without_the_auto_complete_stubs(tmp_path):
    repo = default_model_repository()
    assert auto_complete_changes_nothing(repo)
    assert FLAG in command(repo)
    assert command(repo, ["--strict-model-config=false"]).count(FLAG) == 0  # the caller's choice stands
    assert command(repo, [FLAG]).count(FLAG) == 1
    assert command(repo, ["--log-verbose=1"])[-1] == "--log-verbose=1"  # the caller's flags stay last


def test_a_repository_that_auto_complete_could_change_keeps_it(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(default_model_repository(), repo, ignore=shutil.ignore_patterns("__pycache__"))
    assert FLAG in command(repo)

    own = repo / "mine" / "1"  # a Python model that completes its own config
    own.mkdir(parents=True)
    (repo / "mine" / "config.pbtxt").write_text('backend: "python"\n')
    (own / "model.py").write_text("class TritonPythonModel:\n    @staticmethod\n"
                                  "    def auto_complete_config(config):\n        return config\n")
    assert not auto_complete_changes_nothing(repo) and FLAG not in command(repo)

    shutil.rmtree(repo / "mine")
    (repo / "onnx_model" / "1").mkdir(parents=True)  # another backend fills inputs and outputs in
    (repo / "onnx_model" / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    assert FLAG not in command(repo)

    (repo / "onnx_model" / "config.pbtxt").unlink()  # no config at all: Triton writes it
    assert FLAG not in command(repo)
    assert not auto_complete_changes_nothing(tmp_path / "absent")
