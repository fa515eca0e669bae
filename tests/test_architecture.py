"""The package's shape, checked from the source: a lower module never imports a higher one, and no function is
over MAX_FUNCTION_LINES lines.

`LAYERS` below is the single statement of that layering. Every `import` counts, at module level or inside a
function, relative or absolute: a "lazy" import inside a function is still a dependency, and it is how import cycles
hide. A module that is not listed fails the test until it is given its place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "optimum_gblm"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Lowest first. A tuple is one layer whose modules may import each other (the graph must still be acyclic); a
# package name covers the package and all its modules.
LAYERS: list[str | tuple[str, ...]] = [
    "files",
    "registry",
    "record",
    "config",
    ("data", "scores", "masks", "modeling", "evaluation"),
    "structure",  # decoder blocks, prunable linears, weights as (d_out, d_in)
    ("placement", "stats"),  # where a block's weights live and compute (offload, compute device); input statistics
    "gradients",
    "engine",  # the layer-wise pass: capture, then each block's turn (statistics, visit, re-run)
    "layer_masks",  # prune_layers: the pass with a method; exact zeros and recorded masks
    "obs",
    "methods",
    "sparse_state",  # a pruned model's masks as data, gradient masking, the checks
    ("compressed", "semi_structured"),  # storage of pruned weights, GPU 2:4 kernels: what a pruned model can become
    "checkpoint",  # the mask file, atomic whole-folder saves; checkpoint never prunes
    "flags",  # recipe fields -> CLI flags, example arguments; the model card's reproduce line is generated from it
    "card",  # the model card
    "hub",  # the upload
    "quantizer",  # GBLMHfQuantizer: owns a pruned model's save, push and load, calling the three above
    "pruner",  # attaches a GBLMHfQuantizer; PruneAtLoadQuantizer (transformers' "gblm") prunes while loading
    "training",
    "jobs",
    "cli",
]
EXEMPT = {PACKAGE}  # __init__ imports everything: it is the public API

MAX_FUNCTION_LINES = 80  # a longer function does several jobs: split it into stages with names


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str, known: set[str]) -> str | None:
    """The package module an imported dotted name lands in (`optimum_gblm.x.attr` -> `optimum_gblm.x`)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every module of the package that `module` imports, anywhere in its source (also `importlib.import_module`
    with a literal name). Importing `a.b.c` also runs `a.b`: parent packages count too."""
    names: set[str] = set()
    # Relative imports are resolved against the module's package (a package's own __init__ is its package).
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import x` imports submodule pkg.x when there is one, else an attribute of pkg.
            names.update(f"{target}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    found = set()
    for name in names:
        resolved = _resolve(name, known)
        if resolved is None:
            continue  # another distribution
        if resolved == PACKAGE:
            rest = name[len(PACKAGE) + 1 :].split(".")
            # `optimum_gblm.Name` is an attribute of __init__ (which runs everything); `optimum_gblm.gone.Name`
            # names a module that does not exist: kept by name, so the layering check reports it.
            found.add(PACKAGE if len(rest) < 2 else f"{PACKAGE}.{rest[0]}")
            continue
        found.add(resolved)
        # Importing a.b.c runs a.b first, unless the importer is inside a.b (which is then already being imported).
        parent = resolved.rpartition(".")[0]
        while parent != PACKAGE and not module.startswith(parent + "."):
            found.add(parent)
            parent = parent.rpartition(".")[0]
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {
        name: imported_modules(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)
        for name, path in modules.items()
    }


def rank_of(module: str) -> int | None:
    """Position of `module` in LAYERS (a package's modules share the package's), None when unlisted."""
    relative = module[len(PACKAGE) + 1 :].split(".")[0] if module != PACKAGE else ""
    for rank, layer in enumerate(LAYERS):
        if relative in ((layer,) if isinstance(layer, str) else layer):
            return rank
    return None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


# -- the checks -------------------------------------------------------------------------------------------------
def test_every_module_has_a_layer():
    unlisted = sorted(m for m in package_modules() if m not in EXEMPT and rank_of(m) is None)
    assert not unlisted, f"modules missing from LAYERS in tests/test_architecture.py (give each its place): {unlisted}"


def test_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_one():
    violations = []
    for module, imports in sorted(import_graph().items()):
        if module in EXEMPT or rank_of(module) is None:
            continue
        for target in sorted(imports):
            target_rank = len(LAYERS) if target in EXEMPT else rank_of(target)  # the package root is the top
            if target_rank is None:
                violations.append(f"{module} imports {target}, which is missing or not in LAYERS")
            elif target_rank > rank_of(module):
                violations.append(f"{module} imports {target}, a higher layer")
    assert not violations, "imports against the layering (LAYERS, lowest first):\n  " + "\n  ".join(violations)


def function_lengths(source: str) -> dict[str, int]:
    """Lines from `def` to the last line of every function and method, by dotted name inside the module
    (`Class.method`, `outer.inner`); decorators are not counted."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[prefix + child.name] = child.end_lineno - child.lineno + 1
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)  # functions defined under if / try / with

    visit(ast.parse(source), "")
    return lengths


