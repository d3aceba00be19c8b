"""The package's shape: no import cycle between igniter's modules (``hydra_plugins/``,
function-level and ``TYPE_CHECKING`` imports included), the layers contract of
``pyproject.toml`` kept (``lint-imports``), and ruff's formatting and lint clean.

Both are read from the source with :mod:`ast` (nothing is imported), so they are fast
and see function-level imports too.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "igniter"
#: igniter's Hydra plugin package: Hydra imports it, and it imports igniter's launcher.
PLUGIN = ROOT / "hydra_plugins" / "igniter_submitit"

#: Import cycles allowed, each a set of modules that import each other: none since
#: runners <-> slurm was broken (slurm_runner.py). Add one only with a comment saying why.
ALLOWED_CYCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    """Every module of the package and of its Hydra plugin by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted([*PACKAGE.rglob("*.py"), *PLUGIN.rglob("*.py")]):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _import_graph() -> dict[str, set[str]]:
    """``{module: igniter modules it imports}``, at module level, inside functions or under
    ``if TYPE_CHECKING:`` (a cycle there is a layering mistake even if it never runs).

    Besides ``import`` statements, a string constant ``"igniter.<module>:<name>"`` (the
    CLI's subcommand table, imported on use with importlib) and
    ``importlib.import_module("igniter....")`` count as imports. Importing
    ``igniter.a.b`` also runs ``igniter/__init__.py``; that implicit edge is not
    counted, or every module would share a cycle with the package that lists them.
    """
    modules = _modules()

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from igniter import datasets` imports the submodule igniter.datasets
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):  # "module:function"
                target, colon, attr = node.value.partition(":")
                if colon and attr.isidentifier() and target in modules:
                    names = [target]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            ):
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    names = [node.args[0].value]
            for name in names:
                target = owner(name) if name.startswith(("igniter", "hydra_plugins.igniter_submitit")) else None
                if target and target != module:
                    graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan): each is a set
    of modules that import each other, directly or through the others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_import_graph_sees_lazy_and_string_imports():
    """The graph is not vacuous: function-level imports and the subcommand table count."""
    graph = _import_graph()
    assert "igniter.evaluate" in graph["igniter.cli"]  # "igniter.evaluate:eval_main" in SUBCOMMANDS
    assert "igniter.check" in graph["igniter.cli"]
    assert "igniter.compose" in graph["igniter.evaluate"]  # imported inside _load_config
    assert "igniter.rundir" in graph["igniter.cli"]  # imported inside _task


def test_no_import_cycle_beyond_the_allowed_ones():
    cycles = _cycles(_import_graph())
    new = [sorted(c) for c in cycles if c not in ALLOWED_CYCLES]
    assert not new, f"import cycles: {new}"


def test_subcommands_do_not_import_the_cli():
    """``igniter eval`` and ``igniter check`` take composing from igniter.compose: the CLI
    imports them (on use), never the other way round."""
    graph = _import_graph()
    for module in ("igniter.evaluate", "igniter.check", "igniter.compose", "igniter.cluster.hydra_launchers"):
        assert "igniter.cli" not in graph[module], module
    assert not any("igniter.cli" in c for c in _cycles(graph))


def test_the_private_hydra_apis_igniter_uses_still_exist():
    """igniter runs a composed job as ``hydra.main`` would (``run_job`` with Hydra's
    ``Callbacks``) and parses argv with Hydra's own parser; these live in
    ``hydra._internal`` (no public equivalent), so a Hydra that moves them must fail here.
    pyproject caps hydra-core below 1.4."""
    import inspect

    from hydra._internal.callbacks import Callbacks
    from hydra._internal.utils import get_args_parser
    from hydra.core.utils import run_job

    assert {"task_function", "config", "job_dir_key", "job_subdir_key", "hydra_context"} <= set(
        inspect.signature(run_job).parameters
    )
    assert {"on_run_start", "on_run_end"} <= set(dir(Callbacks))
    args = get_args_parser().parse_args(["--cfg", "job", "a=1"])
    assert args.cfg == "job" and args.overrides == ["a=1"] and hasattr(args, "resolve")


def _lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_layers_contract_is_kept():
    """core <- mechanics <- run and launch <- commands (``[tool.importlinter]`` in pyproject.toml),
    function-level, ``TYPE_CHECKING`` and ``hydra_plugins`` imports counted."""
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "KEPT" in result.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    """The contract is not vacuous: a copy of the tree where a core module imports the CLI
    (inside a function, as a lazy import would) fails ``lint-imports``, naming the import."""
    shutil.copytree(PACKAGE, tmp_path / "igniter", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PLUGIN, tmp_path / "hydra_plugins" / "igniter_submitit")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    errors = tmp_path / "igniter" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _scratch():\n    from igniter.cli import main  # noqa: F401\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = _lint_imports(tmp_path, env)
    assert result.returncode != 0
    assert "igniter.errors -> igniter.cli" in result.stdout, result.stdout[-3000:]


#: What decides "local or remote?" and "which format?" for a checkpoint: only igniter/checkpoint/ may.
_CHECKPOINT_DECISIONS = ("is_url(", "checkpoint_kind(", "checkpoint_format(", '== "dcp"', '!= "dcp"', '"dcp" if')


def test_only_the_checkpoint_package_decides_where_and_in_which_format():
    """Outside ``igniter/checkpoint/`` code asks a ``CheckpointLocation`` (``in_object_store``,
    ``sharded``) and never tests a path's scheme, whether a checkpoint is a directory, or the format."""
    # Dataset roots behind URLs (token shards) are not checkpoints: those lines may ask is_url.
    data_roots = {PACKAGE / "token_shards.py", PACKAGE / "validate.py"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "checkpoint"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if path in data_roots and "is_url(" in code and "root" in code and "checkpoint" not in code:
                continue
            if any(d in code for d in _CHECKPOINT_DECISIONS) or ("is_dir()" in code and "checkpoint" in code.lower()):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
    assert any("is_url(" in p.read_text() for p in (PACKAGE / "checkpoint").glob("*.py")), "the grep sees nothing"
