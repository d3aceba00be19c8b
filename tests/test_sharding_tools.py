"""Tools around sharded runs: ``igniter export`` / ``igniter eval`` of ``checkpoint.format=dcp``
directories, and the per-rank memory ``igniter check`` prints for ``runner.strategy=fsdp``."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_igniter

from igniter.check import format_bytes, memory_plan
from igniter.checkpoint.dcp import dcp_model_state
from igniter.checkpoint.files import checkpoint_files
from igniter.models import MLP

INCOMPLETE = "is not a complete distributed checkpoint"


def mlp() -> MLP:
    """The digits default's model (configs/model/mlp.yaml)."""
    return MLP(64, [128], 10)


def write_dcp(directory: Path, model: torch.nn.Module) -> Path:
    """A one-process DCP checkpoint of ``model`` laid out as igniter writes them (model entry, extra.pt)."""
    import torch.distributed.checkpoint as dcp

    directory.mkdir(parents=True)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(directory), no_dist=True)
    torch.save({"trainer": {"iteration": 1}}, directory / "extra.pt")
    return directory


def assert_one_paragraph(proc, path: Path, header: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"igniter: {header}") and f"{path} {INCOMPLETE}" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2 and proc.stdout == "", proc.stderr
    assert "Traceback" not in proc.stderr


# ---- export from a DCP directory (one process, no run needed) ------------------------------


