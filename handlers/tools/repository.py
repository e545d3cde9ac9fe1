"""A copy of the model repository with some settings changed (``tritonvl serve --set``, tests, benchmarks).

One implementation for every caller: ``parse_sets`` turns ``MODEL.KEY=VALUE`` strings into overrides
and checks each against handlers/params.py; ``repository_with`` copies the repository, rewrites the
copies' config.pbtxt (a parameter is replaced or added; ``instance_count``/``instance_kind`` rewrite
the instance group, ``max_queue_delay_microseconds``/``preferred_batch_size`` the dynamic batcher)
and reads every model's parameters back through the table, so a bad value fails here, before any
server starts. Torch-free.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from tritonvl.handlers import params as P

REPO_ROOT = Path(__file__).resolve().parents[2]

Overrides = dict[str, dict[str, str]]  # {model: {key: value}}

_STRING = r'"((?:[^"\\]|\\.)*)"'


def parse_sets(items: Iterable[str]) -> Overrides:
    """``["llm.max_num_seqs=3", ...]`` -> {"llm": {"max_num_seqs": "3"}}; ParamError names a bad one."""
    out: Overrides = {}
    for item in items:
        target, eq, value = item.partition("=")
        model, dot, key = target.strip().partition(".")
        if not eq or not dot or not key:
            raise P.ParamError(f"--set {item!r}: expected MODEL.KEY=VALUE (e.g. llm.max_num_seqs=16)")
        out.setdefault(model, {})[key.strip()] = value.strip()
    check_overrides(out)
    return out


def check_overrides(overrides: Overrides) -> None:
    for model, values in overrides.items():
        for key, value in values.items():
            P.check(model, key, str(value))


def shared_max_model_len(overrides: Overrides) -> Overrides:
    """One max_model_len: ``llm.max_model_len`` also sets preprocess's (which refuses what cannot fit
    before the vision step runs), unless preprocess is given its own."""
    value = overrides.get("llm", {}).get("max_model_len")
    if value is None or "max_model_len" in overrides.get("preprocess", {}):
        return overrides
    return {**overrides, "preprocess": {**overrides.get("preprocess", {}), "max_model_len": value}}


def _quote(value: str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_parameters(text: str) -> dict[str, str]:
    """The ``parameters`` string values of a config.pbtxt text."""
    pattern = rf"parameters\s*:?\s*\{{\s*key\s*:\s*{_STRING}\s*value\s*:\s*\{{\s*string_value\s*:\s*{_STRING}"
    return {k: re.sub(r"\\(.)", r"\1", v) for k, v in re.findall(pattern, text)}


def _set_parameter(text: str, key: str, value: str) -> str:
    pattern = (
        rf'(parameters\s*:?\s*\{{\s*key\s*:\s*"{re.escape(key)}"\s*value\s*:\s*\{{\s*string_value\s*:\s*)'
        rf"{_STRING}"
    )
    text, n = re.subn(pattern, lambda m: m.group(1) + _quote(value), text)
    if n == 0:  # absent: add it
        text = (
            text.rstrip("\n")
            + f"\nparameters: {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}\n"
        )
    return text


def _set_field(text: str, block: str, name: str, value: str) -> str:
    """Set ``name: value`` in the first ``{...}`` of ``block`` (instance_group or dynamic_batching);
    add the field, or the whole block, when absent."""
    group = block == "instance_group"  # instance_group [ { count: 1, kind: KIND_CPU } ]
    opener = r":?\s*\[" if group else ":?"
    m = re.search(rf"{block}\s*{opener}\s*\{{([^{{}}]*)\}}", text)
    if m is None:
        entry = f"{{ {name}: {value} }}"
        return text.rstrip("\n") + f"\n{block} " + (f"[ {entry} ]" if group else entry) + "\n"
    body = m.group(1)
    field_re = rf"\b{name}\s*:\s*(\[[^\]]*\]|[\w.]+)"
    if re.search(field_re, body):
        body = re.sub(field_re, f"{name}: {value}", body, count=1)
    else:  # instance_group entries separate fields with commas
        body = body.rstrip() + ("," if group and body.strip() else "") + f" {name}: {value} "
    return text[: m.start(1)] + body + text[m.end(1) :]


def edit_config(text: str, values: dict[str, str]) -> str:
    """config.pbtxt ``text`` with ``values`` (parameters and SETTINGS keys, already checked) applied."""
    for key, value in values.items():
        if key == "instance_count":
            text = _set_field(text, "instance_group", "count", str(int(value)))
        elif key == "instance_kind":
            text = _set_field(text, "instance_group", "kind", value.upper())
        elif key == "max_queue_delay_microseconds":
            text = _set_field(text, "dynamic_batching", key, str(int(value)))
        elif key == "preferred_batch_size":
            sizes = ", ".join(str(int(s)) for s in value.split(",") if s.strip())
            text = _set_field(text, "dynamic_batching", key, f"[ {sizes} ]")
        else:
            text = _set_parameter(text, key, value)
    return text


def default_model_repository() -> Path:
    """`model_repository/` of this checkout (editable install), else $TRITONVL_MODEL_REPOSITORY."""
    env = os.environ.get("TRITONVL_MODEL_REPOSITORY")
    return Path(env) if env else REPO_ROOT / "model_repository"


def repository_with(dest: str | Path, overrides: Overrides, repo: Path | None = None) -> Path:
    """Copy the model repository (default: this checkout's) to ``dest`` with ``overrides`` applied.

    Raises ParamError, before writing anything, for an unknown model or key or a bad value; and after
    the copy when a model's resulting parameters (the repository's own included) break the table.
    """
    check_overrides(overrides)
    overrides = shared_max_model_len(overrides)
    dest = Path(dest)
    shutil.copytree(repo or default_model_repository(), dest, ignore=shutil.ignore_patterns("__pycache__"))
    for model in P.MODELS:
        cfg = dest / model / "config.pbtxt"
        if not cfg.is_file():
            if model in overrides:
                raise P.ParamError(f"{model}: no {cfg}")
            continue
        text = edit_config(cfg.read_text(), overrides.get(model, {}))
        P.read(model, config_parameters(text))
        cfg.write_text(text)
    return dest
