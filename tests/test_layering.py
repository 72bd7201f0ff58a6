"""The package's layering, read from the source with ``ast`` (nothing is imported).

Every import counts: module-level, function-local and ``if TYPE_CHECKING:`` ones.
``python tests/test_layering.py`` prints the current violations and size figures.
"""

from __future__ import annotations

import ast
import os
import sys
from dataclasses import dataclass
from functools import cache

import pytest

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "stashpoint")

#: Low to high.  A module may import from its own unit, from units of lower layers, and
#: from other units of its own layer unless the pair is in FORBIDDEN.  A unit is a
#: top-level module or subpackage of stashpoint; "__init__" is the package itself.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "vocab", "sizes", "_version", "wrappers", "textfmt"),
    ("format",),
    ("planning",),
    ("storage",),
    ("_dist", "_state"),
    ("foreign",),  # other tools' formats (DCP, HF): detection and indexing
    ("engine",),
    ("convert", "merging", "manager", "recovery"),
    ("__init__",),  # the public API
    ("cli", "demo", "integrations"),  # applications of the public API; framework adapters
)
#: same-layer imports that are not allowed (importer, imported)
FORBIDDEN = {("convert", "merging"), ("merging", "convert"), ("demo", "cli")}
#: package-level cycles that are allowed (none: the merge registry's registration
#: imports stay inside the merging package)
ALLOWED_CYCLES: set[frozenset[str]] = set()
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}

