"""What igniter passes to factories itself: only what the factory accepts, one definition
for validation and building, and every built-in name known to plain ``igniter``."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_metrics, run_igniter
from omegaconf import OmegaConf

from igniter.build import DATASET_ARGS, STEP_ARGS, dataset_args, optimizer_args
from igniter.config import DatasetConfig, SolverConfig

# The original Igniter's way: a data config of the user's own with **kwargs factories.
ORIGINAL_DATA = """\
root: null
train:
  name: mnist
  root: ${data.root}
  params: {train: true, download: false}
  transforms:
    - name: flatten
val:
  name: mnist
  root: ${data.root}
  params: {train: false}
  transforms:
    - name: flatten
loader:
  batch_size: 50
"""


def _user_configs(tmp_path: Path) -> list[str]:
    (tmp_path / "configs" / "data").mkdir(parents=True)
    (tmp_path / "configs" / "data" / "original.yaml").write_text(ORIGINAL_DATA)
    (tmp_path / "data").mkdir()
    return [
        "--config-dir",
        str(tmp_path / "configs"),
        "imports=[original_igniter_example]",
        "data=original",
        f"data.root={tmp_path / 'data'}",
    ]


def test_kwargs_dataset_factory_of_the_original_igniter_builds_and_trains(tmp_path):
    """``def mnist_dataset(**kwargs): return MNIST(**kwargs)`` gets root, transform and its
    params, never ``split`` (left at the schema default): it builds and trains."""
    args = _user_configs(tmp_path) + ["trainer.max_epochs=3", "solver.lr=0.01", f"output_dir={tmp_path / 'run'}"]
    proc = run_igniter(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unexpected keyword argument" not in proc.stdout + proc.stderr
    assert read_metrics(tmp_path / "run")["final"]["accuracy"] > 0.9


def test_gpu_telemetry_is_a_name_plain_igniter_knows(tmp_path):
    """Registered by ``import igniter``, not only once igniter.run is imported; without
    a GPU the factory attaches nothing and the run goes on."""
    args = [
        "handlers=[{name: gpu_telemetry}]",
        "trainer.max_epochs=1",
        "trainer.epoch_length=2",
        "data.train.subset=100",
        "data.val.subset=50",
        f"output_dir={tmp_path / 'run'}",
    ]
    proc = run_igniter(args, tmp_path)
    assert "no such event handler" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- the rule: named parameters always, **kwargs only what the config set -------------------


def _dataset(**values) -> OmegaConf:
    cfg = OmegaConf.structured(DatasetConfig)
    cfg.name = "x"
    for k, v in values.items():
        cfg[k] = v
    return cfg


def named(root: str = ".", split: str = "train", transform=None, size: int = 1):
    return None


def kwargs_only(**kwargs):
    return None


def torchvision_like(root, train, transform=None, download=False):
    return None


@pytest.mark.parametrize(
    "factory, values, transform, passed",
    [
        (named, {}, None, {"split": "train"}),  # a named parameter gets the value, default or not
        (named, {"root": "/d", "split": "val"}, "T", {"split": "val", "root": "/d", "transform": "T"}),
        (kwargs_only, {}, None, {}),  # nothing the config left at its default
        (kwargs_only, {"split": "train"}, None, {}),  # 'train' is the schema default
        (kwargs_only, {"split": "test", "root": "/d"}, "T", {"split": "test", "root": "/d", "transform": "T"}),
        (torchvision_like, {"root": "/d", "split": "test"}, "T", {"root": "/d", "transform": "T"}),
    ],
)
def test_dataset_gets_only_what_it_accepts(factory, values, transform, passed):
    got, _ = dataset_args(_dataset(**values), factory, transform)
    assert got == passed
    assert set(got) <= set(DATASET_ARGS)


def test_optimizer_without_weight_decay():
    import torch

    cfg = OmegaConf.structured(SolverConfig)
    assert optimizer_args(cfg, torch.optim.LBFGS) == ({"lr": cfg.lr}, [])  # LBFGS has no weight_decay
    cfg.weight_decay = 0.01
    assert optimizer_args(cfg, torch.optim.LBFGS)[1] == ["weight_decay"]

    def my_sgd(params, **kwargs):
        return torch.optim.SGD(params, **kwargs)

    assert optimizer_args(cfg, my_sgd)[0] == {"lr": cfg.lr, "weight_decay": 0.01}  # **kwargs: always both


# --- validation says what building will do ----------------------------------------------------


def _check(tmp_path, monkeypatch, capsys, overrides: list[str]) -> tuple[int, str]:
    from igniter.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["check", *overrides])
    return info.value.code, capsys.readouterr().err


USER = "imports=[original_igniter_example,my_project]"


@pytest.mark.parametrize(
    "overrides, needles",
    [
        # torchvision's signature has no 'bogus' (and no **kwargs to swallow it)
        (
            [
                USER,
                "data.train.name=fake_mnist",
                "data.train.root=.",
                "+data.train.params.train=true",
                "+data.train.params.bogus=1",
            ],
            ["data.train.params.bogus", "accepted: download, root, train"],
        ),
        # the built-in digits names its parameters
        (["+data.train.params.n=10"], ["data.train.params.n", "digits has no parameter 'n'"]),
        # a root the factory cannot take is named by its own key, not as a param
        ([USER, "data.train.name=blobs", "data.train.root=."], ["data.train.root", "takes no 'root' argument"]),
        (
            [
                USER,
                "data.train.name=fake_mnist",
                "data.train.root=.",
                "+data.train.params.train=true",
                "+data.train.params.root=.",
            ],
            ["data.train.params.root", "given twice"],
        ),
        ([USER, "data.train.name=fake_mnist", "+data.train.params.train=true"], ["data.train.root", "requires 'root'"]),
        (["solver.name=LBFGS", "solver.weight_decay=0.1"], ["solver.weight_decay", "takes no 'weight_decay'"]),
    ],
)
def test_validate_rejects_what_the_factory_cannot_take(
    overrides, needles, tmp_path, monkeypatch, capsys, restore_datasets
):
    code, err = _check(tmp_path, monkeypatch, capsys, overrides)
    assert code == 2, err
    for needle in needles:
        assert needle in err, err


def test_check_accepts_the_original_igniter_data_config(tmp_path, monkeypatch, capsys, restore_datasets):
    code, err = _check(tmp_path, monkeypatch, capsys, _user_configs(tmp_path))
    assert code == 0, err


def test_validate_reserves_exactly_the_step_arguments_build_run_provides(tmp_path, monkeypatch):
    """The names validate refuses in trainer.step_params are the keys build_run hands the
    step factory: both come from igniter.build.StepArgs."""
    import igniter.assemble as run
    from igniter.cli import compose_config
    from igniter.validate import validate

    seen: dict[str, set[str]] = {}
    real = run.call_with

    def spy(fn, available, params=None):
        seen.setdefault(getattr(fn, "__name__", "?"), set(available))
        return real(fn, available, params)

    monkeypatch.setattr(run, "call_with", spy)
    cfg = compose_config(["data.train.subset=64", "data.val.subset=32", f"output_dir={tmp_path / 'run'}"])
    run.build_training(cfg, tmp_path / "run")
    provided = seen["supervised"]  # the default trainer.step
    assert provided == set(STEP_ARGS)

    tried = provided | {"scaler", "autocast", "ctx", "lr", "params", "process_function"}
    bad = compose_config([f"+trainer.step_params.{n}=1" for n in sorted(tried)])
    reserved = {p.key.rsplit(".", 1)[-1] for p in validate(bad) if "is set by igniter" in p.expected}
    assert reserved == provided