def long_functions() -> dict[str, int]:
    """Every function of the package over MAX_FUNCTION_LINES, as `module.Class.function` (module without the
    package prefix)."""
    found = {}
    for module, path in package_modules().items():
        relative = module[len(PACKAGE) + 1 :] or "__init__"
        for name, length in function_lengths(path.read_text(encoding="utf-8")).items():
            if length > MAX_FUNCTION_LINES:
                found[f"{relative}.{name}"] = length
    return found


def test_no_function_is_over_80_lines():
    found = long_functions()
    too_long = sorted(f"{name} ({length} lines)" for name, length in found.items())
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split each into named stages):\n  " + "\n  ".join(
        too_long
    )


def test_function_lengths_count_methods_and_nested_functions():
    source = "class A:\n    @staticmethod\n    def f():\n        pass\n\n\ndef g():\n    def h():\n        return 1\n    return h\n"
    source += "if True:\n    async def k():\n        pass\n"
    assert function_lengths(source) == {"A.f": 2, "g": 4, "g.h": 2, "k": 2}


# -- the parser itself ------------------------------------------------------------------------------------------
KNOWN = {PACKAGE, f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.pkg", f"{PACKAGE}.pkg.c", f"{PACKAGE}.pkg.d"}


@pytest.mark.parametrize(
    "source, module, is_package, expected",
    [
        ("from .a import x", f"{PACKAGE}.b", False, {"a"}),
        ("from . import a", f"{PACKAGE}.b", False, {"a"}),
        ("from . import thing", f"{PACKAGE}.b", False, {""}),
        ("from optimum_gblm import thing", f"{PACKAGE}.b", False, {""}),
        ("from .gone import thing", f"{PACKAGE}.b", False, {"gone"}),
        ("import optimum_gblm.a", f"{PACKAGE}.b", False, {"a"}),
        ("from optimum_gblm.pkg.c import x", f"{PACKAGE}.b", False, {"pkg", "pkg.c"}),
        ("def f():\n    from .a import x\n", f"{PACKAGE}.b", False, {"a"}),
        ("if True:\n    import optimum_gblm.b as other\n", f"{PACKAGE}.a", False, {"b"}),
        ("from ..a import x", f"{PACKAGE}.pkg.c", False, {"a"}),
        ("from .d import x", f"{PACKAGE}.pkg.c", False, {"pkg.d"}),
        ("from . import x", f"{PACKAGE}.pkg.c", False, {"pkg"}),
        ("from .pkg.d import x", f"{PACKAGE}.a", False, {"pkg", "pkg.d"}),
        ("from .c import x", f"{PACKAGE}.pkg", True, {"pkg.c"}),
        ("import importlib\nimportlib.import_module('optimum_gblm.a')", f"{PACKAGE}.b", False, {"a"}),
        ("import torch\nfrom transformers import AutoModel", f"{PACKAGE}.b", False, set()),
    ],
)
def test_imports_are_found_wherever_and_however_written(source, module, is_package, expected):
    found = imported_modules(source, module, is_package, KNOWN)
    assert found == {f"{PACKAGE}.{m}" if m else PACKAGE for m in expected}


def test_cycles_and_ranks_are_recognised():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert rank_of(f"{PACKAGE}.methods.score") == rank_of(f"{PACKAGE}.methods") > rank_of(f"{PACKAGE}.engine")
    assert rank_of(f"{PACKAGE}.masks") == rank_of(f"{PACKAGE}.scores")
    assert rank_of(f"{PACKAGE}.nowhere") is None


def test_every_name_the_docs_import_from_the_package_is_public():
    """`__all__` is the public API: every name the README, docs and examples take from `optimum_gblm` itself is in
    it, and every name in it exists."""
    import re

    import optimum_gblm

    texts = [ROOT.parent / "README.md", *(ROOT.parent / "docs").glob("*.md"), *(ROOT.parent / "examples").glob("*.py")]
    used = set()
    for path in texts:
        for names in re.findall(r"from optimum_gblm import ([\w, ]+)", path.read_text(encoding="utf-8")):
            used.update(name.strip() for name in names.split(",") if name.strip())
        used.update(re.findall(r"optimum_gblm\.([A-Z]\w+|[a-z]\w+)\(", path.read_text(encoding="utf-8")))
    # The README's API section names calls in code spans (`PruningRuntime(...)`, `load_model(...)`): those the
    # package has at its top level are its API too.
    readme = (ROOT.parent / "README.md").read_text(encoding="utf-8")
    used.update(name for name in re.findall(r"`(\w+)\(", readme) if hasattr(optimum_gblm, name))
    assert used, "the docs import something from optimum_gblm"
    assert sorted(used - set(optimum_gblm.__all__)) == []
    assert all(hasattr(optimum_gblm, name) for name in optimum_gblm.__all__)