#: torch.distributed calls that communicate; only _dist.py may make them
COLLECTIVE_PREFIXES = (
    "all_gather",
    "all_reduce",
    "all_to_all",
    "broadcast",
    "reduce_scatter",
    "gather",
    "scatter",
)
COLLECTIVES = {
    "barrier",
    "monitored_barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "reduce",
    "batch_isend_irecv",
    "new_group",
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted module name (a name imported from a package counts as the package)
    line: int
    local: bool  # inside a function


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(SRC))[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


@cache
def modules() -> dict[str, str]:
    """Dotted name -> file path, for every module of the package."""
    out = {}
    for d, _, files in os.walk(SRC):
        for f in files:
            if f.endswith(".py"):
                out[_module_name(os.path.join(d, f))] = os.path.join(d, f)
    return out


@cache
def tree(name: str) -> ast.Module:
    with open(modules()[name]) as f:
        return ast.parse(f.read())


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _resolve(base: str, names: list[str]) -> list[str]:
    """``from base import a, b``: the submodules named, else ``base`` itself."""
    known = modules()
    out = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
    return out if len(out) == len(names) else [*out, base]


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str) -> None:
        self.module, self.depth, self.found = module, 0, []

    def visit_FunctionDef(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def _add(self, targets: list[str], line: int) -> None:
        for t in targets:
            if t.split(".")[0] == "stashpoint" and t != self.module:
                self.found.append(Import(self.module, t, line, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        self._add([a.name for a in node.names], node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            pkg = self.module.split(".")
            if modules()[self.module].endswith("__init__.py"):
                pkg.append("")
            base = ".".join(pkg[: len(pkg) - node.level] + ([base] if base else []))
        self._add(_resolve(base, [a.name for a in node.names]), node.lineno)


@cache
def imports() -> list[Import]:
    out = []
    for name in sorted(modules()):
        c = _Collector(name)
        c.visit(tree(name))
        out += c.found
    return out


def upward_imports() -> list[str]:
    bad = []
    for imp in imports():
        a, b = unit(imp.importer), unit(imp.target)
        if a == b:
            continue
        if a not in LAYER_OF or b not in LAYER_OF:
            bad.append(f"{imp.importer}:{imp.line} imports {imp.target}: unit not in LAYERS")
        elif LAYER_OF[b] > LAYER_OF[a] or (a, b) in FORBIDDEN:
            where = "function-local " if imp.local else ""
            bad.append(f"{imp.importer}:{imp.line} {where}imports {imp.target} ({a} -> {b})")
    return bad


def unit_cycles() -> list[list[str]]:
    """Strongly connected sets of units (Tarjan), larger than one."""
    graph: dict[str, set[str]] = {}
    for imp in imports():
        a, b = unit(imp.importer), unit(imp.target)
        if a != b:
            graph.setdefault(a, set()).add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [c for c in out if frozenset(c) not in ALLOWED_CYCLES]


def _torch_at_top(module: str) -> bool:
    return any(
        isinstance(n, ast.Import | ast.ImportFrom)
        and any((getattr(n, "module", None) or a.name).split(".")[0] == "torch" for a in n.names)
        for n in tree(module).body
    )


def habit_local_imports() -> list[str]:
    """Function-local imports of leaf modules (importing nothing of ours): they cannot
    form a cycle, so they belong at the top, unless they keep torch out of a torch-free
    importer."""
    leaves = {m for m in modules() if not any(i.importer == m for i in imports())}
    bad = []
    for imp in imports():
        if not imp.local or imp.target not in leaves:
            continue
        if _torch_at_top(imp.target) and not _torch_at_top(imp.importer):
            continue  # a deliberate lazy import: the importer stays torch-free
        bad.append(f"{imp.importer}:{imp.line} imports {imp.target} inside a function")
    return bad


def _distributed_aliases(module: ast.Module) -> tuple[set[str], dict[str, str]]:
    """Names bound to torch.distributed, and names imported from it (alias -> name)."""
    aliases, names = {"torch.distributed"}, {}
    for node in ast.walk(module):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("torch.distributed") and a.asname:
                    aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in ("torch.distributed", "torch.distributed.distributed_c10d"):
                    aliases.add(a.asname or a.name)
                elif node.module.startswith("torch.distributed"):
                    names[a.asname or a.name] = a.name
    return aliases, names


def _is_collective(name: str) -> bool:
    return name in COLLECTIVES or name.startswith(COLLECTIVE_PREFIXES)


def collective_calls() -> list[str]:
    bad = []
    for name in sorted(modules()):
        if name == "stashpoint._dist":
            continue
        aliases, imported = _distributed_aliases(tree(name))
        for node in ast.walk(tree(name)):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and _is_collective(f.attr) and ast.unparse(f.value) in aliases:
                bad.append(f"{name}:{node.lineno} calls {ast.unparse(f)}")
            elif isinstance(f, ast.Name) and _is_collective(imported.get(f.id, "")):
                bad.append(f"{name}:{node.lineno} calls torch.distributed {imported[f.id]}")
    return bad


def largest_functions(n: int = 10) -> list[tuple[int, str]]:
    sizes = []
    for name in modules():
        for node in ast.walk(tree(name)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                sizes.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}:{node.lineno}"))
    return sorted(sizes, reverse=True)[:n]


# --- tests ------------------------------------------------------------------------------------


def test_every_unit_has_a_layer():
    units = {unit(m) for m in modules()}
    assert units - set(LAYER_OF) == set(), "add the new package to LAYERS"


def test_no_upward_imports():
    bad = upward_imports()
    assert not bad, f"{len(bad)} imports point up a layer:\n" + "\n".join(bad)


def test_no_import_cycles_between_packages():
    cycles = unit_cycles()
    assert not cycles, f"import cycles between packages: {cycles}"


def test_no_function_local_imports_out_of_habit():
    bad = habit_local_imports()
    assert not bad, f"{len(bad)} function-local imports of leaf modules:\n" + "\n".join(bad)


def test_only_dist_calls_collectives():
    bad = collective_calls()
    assert not bad, "collectives outside _dist.py:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "src, expected",
    [
        ("import torch.distributed as dist\ndef f():\n    dist.all_gather_object([], 1)\n", 1),
        ("import torch\ntorch.distributed.barrier()\n", 1),
        ("from torch.distributed import broadcast_object_list as b\nb([])\n", 1),
        ("import torch.distributed as dist\ndist.get_rank()\nx.all_gather()\n", 0),
    ],
)
def test_collective_detection(src, expected, monkeypatch):
    fake = {"stashpoint.fake": "<fake>"}
    monkeypatch.setattr(sys.modules[__name__], "modules", lambda: fake)
    monkeypatch.setattr(sys.modules[__name__], "tree", lambda name: ast.parse(src))
    assert len(collective_calls()) == expected


def report() -> str:
    path = os.path.join(SRC, "engine", "async_save.py")
    lines = [f"modules: {len(modules())}, imports of our own modules: {len(imports())}"]
    for title, rows in (
        ("upward imports", upward_imports()),
        ("cycles between packages", [" <-> ".join(c) for c in unit_cycles()]),
        ("function-local imports of leaf modules", habit_local_imports()),
        ("collectives outside _dist.py", collective_calls()),
        ("largest functions (lines)", [f"{n:4d} {f}" for n, f in largest_functions()]),
    ):
        lines += [f"\n{title}: {len(rows)}", *(f"  {r}" for r in rows)]
    local = sum(i.local for i in imports())
    lines.append(f"\nfunction-local imports of our modules: {local}")
    lines.append(f"engine/async_save.py: {sum(1 for _ in open(path)) if os.path.exists(path) else 0} lines")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
