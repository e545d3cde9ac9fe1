"""The house's arrows point one way (docs/STRUCTURE.md, "Layers").

Inside ``handlers/`` a package imports only packages of lower layers (and itself); the client imports
nothing from ``handlers/``; the server's handlers import only ``tritonvl.client.rules`` from the client
(the gateway, a Triton client itself, may use the client library). Read from the source with ``ast``:
lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# lowest first; a module may import its own package and anything in a lower layer
LAYERS = [
    {"base"},  # handlers/*.py: errors-free helpers every model shares (params, sampling, modelinfo, ...)
    {"engine"},  # the continuous-batching engine: scheduler, runner, sampler, grammar, outputs
    {"tritonserver"},  # Triton plumbing: the pb_utils adapter, response pump, BLS front, watchdog
    {"llm", "preprocess", "vision"},  # one package per model of the repository
    {"gateway"},  # the OpenAI gateway (its own process; a client of Triton)
    {"tools"},  # launcher, repository copy, offline pipeline, CLI verbs
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def package_of(dotted: str) -> str | None:
    """'tritonvl.handlers.engine.sampler' -> 'engine'; a top-level handlers module -> 'base'."""
    parts = dotted.split(".")
    if parts[:2] != ["tritonvl", "handlers"]:
        return None
    if len(parts) == 2:
        return "base"
    return parts[2] if parts[2] in RANK else "base"


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file, relative ones resolved."""
    module = "tritonvl." + ".".join(path.relative_to(root).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
    return [(line, t) for line, t in out if t.startswith("tritonvl.")]


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted((root / "handlers").rglob("*.py")):
        pkg = path.relative_to(root / "handlers").parts[0] if path.parent != root / "handlers" else "base"
        for line, target in imports(path, root):
            where = f"{path.relative_to(root)}:{line} imports {target}"
            if target.startswith("tritonvl.client"):
                if pkg != "gateway" and not target.startswith("tritonvl.client.rules"):
                    found.append(f"{where}: the server takes only tritonvl.client.rules from the client")
                continue
            other = package_of(target)
            if other is None or other == pkg:
                continue
            if RANK[other] >= RANK[pkg]:
                found.append(f"{where}: {pkg} (layer {RANK[pkg]}) must not import {other} (layer {RANK[other]})")
    for path in sorted((root / "client").rglob("*.py")):
        for line, target in imports(path, root):
            if target.startswith("tritonvl.handlers"):
                found.append(f"{path.relative_to(root)}:{line} imports {target}: the client imports no server code")
        rules = path.parent == root / "client" / "rules"
        for line, target in imports(path, root) if rules else ():
            if not target.startswith("tritonvl.client.rules"):
                found.append(f"{path.relative_to(root)}:{line} imports {target}: client.rules stands alone")
    return found


def test_every_handlers_package_has_a_layer():
    packages = {p.name for p in (ROOT / "handlers").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(RANK), f"give {sorted(packages - set(RANK))} a layer here and in docs/STRUCTURE.md"


def test_imports_point_down():
    assert violations() == []


def test_an_import_that_runs_back_up_is_found(tmp_path):
    """The check itself: a copy of the tree with one upward import added fails it."""
    import shutil

    for name in ("handlers", "client"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    sampler = tmp_path / "handlers" / "engine" / "sampler.py"
    sampler.write_text(sampler.read_text() + "\nfrom tritonvl.handlers.llm.tensors import output_tensors\n")
    client = tmp_path / "client" / "params.py"
    client.write_text(client.read_text() + "\nfrom tritonvl.handlers.sampling import SamplingParams\n")
    found = violations(tmp_path)
    assert any("engine/sampler.py" in v and "must not import llm" in v for v in found), found
    assert any("client/params.py" in v and "imports no server code" in v for v in found), found
