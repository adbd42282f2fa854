"""The rooms and which way their imports go (README, "What is where").

    cli/         the front door: the `lumiere` command and the demo; imports any room, none imports it
    serve/       Ray Serve: the Videos API; imports the model library, never training code
    pipelines/   ingest/ and train/: the Ray Data and Ray Train jobs; import the model library
    infra/       the operators' files and infra.kuberay (behind `lumiere k8s`)
    lumiere/     the model library: no Ray, no pipelines, no serve, no Kubernetes client, no cli, no infra

Each module is imported in a fresh interpreter and the top-level packages it loaded are read from sys.modules.
That catches a forbidden import at module level; imports inside functions (the lazy ones this layout is meant to
remove) are caught by reading the module's source: every `import X` / `from X import` anywhere in it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

MODEL_FORBIDDEN = {"ray", "pipelines", "serve", "kubernetes", "infra", "cli"}
SERVE_FORBIDDEN = {"pipelines", "cli", "infra", "kubernetes"}
PIPELINES_FORBIDDEN = {"serve", "cli", "infra", "kubernetes"}


def modules(package: str) -> list[str]:
    root = ROOT / package
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in root.rglob("*.py")
    )


def loaded_top_level(module: str) -> set[str]:
    """The top-level packages in sys.modules after importing `module` in a fresh interpreter."""
    code = (f"import sys, json; import {module}; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, f"import {module} failed: {proc.stderr.strip().splitlines()[-1:]}"
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def imported_anywhere(module: str) -> set[str]:
    """Every top-level package named by an import statement anywhere in the module, functions included."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


# lumiere.pipeline, .checkpoint, .trainer, ... each in its own interpreter: the slow part (torch, diffusers) is
# the same for all, so they run in one subprocess per module but share nothing else
@pytest.mark.parametrize("module", modules("lumiere"))
def test_the_model_library_loads_no_ray_pipelines_serve_or_kubernetes(module):
    assert not loaded_top_level(module) & MODEL_FORBIDDEN


@pytest.mark.parametrize("module", modules("lumiere"))
def test_the_model_library_imports_no_ray_pipelines_serve_or_kubernetes_even_lazily(module):
    assert not imported_anywhere(module) & MODEL_FORBIDDEN


@pytest.mark.parametrize("module", modules("serve"))
def test_serving_imports_no_training_code(module):
    assert not imported_anywhere(module) & SERVE_FORBIDDEN


def test_serving_loads_no_training_code():
    # serve.app is the Serve entry point (`import_path: serve.app:build_app`): it imports every serve module
    assert not loaded_top_level("serve.app") & SERVE_FORBIDDEN


@pytest.mark.parametrize("module", modules("pipelines"))
def test_the_pipelines_import_neither_serving_nor_the_front_door(module):
    assert not imported_anywhere(module) & PIPELINES_FORBIDDEN


def test_ingest_and_training_do_not_import_each_other():
    for room, other in (("ingest", "pipelines.train"), ("train", "pipelines.ingest")):
        for module in modules(f"pipelines/{room}"):
            path = ROOT / (module.replace(".", "/") + ".py")
            if not path.exists():
                path = ROOT / module.replace(".", "/") / "__init__.py"
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    assert not node.module.startswith(other), (module, node.module)


def test_nothing_below_imports_the_front_door_or_infra():
    for package in ("lumiere", "pipelines", "serve"):
        for module in modules(package):
            assert not imported_anywhere(module) & {"cli", "infra"}, module
