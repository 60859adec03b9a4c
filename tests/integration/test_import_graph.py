"""The package's import graph has no cycle, and each deployment role imports on its own.

The graph holds every import statement of the package: those that run when a module loads (eager) and those
inside functions (lazy: they run when the function does). A lazy import of a package module or of a framework
that the slim serving image lacks (FRAMEWORKS) must be listed in LAZY_IMPORTS with the reason it is lazy; the
role checks follow eager and lazy edges alike, except the listed ones that the role never takes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "code" / "imgclf"
FRAMEWORKS = ("torch", "torchvision", "safetensors", "timm")  # not in the serving image (onnxruntime serves)

# (module, what it imports inside a function) -> why that import is lazy. A new lazy import must be added here,
# with its reason; an entry that no longer matches an import fails too.
LAZY_IMPORTS = {
    ("imgclf.artifacts", "safetensors"): "weights are read or written only by training, export and PyTorch serving",
    ("imgclf.artifacts", "torch"): "torch_save: checkpoints, training only; serving reads config.json without torch",
    ("imgclf.artifacts", "imgclf.models"): "load_model builds the architecture (torch); models imports artifacts' "
                                           "siblings, and serving's ONNX path never calls load_model",
    ("imgclf.aws.ecr", "imgclf.aws.session"): "AwsError only on the error path of a scan read",
    ("imgclf.cli.predict", "imgclf.aws.runtime_client"): "boto3 only for an endpoint: --url needs no AWS SDK (the "
                                                          "[serve] extra has none)",
    ("imgclf.aws.images", "imgclf.aws.session"): "AwsError only on the error path of a digest lookup",
    ("imgclf.debugging.report", "imgclf.debugging.rules"): "the profiler rules only when the report has a "
                                                          "profiler section",
    ("imgclf.export", "torch"): "export runs in the training image; the module's constants and helpers are "
                                "importable without torch",
    ("imgclf.local", "imgclf.config"): "only for --hyperparameters files",
    ("imgclf.local", "imgclf.search.results"): "only for --hyperparameters files (a search's best trial)",
    ("imgclf.models", "timm"): "timm only for timm architectures (import time of ~1 s otherwise)",
    ("imgclf.models", "safetensors"): "only for a .safetensors weights file",
    ("imgclf.search.local_search", "imgclf.splits"): "the data folder is checked only once the flags are good",
    ("imgclf.serving.inference", "torch"): "check_model_dir without model.onnx: PyTorch serving (not the slim image)",
    ("imgclf.serving.inference", "safetensors"): "check_model_dir without model.onnx: PyTorch serving",
    ("imgclf.serving.inference", "imgclf.models"): "check_model_dir without model.onnx: PyTorch serving",
    ("imgclf.serving.runtime", "torch"): "TorchRunner: only without model.onnx (PyTorch serving)",
    ("imgclf.serving.runtime", "imgclf.devices"): "TorchRunner's device (torch): only without model.onnx",
    ("imgclf.serving.serve", "imgclf.errors"): "after the port opens: serve answers /ping before heavy imports",
    ("imgclf.serving.serve", "imgclf.serving.runtime"): "after the port opens: the device (ONNX Runtime's providers, "
                                                       "the driver) decides the batch size and workers",
    ("imgclf.serving.serve", "imgclf.serving.inference"): "after the port opens: serve answers /ping before the "
                                                          "handler's imports (numpy, PIL, onnxruntime)",
}
# The lazy imports that serving an exported model (model.onnx) never runs: the PyTorch fallback without model.onnx,
# and the torch helpers of the shared modules. test_serving_a_request_loads_no_torch runs a request to prove it.
ONNX_SERVING_NEVER_RUNS = {
    ("imgclf.serving.inference", "torch"), ("imgclf.serving.inference", "safetensors"),
    ("imgclf.serving.inference", "imgclf.models"), ("imgclf.serving.runtime", "torch"),
    ("imgclf.serving.runtime", "imgclf.devices"), ("imgclf.artifacts", "imgclf.models"),
    ("imgclf.artifacts", "safetensors"), ("imgclf.artifacts", "torch"),
}
SERVING_ROOTS = ("imgclf.serve", "imgclf.serving.serve", "imgclf.serving.handler_service")  # serve; MMS workers
# The `serve` process, split by concern: the entrypoint, multi-model-server and its watchdog, the front on the port.
SERVE_PROCESS = ("imgclf.serving.serve", "imgclf.serving.supervisor", "imgclf.serving.front")
# What the MMS workers load to answer a request (numpy, PIL, onnxruntime): serve loads it only after the port opens.
HANDLER_SIDE = ("imgclf.serving.handler_service", "imgclf.serving.inference", "imgclf.serving.runtime")
TRAINING_ROOTS = ("imgclf.train", "imgclf.training.job", "imgclf.export")  # the image's `train`; torchrun; export
HOST = ("imgclf.cli", "imgclf.search", "imgclf.aws", "imgclf.local", "imgclf.ui", "imgclf.trial", "imgclf.demo",
        "imgclf.flags")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """(eager, lazy): the package's modules and FRAMEWORKS that `path` imports when it is loaded, and those it
    imports inside functions (or in its `if __name__ == "__main__"` block). `if TYPE_CHECKING:` never runs."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    eager: set[str] = set()
    lazy: set[str] = set()

    def resolve(target: str, is_lazy: bool) -> None:
        top = target.split(".")[0]
        if top in FRAMEWORKS:
            (lazy if is_lazy else eager).add(top)
            return
        while target and target not in modules:  # imgclf.aws.scripting.run -> imgclf.aws.scripting
            target = target.rpartition(".")[0]
        if target and target != name:
            (lazy if is_lazy else eager).add(target)

    def visit(node: ast.AST, is_lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    resolve(alias.name, is_lazy)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:  # `from imgclf.training import job` imports the module job
                    resolve(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, is_lazy)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child, True)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(ast.Module(body=child.orelse, type_ignores=[]), is_lazy)
            elif isinstance(child, ast.If) and "__name__" in ast.unparse(child.test):
                visit(child, True)
            else:  # module-level conditionals, try, with, class bodies: they run at import
                visit(child, is_lazy)

    visit(ast.parse(path.read_text(), str(path)), False)
    return eager, lazy - eager


