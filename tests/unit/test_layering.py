"""The layering of kilnproxy and master/, held by reading the code with `ast`.

Without this test a package move is cosmetic: a new cycle or a dependency pointing the wrong way
must fail the suite. Every import counts, wherever it stands: one under `TYPE_CHECKING` (a type
is a dependency) and one inside a function (a lazy import still ties the modules together).
Importing `a.b.c` is a dependency on that module, not on the packages `a` and `a.b` Python runs
first: else every `__init__` that re-exports its package's modules would make a cycle.
The analysis is two pure functions over a module graph, `cycles` and `violations`, tested on
synthetic graphs and on a temporary package, so the checks can be seen to fail.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("config", "errors", "logs", "version", "control", "status_socket")
MAX_TOP_LEVEL_MODULES = 8
# Written by setup.py at build time: part of the package though a source tree may lack it.
GENERATED = "kilnproxy._stamp"

Graph = dict[str, set[str]]  # module -> modules it imports: ours resolved, others as written


# -- reading the code ----------------------------------------------------------------------------


def find_modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Every module of the given top-level packages under root, by dotted name."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom reads from, its relative level resolved."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, is_package: bool, source: str, known: set[str]) -> set[str]:
    """What one module imports: `from pkg import name` is pkg.name when that is a module."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                imported.add(submodule if submodule in known else base)
    imported.discard(module)
    return imported


def import_graph(root: Path, packages: Iterable[str], generated: Iterable[str] = ()) -> Graph:
    modules = find_modules(root, packages)
    known = set(modules) | set(generated)
    graph: Graph = {name: set() for name in generated}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        graph[name] = imports_of(name, is_package, path.read_text(), known)
    return graph


# -- the analysis (pure) -------------------------------------------------------------------------


def _components(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components, over the modules that are graph keys."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node] & graph.keys()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: list[str] = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _shortest_cycle(graph: Graph, start: str, within: set[str]) -> list[str]:
    """The shortest path from start back to start, through modules of one component."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for target in sorted(graph[node] & within):
            if target == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if target not in came_from:
                came_from[target] = node
                queue.append(target)
    raise AssertionError(f"{start} is on no cycle")


def cycles(graph: Graph) -> list[str]:
    """One line per knot of modules that import each other, with one full cycle through it."""
    lines = []
    for component in _components(graph):
        if len(component) < 2:
            continue  # a module importing itself is dropped when the graph is read
        path = _shortest_cycle(graph, component[0], set(component))
        line = "import cycle: " + " -> ".join(path)
        rest = sorted(set(component) - set(path))
        lines.append(line + (f" (and through {', '.join(rest)})" if rest else ""))
    return lines


def matches(pattern: str, name: str) -> bool:
    """`a.b` is that module only; `a.b.*` is the package a.b and every module under it."""
    if pattern.endswith(".*"):
        package = pattern[:-2]
        return name == package or name.startswith(package + ".")
    return name == pattern


@dataclass(frozen=True)
class Rule:
    """Modules matching `within` may import, of what matches `scope`, only what is `allowed`."""

    within: tuple[str, ...]
    scope: tuple[str, ...]
    allowed: tuple[str, ...]
    why: str


def violations(graph: Graph, rules: Iterable[Rule]) -> list[str]:
    lines = []
    for rule in rules:
        for module in sorted(m for m in graph if any(matches(p, m) for p in rule.within)):
            for target in sorted(graph[module]):
                in_scope = any(matches(p, target) for p in rule.scope)
                if in_scope and not any(matches(p, target) for p in rule.allowed):
                    lines.append(f"{module} imports {target}: {rule.why}")
    return lines


def top_level_modules(package_dir: Path) -> list[str]:
    """The modules directly in the package, the generated stamp counted whether built or not."""
    names = {path.stem for path in package_dir.glob("*.py")}
    return sorted(names | {GENERATED.rsplit(".", 1)[1]})


SHARED = tuple(f"kilnproxy.{name}" for name in TOP_LEVEL)
RULES = (
    # The policy is pure (it imports only errors): the master decides with it too (admission).
    Rule(("master.*",), ("kilnproxy.*",), (*SHARED, "kilnproxy.policy.*"),
         "master imports only the shared top-level modules of kilnproxy and its policy"),
    Rule(("kilnproxy.policy.*",), ("kilnproxy.*",), ("kilnproxy.errors", "kilnproxy.policy.*"),
         "policy imports nothing of kilnproxy but errors"),
    Rule(("kilnproxy.ssh.*", "kilnproxy.backends.*", "kilnproxy.directory.*"),
         ("kilnproxy.cli.*", "kilnproxy.worker.*", "kilnproxy.agent.*"), (),
         "ssh, backends and directory never import cli, worker or agent"),
    # The storage agent runs on storage servers: the local backend and the frames, no more.
    Rule(("kilnproxy.agent.*",),
         ("kilnproxy.ssh.*", "kilnproxy.worker.*", "kilnproxy.cli.*", "kilnproxy.directory.*",
          "asyncssh.*"), (),
         "agent never imports ssh, worker, cli, directory or asyncssh"),
)  # fmt: skip


def asyncssh_rule(top_level: Iterable[str]) -> Rule:
    shared = ("kilnproxy" if name == "__init__" else f"kilnproxy.{name}" for name in top_level)
    return Rule(("master.*", *shared), ("asyncssh.*",), (),
                "master and the shared top-level modules never import asyncssh")  # fmt: skip


# -- the real tree -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree() -> Graph:
    return import_graph(ROOT, ["kilnproxy", "master"], [GENERATED])


def _fail_on(lines: list[str]) -> None:
    if lines:
        pytest.fail("\n".join(lines), pytrace=False)


def test_no_import_cycle(tree: Graph) -> None:
    assert {"kilnproxy.config", "kilnproxy.ssh.relay", "master.arbiter"} <= tree.keys()
    _fail_on(cycles(tree))


def test_dependencies_point_one_way(tree: Graph) -> None:
    assert {"kilnproxy.errors", "re"} <= tree["kilnproxy.policy.commands"]
    _fail_on(violations(tree, [*RULES, asyncssh_rule(top_level_modules(ROOT / "kilnproxy"))]))


def test_top_level_keeps_at_most_eight_modules() -> None:
    modules = top_level_modules(ROOT / "kilnproxy")
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, f"kilnproxy/ holds {', '.join(modules)}"
    assert {*TOP_LEVEL, "__init__", "_stamp"} == set(modules)


# -- the checker itself --------------------------------------------------------------------------


def test_cycles_on_a_synthetic_graph() -> None:
    graph: Graph = {
        "a": {"b", "os"},
        "b": {"c"},
        "c": {"a", "d"},
        "d": set(),
        "e": {"f", "a"},
        "f": {"e", "g"},
        "g": {"e"},
    }
    assert cycles(graph) == [
        "import cycle: a -> b -> c -> a",
        "import cycle: e -> f -> e (and through g)",
    ]
    del graph["c"]  # b's import of c now leaves the graph
    assert cycles(graph) == ["import cycle: e -> f -> e (and through g)"]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_imports_resolve_relative_and_submodules() -> None:
    known = {"p", "p.q", "p.q.r", "p.q.s", "p.t"}
    source = """
from typing import TYPE_CHECKING
import asyncssh.connection
from . import s, helper
from .. import t, VERSION
from ..t import thing
from p.q import r
if TYPE_CHECKING:
    from p import q
def lazy() -> None:
    import p.t
"""
    assert imports_of("p.q.r", False, source, known) == {
        "typing", "asyncssh.connection", "p.q.s", "p.q", "p.t", "p",
    }  # fmt: skip
    assert imports_of("p.q", True, "from . import r\nfrom .s import x\n", known) == {
        "p.q.r",
        "p.q.s",
    }


def test_a_cycle_in_a_package_on_disk_fails(tmp_path: Path) -> None:
    """The whole path, files to message: a cycle made only by a TYPE_CHECKING import counts."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.one import One\n")
    (package / "sub" / "one.py").write_text("from . import two\nclass One: ...\n")
    (package / "sub" / "two.py").write_text("from ..leaf import x\nimport pkg.sub.three\n")
    (package / "sub" / "three.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import one\n"
    )
    (package / "leaf.py").write_text("x = 1\n")
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.sub.two"] == {"pkg.leaf", "pkg.sub.three"}
    assert cycles(graph) == [
        "import cycle: pkg.sub.one -> pkg.sub.two -> pkg.sub.three -> pkg.sub.one"
    ]
    (package / "sub" / "three.py").write_text("import pkg.leaf\n")
    assert cycles(import_graph(tmp_path, ["pkg"])) == []


