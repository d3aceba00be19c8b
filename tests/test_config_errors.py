"""Bad configs: exit status 2, every bad key named, nothing run, no checkpoint written."""

from __future__ import annotations

import pytest
from conftest import run_igniter

from igniter.cli import main

BAD_CONFIGS = [
    # (overrides, keys that must be named in the message)
    (["solver.lrr=0.1"], ["solver.lrr", "Did you mean 'lr'"]),
    # a key under the wrong parent: the full key where it lives
    (["solver.params.lr=0.1"], ["solver.params.lr", "Did you mean 'solver.lr'", "'solver.params' is empty"]),
    (["batch_size=64"], ["batch_size", "Did you mean 'data.loader.batch_size'"]),
    (["trainer.max_epochs=abc"], ["trainer.max_epochs"]),
    (["trainer.max_epochs=0"], ["trainer.max_epochs"]),
    (["data.loader.batch_size=-8"], ["data.loader.batch_size"]),
    (["model=mlpp"], ["model", "Did you mean 'mlp'"]),
    (["model.name=lenett"], ["model.name", "Did you mean 'lenet'"]),
    (["solver.name=Adamm"], ["solver.name", "Did you mean 'Adam'"]),
    (["solver.scheduler.name=StepLRR"], ["solver.scheduler.name", "Did you mean 'StepLR'"]),
    (["experiment=mnist", "data.root=/definitely/not/here"], ["data.train.root", "data.val.root"]),
    (["experiment=mnist"], ["data.train.root"]),
    (
        ["evaluation.metrics=[acuracy]", "evaluation.monitor=acuracy"],
        ["evaluation.metrics[0]", "Did you mean 'accuracy'"],
    ),
    (["handlers=[{name:log_state,event:EPOCH_COMPLETD}]"], ["handlers[0].event", "EPOCH_COMPLETED"]),
    (["handlers=[{name:log_stat}]"], ["handlers[0].name", "Did you mean 'log_state'"]),
    (["+model.params.hiden=3"], ["model.params.hiden"]),
    # '+' adds keys to the typed config too: every key outside the schema is refused
    (["+trainer.max_epoch=3"], ["trainer.max_epoch", "Did you mean 'trainer.max_epochs'"]),
    (["+solver.lrr=0.1"], ["solver.lrr", "Did you mean 'solver.lr'"]),
    (["+runner.nproc=2"], ["runner.nproc", "Did you mean 'runner.nproc_per_node'"]),
    (["+data.train.foo=1", "+logging.levle=INFO"], ["data.train.foo", "logging.levle", "Did you mean 'logging.level'"]),
    (
        ["handlers=[{name:log_state}]", "+handlers.0.evnt=EPOCH_COMPLETED"],
        ["handlers[0].evnt", "Did you mean 'handlers[0].event'"],
    ),
    (["imports=[no_such_module_xyz]"], ["imports[0]"]),
    (["runner.nproc_per_node=4"], ["runner.nproc_per_node", "runner=spawn"]),
    (["data.loader.num_workers=-1", "checkpoint.n_saved=0"], ["data.loader.num_workers", "checkpoint.n_saved"]),
    # worker-process keys without worker processes (torch refuses them), and bad values
    (
        ["data.loader.prefetch_factor=4", "data.loader.persistent_workers=true"],
        ["data.loader.prefetch_factor", "data.loader.persistent_workers", "data.loader.num_workers is 0"],
    ),
    (
        ["data.loader.num_workers=2", "data.loader.prefetch_factor=0", "data.loader.multiprocessing_context=fork_it"],
        ["data.loader.prefetch_factor", "data.loader.multiprocessing_context", "expected one of fork"],
    ),
    (["runner.backend=nccl"], ["runner.backend"]),
    (["checkpoint.saver=s3"], ["checkpoint.saver"]),
    (["logging.peak_tflops=0"], ["logging.peak_tflops", "positive"]),
    (
        ["logging.torch_profiler={active:0,ranks:[1],activ:2}"],
        ["logging.torch_profiler.active", "logging.torch_profiler.ranks[0]", "logging.torch_profiler.activ"],
    ),
]


@pytest.mark.parametrize("overrides, needles", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_exits_2_names_key_and_writes_nothing(overrides, needles, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(overrides)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "a bad config must not create a run directory or checkpoints"


def test_every_problem_reported_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["solver.lrr=1", "trainer.max_epoch=2", "model.name=nope", "data.loader.batch_size=0"])
    err = capsys.readouterr().err
    assert "(4 problems)" in err
    for key in ("solver.lrr", "trainer.max_epoch", "model.name", "data.loader.batch_size"):
        assert f"  {key}" in err


def test_a_bad_group_choice_is_not_blamed_on_the_other_overrides(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["solver=adamw", f"output_dir={tmp_path / 'run'}", "trainer.max_epochs=-1", "model.params.hiden=3"])
    err = capsys.readouterr().err
    assert "(3 problems)" in err, err
    assert "  solver = 'adamw': no such option in config group 'solver'" in err and "solver.name=AdamW" in err
    assert "  trainer.max_epochs = -1" in err and "  model.params.hiden" in err
    assert "output_dir" not in err


@pytest.mark.parametrize("where", ["under_a_file", "in_proc"])
def test_a_run_directory_that_cannot_be_created_exits_2_naming_output_dir(where, tmp_path, monkeypatch, capsys):
    """Checked with the config when an ancestor is a file; /proc refuses the mkdir itself
    (root may write everywhere else), which is reported the same way, without a traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    output_dir = tmp_path / "a_file" / "run" if where == "under_a_file" else "/proc/igniter_run"
    with pytest.raises(SystemExit) as info:
        main([f"output_dir={output_dir}", "trainer.max_epochs=1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"output_dir = '{output_dir}'" in err and "Traceback" not in err, err
    if where == "under_a_file":
        assert f"{tmp_path / 'a_file'} is a file" in err


def test_real_command_exit_code_and_no_traceback(tmp_path):
    proc = run_igniter(["trainer.max_epochs=-1", "solver.lr=0"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "trainer.max_epochs = -1" in proc.stderr and "solver.lr = 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_multirun_validates_every_sweep_point_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["-m", "solver.lr=0.01,-1", "trainer.max_epochs=1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "solver.lr = -1" in err and "sweep point" in err
    assert not (tmp_path / "multirun").exists()


def test_plus_inside_a_free_form_dict_is_accepted(tmp_path, monkeypatch, capsys):
    """``params`` dicts take any key (the factory's signature decides): ``+`` works there."""
    from igniter.check import main as check

    monkeypatch.chdir(tmp_path)
    assert check(["+data.train.params.val_fraction=0.3"]) == 0, capsys.readouterr().err


def test_the_slurm_launcher_without_its_extra_is_a_config_problem(monkeypatch):
    """Without submitit/hydra-submitit-launcher (the `slurm` extra), hydra/launcher=slurm is one
    problem naming the extra (before: Hydra's "Unknown plugin class" with a traceback)."""
    import sys

    from igniter.cluster.hydra_launchers import launcher_problems

    monkeypatch.setitem(sys.modules, "submitit", None)  # an import of it raises ImportError
    problems = launcher_problems({"_target_": "hydra_plugins.igniter_submitit.SlurmLauncher"}, None)
    assert [p.key for p in problems] == ["hydra.launcher"] and "pip install 'igniter[slurm]'" in problems[0].expected
