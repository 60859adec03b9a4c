"""The package's module-level import graph has no cycle, and each deployment role imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "code" / "imgclf"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports when it is loaded (not inside functions: those are lazy)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> None:
        while target and target not in modules:  # imgclf.aws.scripting.run -> imgclf.aws.scripting
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    resolve(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:  # `from imgclf.training import job` imports the module job
                    resolve(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            elif isinstance(node, ast.If | ast.Try):  # module-level conditionals still run at import
                if not (isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)):
                    visit(node.body)
                    visit(node.orelse)
                    for handler in getattr(node, "handlers", []):
                        visit(handler.body)

    visit(ast.parse(path.read_text(), str(path)).body)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): module_level_imports(p, modules) for p in paths}
    for name in list(graph):  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parent = name.rpartition(".")[0]
        if parent in graph:
            graph[name].add(parent)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := walk(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_the_graph_is_read_correctly():
    graph = import_graph()
    assert "imgclf.training.job" in graph["imgclf.train"]
    assert {"imgclf.training.loop", "imgclf.training.checkpoint", "imgclf.config"} <= graph["imgclf.training.job"]
    assert "imgclf.serving" in graph["imgclf.serving.inference"]  # the parent package runs first
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_roles_stay_apart():
    """Serving never loads training or debugging code; nothing in the images loads the host tools."""
    graph = import_graph()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in graph[todo.pop()] - seen:
                seen.add(target)
                todo.append(target)
        return seen

    serving = reachable("imgclf.serving.serve") | reachable("imgclf.serving.handler_service")
    assert not {m for m in serving if m.startswith(("imgclf.training", "imgclf.debugging", "imgclf.search",
                                                      "imgclf.aws", "imgclf.local", "imgclf.ui"))}, serving
    training = reachable("imgclf.training.job")
    assert not {m for m in training if m.startswith(("imgclf.serving", "imgclf.search", "imgclf.aws",
                                                       "imgclf.local", "imgclf.ui"))}, training
    assert not {m for m in reachable("imgclf.search.local_search") if m.startswith("imgclf.aws")}


def test_role_packages_import():
    code = "import imgclf.training, imgclf.serving, imgclf.debugging, imgclf.search"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO / "code"), "PATH": ""})
    assert result.returncode == 0, result.stderr


def test_serving_an_exported_model_imports_no_torch(trained):
    """The slim serving image has no torch: the handler modules, loading model.onnx, must not need it."""
    code = ("import sys; from imgclf.serving import handler_service, inference; "
            f"m = inference.model_fn({str(trained[0] / 'model')!r}); "
            "print(type(m.run).__name__, sorted(k for k in sys.modules if k.split('.')[0] in "
            "('torch', 'torchvision', 'safetensors', 'timm')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO / "code"), "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["OnnxRunner", "[]"], result.stdout