def test_violations_on_a_synthetic_graph() -> None:
    graph: Graph = {
        "master.arbiter": {"kilnproxy.config", "kilnproxy.worker.process", "os"},
        "master.http": {"asyncssh", "kilnproxy.control", "kilnproxy.policy.penalty"},
        "kilnproxy.policy.access": {"kilnproxy.policy.commands", "kilnproxy.errors"},
        "kilnproxy.policy.commands": {"kilnproxy.directory.model", "re"},
        "kilnproxy.ssh.relay": {"kilnproxy.worker", "kilnproxy.backends", "asyncssh"},
        "kilnproxy.config": {"asyncssh.public_key"},
        "kilnproxy.worker": {"kilnproxy.cli.main"},
        "kilnproxy.agent.server": {"kilnproxy.backends.local", "kilnproxy.ssh.server"},
    }
    assert violations(graph, [*RULES, asyncssh_rule(["config", "errors"])]) == [
        "master.arbiter imports kilnproxy.worker.process: master imports only the shared "
        "top-level modules of kilnproxy and its policy",
        "kilnproxy.policy.commands imports kilnproxy.directory.model: policy imports nothing "
        "of kilnproxy but errors",
        "kilnproxy.ssh.relay imports kilnproxy.worker: ssh, backends and directory never "
        "import cli, worker or agent",
        "kilnproxy.agent.server imports kilnproxy.ssh.server: agent never imports ssh, worker, "
        "cli, directory or asyncssh",
        "kilnproxy.config imports asyncssh.public_key: master and the shared top-level modules "
        "never import asyncssh",
        "master.http imports asyncssh: master and the shared top-level modules never import "
        "asyncssh",
    ]


def test_top_level_count_includes_the_stamp(tmp_path: Path) -> None:
    for name in ("__init__", "config", "errors"):
        (tmp_path / f"{name}.py").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.py").write_text("")
    assert top_level_modules(tmp_path) == ["__init__", "_stamp", "config", "errors"]
