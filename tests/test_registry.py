import pytest

from igniter.registry import REGISTRIES, Registry, RegistryError, model_registry


def test_nine_registries_with_builtins():
    assert sorted(REGISTRIES) == sorted(
        ["engine", "model", "dataset", "solver", "io", "function", "transforms", "event handler", "runner"]
    )
    import igniter  # noqa: F401  (registers the built-ins)

    for name, registry in REGISTRIES.items():
        assert len(registry) > 0, f"{name} registry has no built-in entry"
    assert {"mlp", "lenet"} <= set(model_registry.names())


def test_register_by_explicit_and_own_name():
    reg = Registry("thing")

    @reg("alpha")
    def make_alpha():
        return 1

    @reg
    def beta():
        return 2

    assert "alpha" in reg and "beta" in reg and "make_alpha" not in reg
    assert reg.get("alpha")() == 1 and reg.get("beta")() == 2
    assert reg.names() == ["alpha", "beta"]
    assert list(reg) == ["alpha", "beta"]


def test_entry_remembers_module_and_file():
    reg = Registry("thing")

    @reg("x")
    class X:
        pass

    entry = reg.entry("x")
    assert entry.module == __name__
    assert entry.file is not None and entry.file.endswith("test_registry.py")


def test_duplicate_name_is_an_error_unless_override():
    reg = Registry("thing")
    reg.register(int, "n")
    with pytest.raises(RegistryError, match="'n' is already registered"):
        reg.register(float, "n")
    reg.register(float, "n", override=True)
    assert reg.get("n") is float

    @reg("n", override=True)
    def n():
        return 0

    assert reg.get("n") is n


def test_lookup_error_names_registry_key_suggestion_and_list():
    reg = Registry("model")
    for name in ("lenet", "mlp", "resnet18"):
        reg.register(object, name)
    with pytest.raises(RegistryError) as info:
        reg.get("resnet19", config_key="model.name")
    msg = str(info.value)
    assert "model registry has no 'resnet19'" in msg
    assert "'model.name'" in msg
    assert "Did you mean 'resnet18'?" in msg
    assert "lenet, mlp, resnet18" in msg


def test_no_suggestion_for_unrelated_name():
    reg = Registry("model")
    reg.register(object, "lenet")
    with pytest.raises(RegistryError) as info:
        reg.get("transformer")
    assert "Did you mean" not in str(info.value)


# --- built-ins: all registered by `import igniter`; a user's name wins over a built-in ----------

import importlib
import logging
import subprocess
import sys

from igniter.registry import dataset_registry

NAMES_AFTER = r"""
import importlib, json, pkgutil, sys
import igniter
from igniter.registry import REGISTRIES
before = {k: r.names() for k, r in REGISTRIES.items()}
failed = []
for m in pkgutil.walk_packages(igniter.__path__, "igniter."):
    if m.name.rsplit(".", 1)[-1] == "__main__":
        continue
    try:
        importlib.import_module(m.name)
    except Exception as e:
        failed.append(f"{m.name}: {e}")
after = {k: r.names() for k, r in REGISTRIES.items()}
print(json.dumps({"before": before, "after": after, "failed": failed}))
"""


def test_import_igniter_registers_every_builtin():
    """Which names exist does not depend on which igniter modules were imported."""
    import json

    proc = subprocess.run([sys.executable, "-c", NAMES_AFTER], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["failed"] == []
    assert out["before"] == out["after"]
    assert "gpu_telemetry" in out["before"]["event handler"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def igniter_log():
    """INFO records of the 'igniter' logger (a handler of its own: igniter may stop propagation)."""
    log = logging.getLogger("igniter")
    handler, level = _Records(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler.records
    log.removeHandler(handler)
    log.setLevel(level)


def test_user_module_replaces_builtin_datasets_and_says_so(restore_datasets, igniter_log):
    from igniter import datasets as builtin

    assert dataset_registry.get("mnist") is builtin.mnist
    user = importlib.import_module("original_igniter_example")  # the original Igniter's example registers 'mnist'
    assert dataset_registry.get("mnist") is user.mnist_dataset
    assert dataset_registry.get("digits") is user.digits_dataset
    assert dataset_registry.entry("mnist").module == "original_igniter_example"
    lines = [r.getMessage() for r in igniter_log if r.levelno == logging.INFO and "replaces" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "dataset registry" in lines[0] and "'mnist'" in lines[0]
    assert "original_igniter_example" in lines[0] and "igniter.datasets" in lines[0]

    # two registrations from user code: still an error, naming both modules
    def other(**kwargs):
        return None

    with pytest.raises(RegistryError, match=r"'mnist' is already registered \(from original_igniter_example"):
        dataset_registry.register(other, "mnist")
    assert dataset_registry.get("mnist") is user.mnist_dataset


def _made_in(module: str):
    def factory():
        return module

    factory.__module__ = module
    return factory


def test_user_entry_wins_whichever_is_registered_first(igniter_log):
    late_builtin = Registry("thing")
    user = late_builtin.register(_made_in("my_project.things"), "x")
    late_builtin.register(_made_in("igniter.things"), "x")  # e.g. a built-in module imported later
    assert late_builtin.get("x") is user
    assert any(
        "'x' from my_project.things replaces igniter's built-in from igniter.things" in r.getMessage()
        for r in igniter_log
    )

    early_builtin = Registry("thing")
    early_builtin.register(_made_in("igniter.things"), "x")
    user = early_builtin.register(_made_in("my_project.things"), "x")
    assert early_builtin.get("x") is user


def test_two_builtins_or_two_user_entries_of_one_name_are_an_error():
    for module in ("igniter.a", "my_project.a"):
        reg = Registry("thing")
        reg.register(_made_in(module), "x")
        with pytest.raises(RegistryError, match="'x' is already registered"):
            reg.register(_made_in(module.replace(".a", ".b")), "x")
