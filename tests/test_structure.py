"""The project's import graph has no cycle (every import counted, lazy ones included)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("training_scripts", "eval_scripts", "models", "dataset", "benchmarks")


def _modules() -> dict[str, Path]:
    files = [ROOT / "task_merger.py"] + [f for p in PACKAGES for f in (ROOT / p).rglob("*.py")]
    out = {}
    for f in files:
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _imports(file: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(f, set(modules)) - {name} for name, f in modules.items()}
    assert "models.vision" in graph and graph["models.vision"]  # the walk sees real edges
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
