"""The package's layers: a pure-PyTorch core, one-way imports, no very long module."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mwt_ray"
# Lower layers first; a module may import its own layer and those below it, never those above.
LAYERS = ["core", "config", "tracking", "jobs", "cluster", "entry"]


def layer_of(module: str) -> str:
    part = module.split(".")[1] if "." in module else "entry"
    return part if part in LAYERS else "entry"  # train, reuse, sweep, cli, __init__


def package_imports() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{parent}.{base}" if base else parent
                found.add(base)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {m for m in found if m.startswith("mwt_ray")}
    return graph


def test_core_imports_neither_ray_mlflow_nor_pydantic():
    code = ("import importlib, pkgutil, sys, mwt_ray.core as core\n"
            "for m in pkgutil.walk_packages(core.__path__, 'mwt_ray.core.'): importlib.import_module(m.name)\n"
            "print(sorted(m for m in ('ray', 'mlflow', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_imports_run_one_way():
    upward = []
    for module, imported in package_imports().items():
        if module == "mwt_ray":  # the package root re-exports create_model from the core
            continue
        for target in imported:
            if target != "mwt_ray" and LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(module)):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_ray_is_started_and_stopped_in_one_place():
    """Every command starts Ray through cluster.ray_session (quiet, the command's SIGTERM handler
    kept, only its own Ray shut down): no other module of the package calls ray.init or ray.shutdown."""
    calls = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("init", "shutdown") and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "ray"):
                calls.append(f"{path.relative_to(PACKAGE)}:{node.lineno} ray.{node.func.attr}")
    assert sorted(c.split(":")[0] for c in calls) == ["cluster/ray_session.py", "cluster/ray_session.py"], calls
