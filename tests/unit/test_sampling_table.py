"""One sampling-field table (client/rules/sampling.py FIELDS): everything else is derived from it.

The public models' config.pbtxt files declare exactly its tensors; the client's and the server's
SamplingParams, the `sampling_parameters` JSON keys, the gateway's OpenAI keys and the CLI flags come
from it; and a field added to the table alone reaches all of them (a copy of the source tree with one
field added, imported in a subprocess).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tritonvl.client.rules.sampling import CLI_FIELDS, FIELDS, JSON_KEYS, OPENAI_KEYS, TENSOR_FIELDS

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = ("qwen2_5_vl", "qwen2_5_vl_ensemble", "preprocess")
# the public inputs that are not sampling fields (preprocess.preprocessor.raw_request reads them)
OTHER_INPUTS = {"text_input", "image", "video", "messages", "sampling_parameters", "stream",
                "exclude_input_in_output", "apply_chat_template", "guided_decoding_guide_type",
                "guided_decoding_guide", "mm_processor_kwargs", "return_logprobs", "top_logprobs", "tools",
                # TensorRT-LLM clients send these; accepted, the outputs come anyway
                "return_finish_reason", "return_num_input_tokens", "return_num_output_tokens"}
DTYPES = {"INT32": "TYPE_INT32", "FP32": "TYPE_FP32", "UINT64": "TYPE_UINT64", "BOOL": "TYPE_BOOL",
          "BYTES": "TYPE_STRING"}


def declared_inputs(model: str) -> dict[str, str]:
    """name -> data_type of a config.pbtxt's inputs."""
    text = (ROOT / "model_repository" / model / "config.pbtxt").read_text()
    block = text[text.index("input ["): text.index("output [")]
    return dict(re.findall(r'name:\s*"([^"]+)"\s*data_type:\s*(\w+)', block))


@pytest.mark.parametrize("model", PUBLIC)
def test_config_declares_exactly_the_tables_tensors(model):
    inputs = declared_inputs(model)
    for name, f in TENSOR_FIELDS.items():
        assert inputs.get(name) == DTYPES[f.tensor], f"{model}: input {name} should be {DTYPES[f.tensor]}"
    assert set(inputs) - OTHER_INPUTS == set(TENSOR_FIELDS), model


def test_derived_tables():
    from tritonvl.client.cli import build_parser
    from tritonvl.client.params import SamplingParams as ClientParams
    from tritonvl.handlers.gateway.mapping import SAMPLING
    from tritonvl.handlers.sampling import SamplingParams as ServerParams

    names = [f.name for f in FIELDS]
    assert [f.name for f in dataclasses.fields(ClientParams)] == names
    server = ServerParams()
    assert [f.name for f in dataclasses.fields(ServerParams)] == names
    assert {f.name: getattr(server, f.name) for f in FIELDS} == {
        f.name: list(f.default) if f.kind in ("strs", "ints") else f.default for f in FIELDS}
    assert set(SAMPLING) == set(OPENAI_KEYS)
    assert set(JSON_KEYS.values()) == set(names)
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["describe"]._actions}
    assert {f.name for f in CLI_FIELDS} <= flags


ADDED = '''    SamplingField("typical_p", "float", 1.0, "FP32", openai=("typical_p",), check=lambda v: 0 < v <= 1,
                  rule="must be in (0, 1]", finite=True, cli="typical sampling mass", doc="test-only field"),
'''

PROBE = r'''
import json
from tritonvl.client.params import SamplingParams
from tritonvl.client.cli import build_parser
from tritonvl.handlers.gateway.mapping import sampling
from tritonvl.handlers.sampling import build_sampling_params
out = {}
p = SamplingParams.from_kwargs(typical_p=0.5)
out["client_tensor"] = p.tensors().get("typical_p")
try:
    SamplingParams.from_kwargs(typical_p=2.0)
except ValueError as exc:
    out["client_rule"] = str(exc)
out["server_tensor"] = build_sampling_params({"typical_p": 0.25}, None).typical_p
out["server_json"] = build_sampling_params({}, json.dumps({"typical_p": 0.75})).typical_p
out["gateway"] = sampling({"typical_p": 0.5}).typical_p
args = build_parser().parse_args(["describe", "x.png", "--typical-p", "0.5"])
out["cli"] = args.typical_p
print(json.dumps(out))
'''


def test_a_field_added_to_the_table_alone_reaches_every_interface(tmp_path):
    pkg = tmp_path / "tritonvl"
    for name in ("handlers", "client"):
        shutil.copytree(ROOT / name, pkg / name, ignore=shutil.ignore_patterns("__pycache__"))
    table = pkg / "client" / "rules" / "sampling.py"
    text = table.read_text()
    anchor = '    SamplingField("n", "int", 1,'
    assert anchor in text
    table.write_text(text.replace(anchor, ADDED + anchor))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["client_tensor"] == [0.5, "FP32"]
    assert out["client_rule"].startswith("typical_p=2.0: must be in (0, 1]")
    assert out["server_tensor"] == 0.25 and out["server_json"] == 0.75
    assert out["gateway"] == 0.5 and out["cli"] == 0.5
