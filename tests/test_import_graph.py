"""The layers import downwards only, one road: nn -> functional -> ops -> (_dispatch, backends). Shared leaves
(activations, layout, _validate) may be imported from any layer; a layer never imports one above it, and nn never
skips functional to reach the ops, the registry or a backend."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "hyperkernels"
LEAVES = {"activations", "layout", "_validate", "_cuda"}
# What each layer may import from the package, besides the leaves and itself.
ALLOWED = {
    "nn": {"functional"},
    "functional": {"ops"},
    "ops": {"_dispatch", "backends"},
    "_dispatch": {"backends"},
    "backends": set(),
}


def _layer(module: str) -> str:
    return module.split(".")[0]


def _imports(path: pathlib.Path) -> set:
    """The package-relative modules a file imports (``from ..functional import x`` -> "functional")."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("hyperkernels."):
                target = node.module.split(".")[1:]
            else:
                continue
            if not target:  # "from .. import x": x is a module of the package root
                found.update(alias.name for alias in node.names)
            else:
                found.add(".".join(target))
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("hyperkernels."))
    return found


# The package's __init__ is the public facade over every layer: it alone may import from all of them.
FILES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_imports_go_down_one_road(path):
    own = path.relative_to(PACKAGE).with_suffix("").parts[0]
    if own not in ALLOWED:
        assert own in LEAVES, f"{path}: a module outside the known layers; add it to ALLOWED or LEAVES"
        allowed = LEAVES | {"_dispatch"} if own == "_validate" else LEAVES
    else:
        allowed = LEAVES | ALLOWED[own] | {own}
    wrong = sorted(m for m in _imports(path) if _layer(m) not in allowed)
    assert not wrong, f"{path.relative_to(PACKAGE)} ({own}) imports {wrong}; it may import only {sorted(allowed)}"


def test_the_check_sees_imports():
    """The parser finds relative and absolute imports, so the test above can fail."""
    assert "functional" in _imports(PACKAGE / "nn" / "batched.py")
    assert {"_dispatch", "backends.torch", "ops._grad"} <= _imports(PACKAGE / "ops" / "linear.py")
    assert "functional" in _imports(PACKAGE / "nn" / "_kernels.py")
