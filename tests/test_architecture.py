"""The package's layering, read from its source with ``ast`` (docs/architecture.md is the authority):

imports flow one way, down the layers below; no import cycle; no module over ~400 lines; no function
over ~60 lines without a reason written beside it; no in-function import of an s2d module; the names
the README imports exist.
"""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "s2d"

# Lower layers first; a module may import only from its own package or from a lower layer.
LAYERS = [
    ("s2d.utils", "s2d.spectral", "s2d.stats"),
    ("s2d.regularizer",),
    ("s2d.colinearity",),           # Colinearity Decay, the competing regularizer (torch only)
    ("s2d",),                       # the package root: the S2D facade (regularizer + spectral)
    ("s2d.integrations",),
    ("s2d.assets",),
    ("s2d.models",),
    ("s2d.collate",),
    ("s2d.data", "s2d.probes"),
    ("s2d.lowrank",),               # weight- and feature-space low-rank analysis (reads probes' input moments)
    ("s2d.quant",),
    ("s2d.deploy",),                # ONNX export and ONNX Runtime: lowers quant's quantizers
    ("s2d.train",),
    ("s2d.pipeline",),
    ("s2d.__main__",),
]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LONG_REASON = "long function:"      # written on the line above a longer function's ``def``
# modules allowed to import an s2d module inside a function, and why
LAZY_IMPORTS = {"s2d.assets.catalog": "the DINOv2 and SmolLM2 build steps pull in onnx / gguf + transformers only when they run"}


def _module_name(path: Path) -> str:
    parts = ["s2d", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(name: str) -> str:
    """The longest known module that ``name`` (a dotted import target) lies in."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(path: Path) -> list[tuple[str, ast.AST]]:
    """(imported s2d module, node) for every import statement in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(_resolve(a.name), node) for a in node.names if a.name.split(".")[0] == "s2d"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "s2d":
            for a in node.names:            # `from s2d.pkg import submodule` imports the submodule
                full = f"{node.module}.{a.name}"
                out.append((full if full in MODULES else _resolve(node.module), node))
    return out


GRAPH = {m: sorted({t for t, _ in _imports(p)} - {m}) for m, p in MODULES.items()}


def _layer(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for pre in prefixes:
            if (module == pre or module.startswith(pre + ".")) and (best is None or len(pre) > best[1]):
                best = (i, len(pre))
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_downward(module):
    for target in GRAPH[module]:
        if target == "s2d" or _package(target) != _package(module):
            assert _layer(target) < _layer(module), f"{module} imports {target}, which is not in a lower layer"


def test_no_import_cycles():
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in GRAPH[m]:
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m)


def test_cycle_detection_finds_a_planted_cycle():
    saved = dict(GRAPH)
    try:
        GRAPH["s2d.utils"] = ["s2d.train.loop"]         # utils -> train -> ... -> utils
        with pytest.raises(AssertionError, match="import cycle"):
            test_no_import_cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_MODULE_LINES, f"{module} has {n} lines (> {MAX_MODULE_LINES}): split it by concept"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_function_length(module):
    lines = MODULES[module].read_text().splitlines()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            n = node.end_lineno - node.lineno + 1
            reason = LONG_REASON in lines[first - 2] if first >= 2 else False
            assert n <= MAX_FUNCTION_LINES or reason, (
                f"{module}.{node.name} has {n} lines (> {MAX_FUNCTION_LINES}) and no '# {LONG_REASON} ...' above it")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_in_function_imports_of_s2d(module):
    tree = ast.parse(MODULES[module].read_text())
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "s2d" or (
                        isinstance(node, ast.Import) and any(a.name.split(".")[0] == "s2d" for a in node.names)):
                    assert module in LAZY_IMPORTS, (
                        f"{module}.{fn.name} imports an s2d module inside a function (line {node.lineno})")


def _readme_imports() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    pairs = []
    for block in blocks:
        for m in re.finditer(r"^from (s2d[\w.]*) import ([\w, ]+)", block, flags=re.M):
            pairs += [(m.group(1), name.strip()) for name in m.group(2).split(",")]
    return pairs


def test_readme_names_exist():
    pairs = _readme_imports()
    assert len(pairs) >= 8
    for module, name in pairs:
        if module == "s2d.integrations.lightning":
            pytest.importorskip("lightning")
        assert hasattr(importlib.import_module(module), name), f"README imports {name} from {module}"


@pytest.mark.parametrize("package", ["s2d", "s2d.quant", "s2d.probes", "s2d.deploy"])
def test_public_api_is_exported(package):
    mod = importlib.import_module(package)
    assert mod.__all__ and all(hasattr(mod, n) for n in mod.__all__)
    readme = {name for module, name in _readme_imports() if module == package}
    assert readme <= set(mod.__all__), f"{package} does not export {sorted(readme - set(mod.__all__))}"
