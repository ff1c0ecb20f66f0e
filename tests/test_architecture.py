"""The package's layers, as docs/architecture.md draws them, checked on the source: no import cycles (at
module level or inside functions), each layer importing only what it may, and no plotting code in a
training process."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dualadam_hf"

# layer -> the package layers it may import (itself included); the root package and the old-path shim
# are the public face and may import the layers they re-export
MAY_IMPORT = {
    "optim": {"optim"},
    "models": {"models"},
    "hf": {"hf", "optim"},
    "train": {"train", "hf", "models", "optim"},
    "analysis": {"analysis", "train", "hf", "models", "optim"},
    "serve": {"serve", "train", "hf", "models"},
}
# third-party packages each layer may not import, at any depth (torchao: see test_torchao_stays_optional)
FORBIDDEN_EXTERNAL = {
    "optim": {"transformers", "accelerate", "datasets", "peft", "deepspeed", "matplotlib", "tokenizers"},
    "models": {"matplotlib", "datasets"},
    "hf": {"matplotlib"},
    "train": {"matplotlib"},
    "serve": {"matplotlib"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Every module this one imports, anywhere in it (function bodies included), relative imports resolved.

    As for Python's own imports, a parent package's ``__init__`` that runs on the way to a submodule is
    not counted; ``from package import submodule`` imports the submodule only."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            submodules = {f"{base}.{alias.name}" for alias in node.names} & set(MODULES)
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in the module itself, not only its submodules
                found.add(base)
    return found


GRAPH = {name: {target for target in imports_of(name) if target in MODULES} for name in MODULES}


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and name in MODULES and MODULES[name].name == "__init__.py") else None


def test_the_graph_sees_the_imports_inside_functions():
    # a guard on the checker itself: finetune imports the model loader inside a function
    assert "dualadam_hf.models.loading" in GRAPH["dualadam_hf.train.finetune"]
    assert "dualadam_hf.optim.fused" in GRAPH["dualadam_hf.optim.dualadam"]


def test_no_import_cycles():
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", sorted(name for name in MODULES if layer(name) in MAY_IMPORT))
def test_each_layer_imports_only_the_layers_below_it(name):
    own = layer(name)
    for target in GRAPH[name]:
        target_layer = layer(target)
        if target_layer is not None:
            assert target_layer in MAY_IMPORT[own], f"{name} ({own}) imports {target} ({target_layer})"
    external = {target.split(".")[0] for target in imports_of(name)}
    assert not external & FORBIDDEN_EXTERNAL.get(own, set()), f"{name} imports {external & FORBIDDEN_EXTERNAL[own]}"


def test_the_optim_layer_runs_on_torch_alone():
    # importing dualadam_hf.optim runs dualadam_hf/__init__ first (registration); load the layer's files alone
    loader = (
        "import importlib.util, sys, types\n"
        f"root = {str(PACKAGE)!r}\n"
        "for name, path in [('dualadam_hf', None), ('dualadam_hf.optim', root + '/optim/__init__.py')]:\n"
        "    if path is None:\n"
        "        module = types.ModuleType(name); module.__path__ = [root]; sys.modules[name] = module; continue\n"
        "    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=[root + '/optim'])\n"
        "    module = importlib.util.module_from_spec(spec); sys.modules[name] = module; spec.loader.exec_module(module)\n"
        "import dualadam_hf.optim.diagnostics\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'accelerate', 'datasets', 'matplotlib'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", loader], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "command",
    [
        ["-c", "import dualadam_hf"],
        ["scripts/finetune.py", "recipes/tiny_alpaca.yaml", "--dry_run", "true"],
        ["scripts/finetune.py", "recipes/pangu_alpaca.yaml", "--dry_run", "true"],
        ["scripts/train_vision.py", "recipes/vision_digits.yaml", "--dry_run", "true"],
    ],
    ids=["import", "finetune dry run", "openpangu dry run", "vision dry run"],
)
def test_a_training_process_loads_no_plotting_code(command, tmp_path):
    probe = (
        "import atexit, sys, runpy\n"
        "atexit.register(lambda: print('MATPLOTLIB' if 'matplotlib' in sys.modules else 'CLEAN', file=sys.stderr))\n"
    )
    if command[0] == "-c":
        probe += command[1] + "\n"
    else:
        argv = [*command, "--output_dir", str(tmp_path / "run")]
        probe += f"sys.argv = {argv!r}\nsys.path.insert(0, 'scripts')\nrunpy.run_path({command[0]!r}, run_name='__main__')\n"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "CLEAN", result.stderr[-2000:]


def top_level_imports(name: str) -> set[str]:
    """The modules a module imports when it is imported (statements at its top level only)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_torchao_stays_optional():
    # imported inside functions only: by optim.lowbit when a low-bit optimizer is built (its state), and by
    # analysis.bench for torchao's AdamW8bit/AdamW4bit, the low-bit optimizers' timing baselines
    importers = {name for name in MODULES if "torchao" in {target.split(".")[0] for target in imports_of(name)}}
    assert importers == {"dualadam_hf.optim.lowbit", "dualadam_hf.analysis.bench"}
    for name in MODULES:
        assert "torchao" not in {target.split(".")[0] for target in top_level_imports(name)}, name


def test_importing_the_package_prints_nothing():
    # transformers imports torchao whenever it is installed, and torchao's import logs lines on CPU machines
    result = subprocess.run([sys.executable, "-c", "import dualadam_hf"], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stderr[-2000:]


def test_triton_stays_optional():
    """Only the kernel modules import Triton at their top, and nothing imports them at its top: without
    Triton (it has wheels for Linux only) the package imports and DualAdam steps on the CPU."""
    at_top = {name for name in MODULES if "triton" in {target.split(".")[0] for target in top_level_imports(name)}}
    assert at_top and all(name.startswith("dualadam_hf.optim.triton") and name.endswith("kernels") for name in at_top)
    for name in set(MODULES) - at_top:
        assert not at_top & top_level_imports(name), name
    blocked = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from dualadam_hf import DualAdam\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "DualAdam([p], lr=0.1).step(); assert p.lt(1).all()\n"
    )
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