def import_graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(eager, lazy) edges of every module of the package."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    eager, lazy = {}, {}
    for p in paths:
        eager[module_name(p)], lazy[module_name(p)] = module_imports(p, modules)
    for name in list(eager):  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parent = name.rpartition(".")[0]
        if parent in eager:
            eager[name].add(parent)
    return eager, lazy


def import_graph() -> dict[str, set[str]]:
    """The eager edges only: what loading a module loads."""
    return import_graphs()[0]


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), set()) - seen:
            seen.add(target)
            todo.append(target)
    return seen


def without(graph: dict[str, set[str]], edges: set[tuple[str, str]]) -> dict[str, set[str]]:
    return {a: {b for b in targets if (a, b) not in edges} for a, targets in graph.items()}


def merged(*graphs: dict[str, set[str]]) -> dict[str, set[str]]:
    return {name: set().union(*(g.get(name, set()) for g in graphs)) for name in graphs[0]}


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
    eager, lazy = import_graphs()
    assert "imgclf.training.job" in eager["imgclf.train"]
    assert {"imgclf.training.loop", "imgclf.training.checkpoint", "imgclf.config"} <= eager["imgclf.training.job"]
    assert "imgclf.serving" in eager["imgclf.serving.inference"]  # the parent package runs first
    assert {"torch", "torchvision"} <= eager["imgclf.models"]  # frameworks are nodes too
    assert "torch" in lazy["imgclf.serving.runtime"] and "torch" not in eager["imgclf.serving.runtime"]
    assert "imgclf.serving.inference" in lazy["imgclf.serving.serve"]  # inside a function
    assert "torch" not in eager["imgclf.artifacts"]  # `if TYPE_CHECKING:` never runs
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set()}, "a") == {"b", "c"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_lazy_import_is_listed_with_its_reason():
    _, lazy = import_graphs()
    found = {(module, target) for module, targets in lazy.items() for target in targets}
    unlisted = sorted(found - set(LAZY_IMPORTS))
    assert not unlisted, f"imports inside functions that LAZY_IMPORTS does not list (add each with its reason, or " \
                         f"import at module level): {unlisted}"
    stale = sorted(set(LAZY_IMPORTS) - found)
    assert not stale, f"LAZY_IMPORTS entries that match no import inside a function any more: {stale}"
    assert ONNX_SERVING_NEVER_RUNS <= set(LAZY_IMPORTS)
    assert all(reason.strip() for reason in LAZY_IMPORTS.values())


def test_no_import_cycle():
    cycle = find_cycle(import_graph())  # lazy imports may close a loop: they run after both modules loaded
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_roles_stay_apart():
    """Serving never loads training, debugging or host code, even lazily; training and export nothing of serving or
    the host tools; an exported model serves with no framework that the slim image lacks."""
    eager, lazy = import_graphs()
    graph = merged(eager, lazy)
    for root in SERVING_ROOTS + TRAINING_ROOTS:
        assert root in graph, root

    for root in SERVING_ROOTS:
        loaded = reachable(graph, root)
        assert not {m for m in loaded if m.startswith(("imgclf.training", "imgclf.debugging", *HOST))}, (root, loaded)
        onnx_path = reachable(without(graph, ONNX_SERVING_NEVER_RUNS), root)
        assert not {m for m in onnx_path if m.split(".")[0] in FRAMEWORKS}, (root, onnx_path)
    for root in TRAINING_ROOTS:
        loaded = reachable(graph, root)
        assert not {m for m in loaded if m.startswith(("imgclf.serving", *HOST))}, (root, loaded)
    assert not {m for m in reachable(graph, "imgclf.export") if m.startswith(("imgclf.training", "imgclf.debugging"))}
    assert not {m for m in reachable(graph, "imgclf.search.local_search") if m.startswith("imgclf.aws")}


def test_atomic_writes_import_nothing_of_the_package():
    """imgclf.atomic is the bottom of the graph: every role writes through it, so it imports nothing of imgclf (not
    even under TYPE_CHECKING or inside a function) and no framework."""
    tree = ast.parse((PACKAGE / "atomic.py").read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    relative = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, relative
    assert not [m for m in imported if m.split(".")[0] in ("imgclf", *FRAMEWORKS)], imported
    eager, lazy = import_graphs()
    assert eager["imgclf.atomic"] == {"imgclf"} and not lazy["imgclf.atomic"]  # only its parent package runs first
    assert "imgclf.atomic" in eager["imgclf.artifacts"]  # the model directory contract writes through it
    assert "imgclf.atomic" in eager["imgclf.serving.handler_service"]  # the workers' reports to the watchdog


def test_the_serve_process_is_layered():
    """The split `serve` process: the entrypoint on top, then multi-model-server's supervisor, then the front, which
    MMS workers load too (inference's error bodies) and which so imports nothing of the package. Nothing imports the
    entrypoint but the imgclf.serve shim; the workers never load the supervisor or the entrypoint; the process loads
    the handler's side only lazily, once the port answers (the listed lazy imports of serve)."""
    eager, lazy = import_graphs()
    graph = merged(eager, lazy)
    for module in SERVE_PROCESS:
        assert module in eager, module
    assert eager["imgclf.serving.front"] <= {"imgclf", "imgclf.serving"}, eager["imgclf.serving.front"]
    assert "imgclf.serving.serve" not in reachable(graph, "imgclf.serving.supervisor")
    assert not {"imgclf.serving.serve", "imgclf.serving.supervisor"} & reachable(graph, "imgclf.serving.front")
    importers = {m for m, targets in graph.items() if "imgclf.serving.serve" in targets}
    assert importers == {"imgclf.serve"}, importers
    for worker_module in HANDLER_SIDE:
        assert not set(SERVE_PROCESS[:2]) & reachable(graph, worker_module), worker_module
    for module in SERVE_PROCESS:
        assert not set(HANDLER_SIDE) & reachable(eager, module), (module, reachable(eager, module))
        loaded = reachable(graph, module)
        assert not {m for m in loaded if m.startswith(("imgclf.training", "imgclf.debugging", *HOST))}, (module, loaded)
        assert not {m for m in reachable(without(graph, ONNX_SERVING_NEVER_RUNS), module)
                    if m.split(".")[0] in FRAMEWORKS}, module


def test_role_packages_import():
    code = "import imgclf.train, imgclf.export, imgclf.training, imgclf.serving, imgclf.debugging, imgclf.search"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO / "code"), "PATH": ""})
    assert result.returncode == 0, result.stderr


def test_the_local_cli_and_the_split_checks_load_no_torch():
    """`python -m imgclf.local` launches `train` and `serve`, which import torch themselves: the CLI, and the split
    checks it and scripts/upload_data.py run first, load none (2.5 to 6 s per call on 2 cores)."""
    code = ("import sys, imgclf.local, imgclf.splits; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO / "code"), "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
