"""The layout's rules, checked on the source (docs/architecture.md):

* no import cycles between the project's modules, counting imports inside functions too (a cycle
  hidden inside a function is still a cycle);
* networks (models/) depend on nothing that trains, infers, calibrates or evaluates;
* no module imports another module's private (``_underscore``) names;
* imports inside functions are kept to optional dependencies and to modules that only one flag
  or one path needs, each listed here with its reason;
* single-process inference starts without Lightning, matplotlib or highdicom.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "models", "training", "inference", "calibration", "evaluation", "benchmarks")
SCRIPTS = ("train", "infer", "evaluate")
# project imports allowed inside a function: (importing module, imported module) -> why
LAZY_IMPORTS = {
    ("infer", "inference.onnx"): "--backend onnx only (onnxruntime)",
    ("inference.loading", "training.export"): "a training checkpoint given instead of a bundle",
    ("training.export", "inference.onnx"): "--onnx only (onnx, onnxscript)",
    ("inference.pipeline", "inference.dicom_out"): "--dicom-sr / --dicom-sc only (highdicom)",
}
# what a package may import at all (besides itself)
LAYERS = {
    "data": set(),
    "models": {"data"},
}


def _modules() -> dict[str, Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")] + [ROOT / f"{s}.py" for s in SCRIPTS]
    out = {}
    for p in files:
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _project_module(name: str) -> str | None:
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports():
    """(importer, imported module, imported names, at top level?, line) for each project import."""
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _project_module(alias.name)
                    if target and target != mod:
                        yield mod, target, [], id(node) in top, node.lineno
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    target = _project_module(f"{node.module}.{alias.name}") or _project_module(node.module)
                    if target and target != mod:
                        yield mod, target, [alias.name], id(node) in top, node.lineno


IMPORTS = list(_imports())


def test_no_import_cycles():
    graph = defaultdict(set)
    for mod, target, _, _, _ in IMPORTS:
        graph[mod].add(target)
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(MODULES)))
    for v in MODULES:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_networks_and_inputs_depend_on_nothing_above_them():
    wrong = [(mod, target, line) for mod, target, _, _, line in IMPORTS
             if mod.split(".")[0] in LAYERS and target.split(".")[0] != mod.split(".")[0]
             and target.split(".")[0] not in LAYERS[mod.split(".")[0]]]
    assert not wrong, f"imports across layers: {wrong}"


def test_no_module_imports_another_modules_private_names():
    private = [(mod, target, name, line) for mod, target, names, _, line in IMPORTS for name in names
               if name.startswith("_") and not name.startswith("__")]
    assert not private, f"private names imported across modules: {private}"


def test_imports_inside_functions_are_the_listed_lazy_ones():
    lazy = {(mod, target) for mod, target, _, top, _ in IMPORTS if not top}
    unexpected = sorted(lazy - set(LAZY_IMPORTS))
    assert not unexpected, f"project imports inside functions (hoist them, or list them with a reason): {unexpected}"


def test_inference_starts_without_training_and_plotting_libraries():
    code = ("import sys, infer, inference.pipeline, inference.loading; "
            "print(' '.join(m for m in ('lightning', 'matplotlib', 'highdicom', 'monai', 'timm', 'torchvision', "
            "'albumentations', 'sklearn', 'scipy') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "", f"imported at inference start-up: {loaded.stdout.strip()}"
