"""The package layering of docs/architecture.md, enforced on the source tree.

Every ``import`` in ``src/fedsplit`` — at module level or inside a function, absolute or
relative — becomes an edge from the importing module to the module it names. The edges must
follow :data:`LAYERS` (imports point only downward; the client reaches the server only through
``fedsplit.server.local``) and must form no cycle.

``from P import n`` resolves to the submodule ``P.n`` when there is one (Python imports it without
reading the package's namespace), otherwise to ``P`` itself: the package ``__init__`` is a node of
its own, so a submodule taking a name from its package's ``__init__`` that imports it back is a
cycle.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

BELOW = "everything below"

# The layer table of docs/architecture.md, bottom to top: (layer, packages, what they may import).
# Packages are named without the ``fedsplit.`` prefix; ``server.local`` admits that module alone.
LAYERS: tuple[tuple[int, tuple[str, ...], tuple[str, ...] | str], ...] = (
    (1, ("model", "tasks", "privacy"), ()),
    (2, ("wire",), ("model",)),
    (3, ("server",), ("wire", "model")),
    (4, ("client",), ("wire", "model", "privacy", "tasks", "server.local")),
    (5, ("attacks",), ("client", "wire", "model", "privacy", "tasks")),
    (6, ("bench",), BELOW),
    (7, ("cli",), BELOW),
)


@dataclass(frozen=True)
class Import:
    """One import edge: ``source`` (a module) names ``target`` at ``path:line``."""

    source: str
    target: str
    path: Path
    line: int

    def where(self, root: Path) -> str:
        """``path:line`` relative to the scanned root, for failure messages."""
        return f"{self.path.relative_to(root)}:{self.line}"


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file for every module under ``root/fedsplit``; a package is its ``__init__``."""
    modules = {}
    for path in sorted((root / "fedsplit").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def collect_imports(root: Path) -> tuple[dict[str, Path], list[Import]]:
    """Every fedsplit-internal import edge of the tree under ``root`` (function-level ones too)."""
    modules = module_files(root)
    edges = []
    for source, path in modules.items():
        is_package = path.name == "__init__.py"
        package = source if is_package else source.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                for alias in node.names:
                    submodule = f"{origin}.{alias.name}"
                    targets.append(submodule if submodule in modules else origin)
            for target in dict.fromkeys(targets):
                if (target == "fedsplit" or target.startswith("fedsplit.")) and target != source:
                    edges.append(Import(source, target, path, node.lineno))
    return modules, edges


def package_of(module: str) -> str:
    """The top-level package under fedsplit (``fedsplit.server.local`` -> ``server``); ``""`` for the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_table() -> dict[str, tuple[int, tuple[str, ...]]]:
    """package -> (layer, what it may import), with ``everything below`` spelled out."""
    table: dict[str, tuple[int, tuple[str, ...]]] = {}
    for layer, packages, allowed in LAYERS:
        if allowed == BELOW:
            allowed = tuple(p for below, ps, _ in LAYERS if below < layer for p in ps)
        for package in packages:
            table[package] = (layer, tuple(allowed))
    return table


def layer_violations(root: Path) -> list[str]:
    """One line per import that breaks :data:`LAYERS`: ``file:line: rule: what``."""
    table = layer_table()
    _, edges = collect_imports(root)
    problems = []
    for edge in edges:
        source, target = package_of(edge.source), package_of(edge.target)
        if edge.target == "fedsplit" or source == target:
            continue  # the root package holds only the version; a package may use itself
        if source not in table:
            what = (
                f"fedsplit.{source}"
                if source
                else "the root package fedsplit (it may import none of its packages)"
            )
            problems.append(f"{edge.where(root)}: package not in the layer table: {what}")
            continue
        layer, allowed = table[source]
        if any(edge.target == f"fedsplit.{a}" or edge.target.startswith(f"fedsplit.{a}.") for a in allowed):
            continue
        if target not in table:
            rule = "import of a package not in the layer table"
        elif table[target][0] > layer:
            rule = "upward import"
        elif table[target][0] == layer:
            rule = "sideways import between layer-1 siblings" if layer == 1 else "sideways import"
        elif source == "client" and target == "server":
            rule = "client reaches the server beyond fedsplit.server.local"
        else:
            rule = "import not in the may-import list"
        may = ", ".join(allowed) or "nothing of fedsplit"
        problems.append(
            f"{edge.where(root)}: {rule}: {edge.source} imports {edge.target} "
            f"(layer {layer} fedsplit.{source} may import: {may})"
        )
    return problems


def reachable(graph: dict[str, dict[str, Import]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def import_cycles(root: Path) -> list[str]:
    """One line per strongly connected group of modules, showing one cycle through it with file:line."""
    modules, edges = collect_imports(root)
    graph: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for edge in edges:
        if edge.target in graph:
            graph[edge.source].setdefault(edge.target, edge)

    # Modules that reach each other form one cycle group (the graph has ~100 nodes: plain searches do).
    reach = {module: reachable(graph, module) for module in graph}
    groups: list[list[str]] = []
    for module in sorted(graph):
        if module in reach[module] and not any(module in group for group in groups):
            groups.append(sorted(other for other in reach[module] if module in reach[other]))

    problems = []
    for group in groups:
        members = set(group)
        # Breadth-first from the group's first module, inside the group, until the walk comes back to it.
        start = group[0]
        parents: dict[str, str] = {}
        queue = deque([start])
        while start not in parents:
            node = queue.popleft()
            for nxt in graph[node]:
                if nxt in members and nxt not in parents:
                    parents[nxt] = node
                    queue.append(nxt)
        path = [start]
        while path[0] != start or len(path) == 1:
            path.insert(0, parents[path[0]])
        hops = " -> ".join(f"{a} ({graph[a][b].where(root)})" for a, b in zip(path, path[1:], strict=False))
        others = sorted(members - set(path))
        also = f" (the cycle group also holds {', '.join(others)})" if others else ""
        problems.append(f"import cycle: {hops} -> {start}{also}")
    return problems


# --- the real tree -----------------------------------------------------------------------------


def test_the_scan_sees_the_whole_source_tree():
    modules, edges = collect_imports(SRC)
    assert {"fedsplit.client.core", "fedsplit.server.local", "fedsplit.privacy"} <= set(modules)
    assert any(e.source.startswith("fedsplit.client.") and e.target == "fedsplit.server.local" for e in edges)
    # Function-level imports are edges too (label.py imports the client's loss inside a function).
    assert any(e.source == "fedsplit.attacks.label" and e.target == "fedsplit.client.core" for e in edges)


def test_every_package_is_in_the_layer_table():
    packages = {package_of(m) for m in module_files(SRC)} - {""}
    assert packages == set(layer_table())


def test_imports_point_only_down_the_layer_table():
    problems = [p for p in layer_violations(SRC) if "client reaches the server" not in p]
    assert not problems, "\n".join(problems)


def test_the_client_uses_the_server_only_through_server_local():
    problems = [p for p in layer_violations(SRC) if "client reaches the server" in p]
    assert not problems, "\n".join(problems)


def test_no_import_cycles_between_modules():
    problems = import_cycles(SRC)
    assert not problems, "\n".join(problems)


# --- the checker itself, on synthetic trees ------------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """Write ``{"fedsplit/model/x.py": source}`` under ``root`` with the ``__init__`` files it needs."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        for folder in [path.parent, *path.parent.parents]:
            if folder == root:
                break
            (folder / "__init__.py").touch(exist_ok=True)
        path.write_text(text)
    return root


def test_an_upward_import_is_reported_with_its_file_line_and_rule(tmp_path):
    write_tree(
        tmp_path, {"fedsplit/model/x.py": "import torch\n\n\ndef f():\n    from fedsplit.bench import x\n"}
    )
    problems = layer_violations(tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{Path('fedsplit/model/x.py')}:5: upward import: ")
    assert "fedsplit.model.x imports fedsplit.bench" in problems[0]


def test_sideways_and_client_to_server_imports_are_reported(tmp_path):
    write_tree(
        tmp_path,
        {
            "fedsplit/privacy/a.py": "from ..tasks import load_task\n",
            "fedsplit/tasks/b.py": "x = 1\n",
            "fedsplit/client/c.py": "from fedsplit.server.local import open_session\nfrom fedsplit.server import session\n",
            "fedsplit/server/local.py": "",
            "fedsplit/server/session.py": "",
        },
    )
    client, privacy = layer_violations(tmp_path)  # in file order
    assert client.startswith(f"{Path('fedsplit/client/c.py')}:2: client reaches the server beyond ")
    assert "fedsplit.client.c imports fedsplit.server.session" in client
    assert privacy.startswith(
        f"{Path('fedsplit/privacy/a.py')}:1: sideways import between layer-1 siblings: "
    )
    assert "fedsplit.privacy.a imports fedsplit.tasks" in privacy


def test_a_cycle_is_reported_with_its_path(tmp_path):
    write_tree(
        tmp_path,
        {
            "fedsplit/attacks/label.py": "def f():\n    from .runner import Result\n",
            "fedsplit/attacks/runner.py": "from fedsplit.attacks.label import f\n",
        },
    )
    assert import_cycles(tmp_path) == [
        f"import cycle: fedsplit.attacks.label ({Path('fedsplit/attacks/label.py')}:2) -> "
        f"fedsplit.attacks.runner ({Path('fedsplit/attacks/runner.py')}:1) -> fedsplit.attacks.label"
    ]


def test_a_submodule_taking_names_from_its_own_package_init_is_a_cycle(tmp_path):
    write_tree(
        tmp_path,
        {
            "fedsplit/privacy/__init__.py": "from fedsplit.privacy.dp import DP\n",
            "fedsplit/privacy/dp.py": "from fedsplit.privacy import accounting, parse\n",
            "fedsplit/privacy/accounting.py": "",
        },
    )
    (problem,) = import_cycles(tmp_path)
    assert problem.startswith("import cycle: fedsplit.privacy (")
    assert "fedsplit.privacy.dp (" in problem
    # ``accounting`` is a submodule: that name alone would be no cycle.
    write_tree(tmp_path, {"fedsplit/privacy/dp.py": "from fedsplit.privacy import accounting\n"})
    assert import_cycles(tmp_path) == []
