"""The package layout, read with ``ast`` (nothing is imported): imports go one way,
core <- experiments / lens <- views <- commands; no module imports another module's
private (underscore) names; no module is longer than 500 lines.

A result's ``plot()`` / ``to_html()`` may import the views inside the method (that runs
only when called), so imports inside functions are held to a looser rule than imports
at module level. The top-level modules (``tl_reversed/__init__.py`` and the aliases like
``tl_reversed/ranking.py``) are the public face and may import any layer; an alias
counts as the layer of the module it stands for.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path


PACKAGE = Path(__file__).resolve().parent.parent / "tl_reversed"
LAYERS = ("core", "experiments", "lens", "views", "commands")
MAX_LINES = 500

# What each layer must not import: (at module level, inside a function). "root" is the
# package itself (``from tl_reversed import load_model``), which imports every layer.
FORBIDDEN = {
    "core": ({"experiments", "lens", "views", "commands", "root"}, {"experiments", "lens", "commands", "root"}),
    "experiments": ({"views", "commands", "root"}, {"commands", "root"}),
    "lens": ({"views", "commands", "root"}, {"commands", "root"}),
    "views": ({"commands", "root"}, {"commands", "root"}),
    "commands": (set(), set()),
}


@dataclass(frozen=True)
class Import:
    """One ``import`` / ``from ... import`` of a tl_reversed module, resolved to absolute names."""

    module: str  # the importing module, e.g. "tl_reversed.lens.sinks"
    target: str  # the module named, e.g. "tl_reversed.lens.projection" (for ``from a import b``: "a")
    names: tuple[str, ...]  # the names imported from ``target`` (empty for ``import a.b``)
    line: int
    in_function: bool


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import of ``tl_reversed...`` in ``source`` (the code of ``module``), with where it sits."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "tl_reversed":
                        found.append(Import(module, alias.name, (), child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                target = child.module or ""
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([target] if target else []))
                if target.split(".")[0] == "tl_reversed":
                    names = tuple(alias.name for alias in child.names)
                    found.append(Import(module, target, names, child.lineno, in_function))
            visit(child, inside)

    visit(tree, False)
    return found


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def aliases(found: dict[str, Path]) -> dict[str, str]:
    """Top-level alias modules (``sys.modules[__name__] = module``) -> the module they stand for."""
    out = {}
    for name, path in found.items():
        source = path.read_text(encoding="utf-8")
        if name.count(".") == 1 and "sys.modules[__name__]" in source:
            (imp,) = imports(source, name)
            out[name] = f"{imp.target}.{imp.names[0]}" if imp.names else imp.target
    return out


def layer(target: str, alias_of: dict[str, str]) -> str | None:
    """The layer of a module name: one of LAYERS, "root" (the package or a top-level module), None outside."""
    parts = target.split(".")
    if parts[0] != "tl_reversed":
        return None
    if len(parts) == 1:
        return "root"
    if parts[1] in LAYERS:
        return parts[1]
    name = ".".join(parts[:2])
    return layer(alias_of[name], alias_of) if name in alias_of else "root"


def imported_layers(imp: Import, alias_of: dict[str, str], known: set[str]) -> set[str]:
    """The layers one import reaches: ``from tl_reversed import plotting`` reaches views."""
    if imp.target != "tl_reversed" or not imp.names:
        return {layer(imp.target, alias_of)}  # type: ignore[arg-type]
    out = set()
    for name in imp.names:
        full = f"tl_reversed.{name}"
        out.add(layer(full, alias_of) if full in known or name in LAYERS else "root")
    return out


def direction_errors(found: dict[str, Path]) -> list[str]:
    alias_of = aliases(found)
    known = set(found)
    errors = []
    for name, path in found.items():
        own = name.split(".")[1] if name.count(".") >= 1 and name.split(".")[1] in LAYERS else None
        if own is None:
            continue  # the package's public face: __init__ and the aliases
        for imp in imports(path.read_text(encoding="utf-8"), name, path.name == "__init__.py"):
            bad = imported_layers(imp, alias_of, known) & FORBIDDEN[own][imp.in_function]
            if bad:
                where = "inside a function" if imp.in_function else "at module level"
                errors.append(f"{name}:{imp.line} ({own}) imports {imp.target} {list(imp.names)} ({sorted(bad)}) {where}")
    return errors


def private_errors(found: dict[str, Path]) -> list[str]:
    errors = []
    for name, path in found.items():
        for imp in imports(path.read_text(encoding="utf-8"), name, path.name == "__init__.py"):
            private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in imp.target.split(".") if p.startswith("_") and not p.startswith("__")]
            if private and imp.target != name:
                errors.append(f"{name}:{imp.line} imports {private} from {imp.target}")
    return errors


# --------------------------------------------------------------------------- the checker itself


def test_checker_sees_every_layer_and_the_lens_imports():
    found = modules()
    assert {name.split(".")[1] for name in found if name.count(".") >= 1} >= set(LAYERS)
    sinks = imports(found["tl_reversed.lens.sinks"].read_text(encoding="utf-8"), "tl_reversed.lens.sinks")
    targets = {imp.target for imp in sinks}
    assert {"tl_reversed.core.engine", "tl_reversed.lens.projection", "tl_reversed.lens.results"} <= targets
    assert aliases(found)["tl_reversed.plotting"] == "tl_reversed.views.plotting"
    assert layer("tl_reversed.plotting", aliases(found)) == "views"


def test_checker_flags_what_it_should(tmp_path):
    """The rules on a fake package: each wrong import is reported once, the allowed ones not at all."""
    root = tmp_path / "tl_reversed"
    for folder in LAYERS:
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "plotting.py").write_text(
        "import sys\nfrom tl_reversed.views import plotting as _module\nsys.modules[__name__] = _module\n"
    )
    files = {
        "core/a.py": "from tl_reversed.views.plotting import f\n",  # wrong: module level
        "core/b.py": "def plot():\n    from tl_reversed.views import plotting\n",  # allowed: lazy view
        "core/c.py": "def run():\n    from tl_reversed.lens.x import y\n",  # wrong even lazily
        "lens/d.py": "from tl_reversed import plotting\n",  # wrong: the alias is views
        "lens/e.py": "from ..core.a import f\n",  # allowed: relative, down a layer
        "views/f.py": "def g():\n    from tl_reversed import load_model\n",  # wrong: the package root
        "commands/g.py": "from tl_reversed import load_model\nfrom tl_reversed.views.plotting import _h\n",
    }
    for rel, text in files.items():
        (root / rel).write_text(text)
    found = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    errors = direction_errors(found)
    assert [e.split(":")[0] for e in errors] == [
        "tl_reversed.core.a",
        "tl_reversed.core.c",
        "tl_reversed.lens.d",
        "tl_reversed.views.f",
    ], errors
    assert "inside a function" in errors[1] and "at module level" in errors[0]
    # only commands/g.py: the alias's "as _module" names the binding, not an imported private name
    assert [e.split(" imports ")[0] for e in private_errors(found)] == ["tl_reversed.commands.g:2"]


# --------------------------------------------------------------------------- the package


def test_imports_go_one_way():
    errors = direction_errors(modules())
    assert not errors, "imports against core <- experiments/lens <- views <- commands:\n" + "\n".join(errors)


def test_no_private_names_imported_across_modules():
    errors = private_errors(modules())
    assert not errors, "underscore names imported from another module (make them public):\n" + "\n".join(errors)


def test_no_module_over_500_lines():
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them): " + ", ".join(
        f"{name} ({n})" for name, n in sorted(long.items(), key=lambda item: -item[1])
    )


def module_level_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    """Which tl_reversed modules each module imports at module level (aliases resolved)."""
    alias_of = aliases(found)
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        if "." not in name.removeprefix("tl_reversed.") and name != "tl_reversed":  # aliases and the root
            continue
        targets = set()
        for imp in imports(path.read_text(), name, path.name == "__init__.py"):
            if imp.in_function:
                continue
            for target in [imp.target, *(f"{imp.target}.{n}" for n in imp.names)]:
                target = alias_of.get(target, target)
                if target in found and target != name and target != "tl_reversed":
                    targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles of a module graph (each found once, from its first module)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_cycle_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    found = cycles(module_level_graph(modules()))
    assert not found, "module-level import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_function_takes_ten_positional_parameters():
    """Long positional signatures are hard to call right: past nine, make them keyword-only."""
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(positional) >= 10:
                    long.append(f"{name}.{node.name} ({len(positional)})")
    assert not long, "functions with 10+ positional parameters: " + ", ".join(long)


def test_the_readme_lists_every_module():
    """The README's layout block names every module of every layer, and no module that is gone."""
    readme = (PACKAGE.parent / "README.md").read_text()
    block = readme[readme.index("## Project layout") :]
    block = block[block.index("```text") : block.index("```", block.index("```text") + 3)]
    listed, current = set(), None
    for line in block.splitlines():
        folder = re.match(r"^  (\w+)/", line)
        if folder:
            current = folder.group(1)
            continue
        if current and line.startswith("    "):
            names = line.strip().split("   ")[0]  # the file names, before the description
            listed |= {f"{current}/{name}" for name in re.findall(r"(\w+\.py)", names)}
    actual = {f"{path.parent.name}/{path.name}" for layer_name in LAYERS for path in (PACKAGE / layer_name).glob("*.py")}
    actual = {name for name in actual if not name.endswith("__init__.py")}
    assert listed == actual, f"missing from the README: {sorted(actual - listed)}; gone: {sorted(listed - actual)}"
