"""The layers import downwards only, one road: nn -> functional -> ops -> (_dispatch, backends). Shared leaves
(activations, layout, _validate) may be imported from any layer and import no layer themselves; a layer never
imports one above it, and nn never skips functional to reach the ops, the registry or a backend."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "hyperkernels"
LEAVES = {"activations", "layout", "_validate"}
# What each part may import from the package besides the leaves and itself. The compiled extension (_cuda) is the
# cuda backend's alone.
ALLOWED = {
    "nn": {"functional"},
    "functional": {"ops"},
    "ops": {"_dispatch", "backends"},
    "_dispatch": {"backends"},
    "backends": {"_cuda"},
    **{leaf: set() for leaf in LEAVES},
}


def _imports(path: pathlib.Path, source: str = None) -> set:
    """The package modules a file imports, relative to the package (``from ..functional import x`` ->
    "functional"; ``from hyperkernels import _dispatch`` and ``from .. import _dispatch`` -> "_dispatch")."""
    package = list(path.relative_to(PACKAGE).parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module == "hyperkernels" or (node.module or "").startswith("hyperkernels."):
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                found.add(".".join(target))
            else:  # "from .. import x" / "from hyperkernels import x": x is a module of the package root
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("hyperkernels."))
    return found


def _violations(path: pathlib.Path, source: str = None) -> list:
    own = path.relative_to(PACKAGE).with_suffix("").parts[0]
    allowed = LEAVES | ALLOWED[own] | {own}
    return sorted(m for m in _imports(path, source) if m.split(".")[0] not in allowed)


# The package's __init__ is the public facade over every layer: it alone may import from all of them.
FILES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_imports_go_down_one_road(path):
    own = path.relative_to(PACKAGE).with_suffix("").parts[0]
    assert own in ALLOWED, f"{path}: a module outside the known layers; add it to ALLOWED or LEAVES"
    wrong = _violations(path)
    assert not wrong, f"{path.relative_to(PACKAGE)} ({own}) imports {wrong}"


@pytest.mark.parametrize("line, wrong", [
    ("from .._dispatch import resolve_backend", ["_dispatch"]),
    ("from hyperkernels import _dispatch", ["_dispatch"]),
    ("from .. import backends", ["backends"]),
    ("import hyperkernels.ops.linear", ["ops.linear"]),
    ("from .._cuda import linear_forward", ["_cuda"]),
    ("from ..functional import batched_linear\nfrom ._plan import Layer", []),
])
def test_a_forbidden_import_fails_the_rule(line, wrong):
    """The same check on a line written into an nn module: every way of spelling an import of a layer nn must not
    reach is caught, and the allowed ones pass."""
    assert _violations(PACKAGE / "nn" / "batched.py", line) == wrong
