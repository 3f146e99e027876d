"""The import rule of docs/ARCHITECTURE.md, read from the source: every module imports only from its own layer or
the layers below it.

    0  thinkless (the version), thinkless.kernels, thinkless._C     the kernels: torch and Triton only
    1  thinkless.train                                              the trainer's stages and their support
    2  thinkless.demo                                               the CPU demo, built on the trainer
    3  thinkless.cli                                                `thinkless-train`: may import everything

Imports inside functions count too (a lazy import is still an arrow), and so do `importlib.import_module("...")`
and `__import__("...")` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import thinkless

LAYERS = (("thinkless.cli", 3), ("thinkless.demo", 2), ("thinkless.train", 1), ("thinkless", 0))


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name inside the package (None: outside it)."""
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def _imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of everything a module imports, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y / from .. import z
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.append((node.lineno, base))
            # `from thinkless import demo` imports a subpackage: the name counts as a module too
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            literal = node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            if name in ("import_module", "__import__") and literal:
                found.append((node.lineno, node.args[0].value))
    return found


def violations(root: Path) -> list[str]:
    """Every import in the package at `root` (a folder named thinkless) that points to a higher layer."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        is_package = rel.name == "__init__"
        module = ".".join(rel.parts[:-1] if is_package else rel.parts)
        own = layer_of(module)
        for line, name in _imported(ast.parse(path.read_text(), str(path)), module, is_package):
            target = layer_of(name)
            if target is not None and own is not None and target > own:
                out.append(f"{path.relative_to(root.parent)}:{line}: {module} (layer {own}) imports {name} "
                           f"(layer {target})")  # fmt: skip
    return out


def test_the_package_keeps_the_import_rule():
    assert violations(Path(thinkless.__file__).parent) == []


def test_the_rule_catches_arrows_up_the_layers(tmp_path):
    """The checker itself, on a small tree: each kind of arrow up is caught, the allowed ones are not."""
    pkg = tmp_path / "thinkless"
    files = {
        "__init__.py": "__version__ = '0'\n",
        "kernels/__init__.py": "",
        "kernels/loss.py": "import torch\nfrom thinkless.kernels import reference\n",
        "kernels/bad.py": "def f():\n    from thinkless.train import rl\n",  # a lazy import: still an arrow
        "train/__init__.py": "",
        "train/rl.py": "from thinkless.kernels import loss\nfrom . import data\n",
        "train/data.py": "import thinkless.demo.task\n",
        "train/cli_like.py": "import importlib\nimportlib.import_module('thinkless.demo.run')\n",
        "train/relative.py": "from ..demo import run\n",
        "train/subpackage.py": "from thinkless import demo\n",
        "demo/__init__.py": "",
        "demo/run.py": "from thinkless.train import rl\n",
        "demo/task.py": "from thinkless.cli import main\n",
        "cli.py": "from thinkless.demo import run\nfrom thinkless.train import rl\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    found = violations(pkg)
    flagged = sorted({line.split(":")[0] for line in found})
    assert flagged == [
        "thinkless/demo/task.py", "thinkless/kernels/bad.py", "thinkless/train/cli_like.py",
        "thinkless/train/data.py", "thinkless/train/relative.py", "thinkless/train/subpackage.py",
    ], found  # fmt: skip
    assert "thinkless.kernels.bad (layer 0) imports thinkless.train (layer 1)" in " ".join(found)


def test_kernels_exports_load_on_first_use_and_stay_functions():
    """`thinkless.kernels` imports a name's module when the name is first asked for: the settings' schema loads
    without Triton; a submodule imported first (`degrpo_loss`, named like its function) does not hide the function;
    submodules stay reachable as attributes. Fresh interpreters: this one has imported everything already."""
    import subprocess
    import sys

    checks = {
        "import thinkless.train.config, sys; assert 'triton' not in sys.modules, 'the config loaded Triton'",
        "import thinkless.kernels.degrpo_loss, thinkless.kernels as k; assert callable(k.degrpo_loss)",
        "import thinkless.kernels.fused_linear; from thinkless.kernels import degrpo_loss as f; assert callable(f)",
        "import thinkless.kernels as k; assert k.fused_linear.__name__ == 'thinkless.kernels.fused_linear'",
        "from thinkless.kernels import *; assert callable(degrpo_loss) and callable(token_logprobs)",
    }
    for code in sorted(checks):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == 0, f"{code}\n{proc.stderr[-2000:]}"
