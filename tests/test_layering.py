"""The pure-torch part of the package stays pure torch: ``moe_kernels.layers``, ``moe_kernels.losses``,
``ops.py``, ``spec.py`` and ``_lazy.py`` import neither transformers nor the Hugging Face parts of the package
(``moe_kernels.hf``, ``moe_kernels.models``), checked on the source (every import statement, also
inside functions) and by importing them in a fresh interpreter."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "moe_kernels")
HF_MODULES = ("transformers", "moe_kernels.hf", "moe_kernels.models")


def _pure_sources() -> list[str]:
    layers = os.path.join(PACKAGE, "layers")
    files = [os.path.join(layers, f) for f in sorted(os.listdir(layers)) if f.endswith(".py")]
    return files + [os.path.join(PACKAGE, f) for f in ("ops.py", "spec.py", "losses.py", "_lazy.py")]


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement of ``source``, a module of ``package``."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


@pytest.mark.parametrize("path", _pure_sources(), ids=lambda p: os.path.relpath(p, ROOT))
def test_pure_modules_import_no_hugging_face_code(path):
    with open(path, encoding="utf-8") as f:
        source = f.read()
    name = _module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    offending = [(line, module) for line, module in _imported_modules(source, package)
                 if any(module == m or module.startswith(m + ".") for m in HF_MODULES)]
    assert not offending, f"{os.path.relpath(path, ROOT)} imports {offending}"


def test_the_import_check_sees_relative_and_nested_imports():
    source = "def f():\n    from ..models import generation\n    import transformers\nfrom .. import hf\n"
    modules = {m for _, m in _imported_modules(source, "moe_kernels.layers")}
    assert {"moe_kernels.models.generation", "transformers", "moe_kernels.hf"} <= modules


def test_importing_the_layers_does_not_import_transformers():
    code = ("import sys, moe_kernels.layers as L, moe_kernels.losses\n"
            "L.SparseMoE, L.AdapterMoE, L.LoRAMoE, L.CoELayer\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'"
            " or m.startswith(('moe_kernels.hf', 'moe_kernels.models')))\n"
            "assert not loaded, loaded\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_token_fuser_is_still_reachable_from_layers():
    import moe_kernels.layers as layers
    from moe_kernels.models.ultrafuser import TokenFuser

    assert layers.TokenFuser is TokenFuser
    with pytest.raises(AttributeError, match="no attribute"):
        layers.NotALayer  # noqa: B018