@pytest.fixture
def dcp_dir(tmp_path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = mlp()
    return write_dcp(tmp_path / "ckpt" / "last_checkpoint_1.dcp", model), model


def test_export_of_a_dcp_directory_writes_one_consolidated_file(dcp_dir, tmp_path):
    from safetensors.torch import load_file

    path, model = dcp_dir
    out = tmp_path / "weights.safetensors"
    proc = run_igniter(["export", str(path), "--output", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "4 tensors" in proc.stdout
    assert proc.stderr == "", proc.stderr  # no warning about loading without a process group
    loaded = load_file(str(out))
    fresh = mlp()
    fresh.load_state_dict(loaded)  # strict: every key, every shape
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("damage", ["no_metadata", "no_data", "truncated_data", "pickled_metadata"])
def test_export_of_a_damaged_dcp_directory_is_one_paragraph_and_writes_nothing(dcp_dir, tmp_path, damage):
    path, _ = dcp_dir
    data = next(path.glob("*.distcp"))
    if damage == "no_metadata":  # an interrupted write: DCP writes .metadata last
        (path / ".metadata").unlink()
    elif damage == "no_data":
        data.unlink()
    elif damage == "truncated_data":
        data.write_bytes(data.read_bytes()[:1000])
    else:

        class Exploit:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'PWNED'}",))

        (path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    before = sorted(p.name for p in path.parent.iterdir())
    proc = run_igniter(["export", str(path), "--format", "safetensors"], tmp_path)
    assert_one_paragraph(proc, path, "cannot export")
    expected = {
        "no_metadata": "(no readable .metadata: No such file or directory",
        "no_data": "(its data cannot be read: FileNotFoundError",
        "truncated_data": "(its data cannot be read: ",
        "pickled_metadata": "(its .metadata references posix.system, not only DCP metadata; nothing from it was run)",
    }[damage]
    assert expected in proc.stderr, proc.stderr
    assert "weights_only=False" not in proc.stderr
    assert sorted(p.name for p in path.parent.iterdir()) == before, "nothing written"
    assert not (tmp_path / "PWNED").exists()


def test_resume_refuses_a_dcp_checkpoint_whose_metadata_pickles_code(tmp_path):
    """DCP reads .metadata with a plain pickle.load: resume checks it with the restricted
    unpickler first, skips the checkpoint with its reason, and falls back to an older one."""
    run = tmp_path / "run"
    args = [
        "trainer.max_epochs=2",
        "data.train.subset=320",
        "checkpoint.format=dcp",
        "checkpoint.min_interval_seconds=0",  # one per epoch: an older one to fall back to
        "logging.loggers=[]",
        f"output_dir={run}",
    ]
    proc = run_igniter(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "assuming the intent" not in proc.stderr, proc.stderr  # one process saves DCP on purpose
    newest, older = sorted(
        run.glob("checkpoints/last_checkpoint_*.dcp"), key=lambda p: int(p.stem.rsplit("_", 1)[1]), reverse=True
    )

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    (newest / ".metadata").write_bytes(pickle.dumps(Exploit()))
    proc = run_igniter([*args[:1], "trainer.max_epochs=3", *args[1:]], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "assuming the intent" not in proc.stderr, proc.stderr  # nor loads it (issue 27)
    log = (run / "rank0.log").read_text()
    assert f"skipping checkpoint {newest}" in log and "nothing from it was run" in log
    assert f"resumed from {older}" in log
    assert not (tmp_path / "PWNED").exists()


# ---- a real fsdp run: export and eval reproduce it -----------------------------------------


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """Two processes, runner.strategy=fsdp (both linear layers sharded), 2 epochs: .dcp checkpoints."""
    cwd = tmp_path_factory.mktemp("fsdp_tools")
    run = cwd / "run"
    args = ["runner=spawn", "runner.nproc_per_node=2", "runner.strategy=fsdp", "runner.fsdp.min_params=100",
            "trainer.max_epochs=2", "logging.progress_bar=false", f"output_dir={run}"]  # fmt: skip
    proc = run_igniter(args, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def last_dcp(run: Path) -> Path:
    newest = checkpoint_files(run / "checkpoints")[0]
    assert newest.is_dir() and newest.suffix == ".dcp", newest
    return newest


@pytest.mark.slow  # two spawned processes
def test_export_of_an_fsdp_checkpoint_loads_into_a_fresh_model(fsdp_run, tmp_path):
    from safetensors.torch import load_file

    ckpt = last_dcp(fsdp_run)
    out = tmp_path / "model.safetensors"
    proc = run_igniter(["export", str(ckpt), "--output", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    loaded, expected = load_file(str(out)), dcp_model_state(ckpt)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    fresh = mlp()
    fresh.load_state_dict(loaded)
    assert not torch.equal(fresh.state_dict()["net.0.weight"], mlp().state_dict()["net.0.weight"]), "trained weights"


@pytest.mark.slow  # two spawned processes (the run, then a two-process evaluation)
def test_eval_of_an_fsdp_run_reproduces_its_final_accuracy(fsdp_run, tmp_path):
    final = read_metrics(fsdp_run)["final"]
    results = {}
    for name, target, overrides in [
        # the run's config: spawn, 2 processes, fsdp; one process asked for: evaluated unsharded (ddp)
        ("one process", fsdp_run, ["runner.nproc_per_node=1"]),
        ("fsdp", last_dcp(fsdp_run), []),  # the run's own runner: two processes, sharded
    ]:
        (fsdp_run / "eval_metrics.json").unlink(missing_ok=True)
        proc = run_igniter(["eval", str(target), *overrides], tmp_path)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        results[name] = json.loads((fsdp_run / "eval_metrics.json").read_text())
        assert results[name]["checkpoint"] == str(last_dcp(fsdp_run))
    summary = {name: (r["world_size"], r["strategy"]) for name, r in results.items()}
    assert summary == {"one process": (1, "ddp"), "fsdp": (2, "fsdp")}, summary
    for name, result in results.items():
        assert result["metrics"]["accuracy"] == final["accuracy"], (name, result, final)
        assert result["metrics"]["loss"] == pytest.approx(final["loss"], rel=1e-5), (name, result, final)


@pytest.mark.slow  # needs the two-process run
def test_eval_of_an_incomplete_dcp_checkpoint_is_one_paragraph_and_writes_nothing(fsdp_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fsdp_run, run)
    (run / "eval_metrics.json").unlink(missing_ok=True)
    newest = last_dcp(run)
    (newest / ".metadata").unlink()
    for target in (run, newest):
        proc = run_igniter(["eval", str(target)], tmp_path)
        assert_one_paragraph(proc, newest, "cannot evaluate")
        assert "no readable .metadata" in proc.stderr
        assert not (run / "eval_metrics.json").exists()


# ---- igniter check: per-rank memory ----------------------------------------------------------

UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}


def memory_figures(stdout: str) -> dict[str, float]:
    line = next(line for line in stdout.splitlines() if line.strip().startswith("memory"))
    per_rank = line.split("per rank ", 1)[1].split(" (", 1)[0]
    return {
        name: float(v) * UNITS[u] for v, u, name in re.findall(r"([\d.]+) (B|kB|MB|GB) ([a-z ]+?)(?:,|$)", per_rank)
    }


def test_check_prints_the_per_rank_share_with_fsdp(tmp_path):
    figures, lines = {}, {}
    for strategy in ("ddp", "fsdp"):
        proc = run_igniter(
            ["check", "runner=spawn", "runner.nproc_per_node=2", f"runner.strategy={strategy}"], tmp_path
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines[strategy] = next(line for line in proc.stdout.splitlines() if "memory" in line)
        assert f"strategy {strategy} over 2 processes: per rank" in lines[strategy], proc.stdout
        figures[strategy] = memory_figures(proc.stdout)
        in_all = re.search(r"\(([\d.]+) (B|kB|MB|GB) per rank before activations", lines[strategy])
        assert in_all, lines[strategy]
        total = float(in_all.group(1)) * UNITS[in_all.group(2)]
        assert total == pytest.approx(sum(figures[strategy].values()), rel=0.01), lines[strategy]
    assert set(figures["ddp"]) == {"parameters", "gradients", "optimizer state"}, lines
    for name, ddp in figures["ddp"].items():
        # MLP 64-128-10: every dim 0 even, so exactly half, up to the printed 3 digits
        assert figures["fsdp"][name] == pytest.approx(ddp / 2, rel=0.01), (name, lines)
    assert figures["ddp"]["optimizer state"] == pytest.approx(2 * figures["ddp"]["parameters"], rel=0.01), (
        "Adam: 2 moments"
    )
    assert list(tmp_path.iterdir()) == [], "check writes nothing"


def test_memory_plan_counts_the_padded_rows_of_an_uneven_shard():
    model = torch.nn.Linear(3, 5)  # weight (5, 3), bias (5,): 3 of 5 rows on rank 0 with W=2
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    plan = memory_plan(model, optimizer, "fsdp", 2)
    assert plan["parameters"] == (3 * 3 * 4 + 3 * 4, 20 * 4)
    assert plan["gradients"] == plan["parameters"]
    # exp_avg and exp_avg_sq sharded like the parameter; the scalar step whole on every rank
    step = sum(s["step"].numel() * s["step"].element_size() for s in optimizer.state.values())
    assert plan["optimizer state"] == (2 * plan["parameters"][0] + step, 2 * 20 * 4 + step)
    assert memory_plan(model, optimizer, "ddp", 2)["parameters"] == (80, 80)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: no state
    sgd.step()
    assert memory_plan(model, sgd, "fsdp", 2)["optimizer state"] == (0, 0)


def test_format_bytes():
    assert [format_bytes(n) for n in (512, 34_900, 1_234_567, 250e6, 3.4e9)] == [
        "512 B",
        "34.9 kB",
        "1.23 MB",
        "250 MB",
        "3.4 GB",
    ]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["runner.strategy=fsdp"], "runner.strategy"),  # one process: nothing to shard over
        (
            ["runner=spawn", "runner.nproc_per_node=2", "runner.strategy=fsdp", "checkpoint.format=torch"],
            "checkpoint.format",
        ),
        (
            ["runner=spawn", "runner.nproc_per_node=2", "runner.strategy=fsdp", "runner.fsdp.cpu_offload=true"],
            "runner.fsdp.cpu_offload",
        ),
        (["checkpoint.async_save=true"], "checkpoint.async_save"),
        (["runner.strategy=zero3"], "runner.strategy"),
        (["runner.fsdp.min_params=-1"], "runner.fsdp.min_params"),  # checked with ddp too
    ],
    ids=[
        "fsdp-one-process",
        "fsdp-torch-format",
        "cpu-offload-without-gpu",
        "async-torch-format",
        "unknown-strategy",
        "fsdp-value-under-ddp",
    ],
)
def test_strategy_settings_that_cannot_work_exit_2_naming_the_key(overrides, key, tmp_path):
    proc = run_igniter([*overrides, f"output_dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2 and f"  {key} = " in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_hsdp_by_default_shards_within_a_node_replicates_across_nodes_and_says_so_once(monkeypatch, caplog):
    """``shard_model`` on 2 nodes of 2 processes with ``runner.fsdp.replicate`` unset builds the 2 x 2
    mesh (replicate across the nodes, shard within each) and rank 0 alone logs it, once, as the
    default; ``replicate=1``: the 1-D mesh over all 4 and no HSDP line. The mesh and the sharding
    are recorded, not built (the decision needs no processes; 4 real ones run HSDP in
    test_activation_checkpointing)."""
    import logging

    import ignite.distributed as idist
    import torch.distributed.device_mesh as device_mesh
    import torch.distributed.fsdp as fsdp_module
    from omegaconf import OmegaConf

    from igniter.config import FsdpConfig
    from igniter.parallel.strategy import shard_model

    meshes: list[tuple] = []
    rank = [0]
    monkeypatch.setattr(idist, "get_world_size", lambda: 4)
    monkeypatch.setattr(idist, "get_nnodes", lambda: 2)
    monkeypatch.setattr(idist, "get_rank", lambda: rank[0])
    monkeypatch.setattr(device_mesh, "init_device_mesh", lambda _d, shape, mesh_dim_names=None: meshes.append((shape, mesh_dim_names)))  # fmt: skip
    monkeypatch.setattr(fsdp_module, "fully_shard", lambda module, **_: module)
    caplog.set_level(logging.INFO, logger="igniter")

    def shard(rank_: int, **fsdp) -> list[str]:
        rank[0] = rank_
        caplog.clear()
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        shard_model(model, OmegaConf.structured(FsdpConfig(shard_modules=["Linear"], **fsdp)), "32")
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("HSDP")]

    assert shard(0) == [
        "HSDP: 2 replica groups x 2 shards (the default on 2 nodes: sharded within a node, replicated across nodes;"
        " runner.fsdp.replicate=1 shards over every process)"
    ]
    assert shard(1) == [] and meshes == [((2, 2), ("replicate", "shard"))] * 2, meshes
    assert shard(0, replicate=1) == [] and meshes[-1] == ((4,), None)
    assert shard(0, replicate=4) == ["HSDP: 4 replica groups x 1 shards (runner.fsdp.replicate; parameters sharded within a group)"]  # fmt: skip


def test_hsdp_replica_groups_default_to_the_nodes_and_must_divide_the_world(capsys):
    from omegaconf import OmegaConf

    from igniter.check import main
    from igniter.parallel.strategy import replica_groups, strategy_problems

    fsdp = OmegaConf.create({"replicate": None})
    assert [replica_groups(fsdp, 8, nodes) for nodes in (1, 2, 3)] == [1, 2, 1]  # 3 nodes do not split 8 evenly
    assert replica_groups(OmegaConf.create({"replicate": 4}), 8, 2) == 4

    def problems(strategy: str, replicate: int | None, world: int) -> list[str]:
        cfg = OmegaConf.create(
            {"runner": {"strategy": strategy, "fsdp": {"replicate": replicate, "min_params": 0, "cpu_offload": False}}}
        )
        return [p.key for p in strategy_problems(cfg, world)]

    assert problems("fsdp", 3, 4) == ["runner.fsdp.replicate"] and problems("fsdp", 2, 4) == []
    assert problems("ddp", 0, 1) == ["runner.fsdp.replicate"]  # checked whatever the strategy
    # igniter check: each rank's share is of its group of 2, half of the ddp figure (MLP 64-128-10)
    assert main(["runner=spawn", "runner.nproc_per_node=4", "runner.strategy=fsdp", "runner.fsdp.replicate=2"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "memory" in x)
    assert "HSDP: sharded over the 2 processes of each of 2 replica groups" in line, line
    assert memory_figures(line)["parameters"] == pytest.approx((64 * 128 + 128 + 128 * 10 + 10) * 4 / 2, rel=0.01)
