"""``trainer.activation_checkpointing``: the named modules recomputed in the backward pass.

In-process: the same losses and gradients as without it on a tiny GPT (with dropout: the
recomputation draws the same masks), every block's forward run twice per step, the plain
module's checkpoint keys, a name that matches nothing, ``igniter check``'s estimate (exact on
a model whose saved tensors are counted by hand; the torch and dcp state dicts load strictly
both ways). Real runs: FSDP + torch.compile + gradient accumulation and HSDP with it on 4
processes ends where the plain 1-process run ends; that run's distributed checkpoint resumes
under other mesh shapes (2 x 2 -> 1 x 4 -> 4 x 1, issue 29 item 2), without it (1 x 4) and with
it again (4 x 1).
Peak memory is measured by ``bench/activation_checkpointing.py``, not here.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics, run_igniter, run_together

from igniter.checkpoint.dcp import dcp_model_state
from igniter.checkpoint.files import checkpoint_files
from igniter.errors import ConfigError
from igniter.parallel.strategy import checkpoint_activations

pytest.importorskip("transformers")
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def _gpt(dropout: float = 0.0) -> torch.nn.Module:
    from igniter.lm import causal_lm

    torch.manual_seed(0)
    return causal_lm(50, block_size=16, n_layer=3, n_head=2, n_embd=32, dropout=dropout)


def _block_calls(model: torch.nn.Module) -> list[int]:
    """A counter of GPT2Block forward calls (pre-hooks: the recomputation stops early, once it
    has what the backward pass needs, so a block's forward hook would not see it end)."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    calls = [0]
    for m in model.modules():
        if isinstance(m, GPT2Block):
            m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_same_losses_and_gradients_and_every_block_runs_twice_per_step():
    plain = _gpt(dropout=0.1)
    checkpointed = checkpoint_activations(copy.deepcopy(plain), ["GPT2Block"])
    counts = {"plain": _block_calls(plain), "checkpointed": _block_calls(checkpointed)}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.1) for name, m in (("plain", plain), ("checkpointed", checkpointed))}  # fmt: skip
    data = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randint(0, 50, (4, 16), generator=data)
        losses, grads = {}, {}
        for name, model in (("plain", plain), ("checkpointed", checkpointed)):
            torch.manual_seed(100 + step)  # the same dropout masks
            optimizers[name].zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            losses[name], grads[name] = loss.item(), [p.grad.clone() for p in model.parameters()]
            optimizers[name].step()
        assert losses["plain"] == pytest.approx(losses["checkpointed"], abs=1e-6)
        for a, b in zip(grads["plain"], grads["checkpointed"]):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    assert counts["plain"][0] == 3 * 3, "3 blocks, 3 steps"
    assert counts["checkpointed"][0] == 2 * 3 * 3, "every block's forward once more in the backward pass"


def test_checkpoint_keys_are_the_plain_modules_both_ways():
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    plain = _gpt()
    checkpointed = checkpoint_activations(copy.deepcopy(plain), ["transformers.models.gpt2.modeling_gpt2.GPT2Block"])
    assert any("_checkpoint_wrapped_module" in n for n, _ in checkpointed.named_parameters()), "it did wrap"
    assert list(checkpointed.state_dict()) == list(plain.state_dict())  # torch files
    assert list(get_model_state_dict(checkpointed)) == list(get_model_state_dict(plain))  # dcp
    fresh = _gpt()
    torch.nn.init.zeros_(fresh.lm.transformer.h[0].mlp.c_fc.weight)
    checkpointed.load_state_dict(fresh.state_dict())  # strict, both directions
    plain.load_state_dict(checkpointed.state_dict())
    assert torch.equal(
        plain.lm.transformer.h[0].mlp.c_fc.weight, torch.zeros_like(plain.lm.transformer.h[0].mlp.c_fc.weight)
    )


def test_a_name_that_matches_no_module_is_a_config_error_listing_the_classes(capsys):
    with pytest.raises(ConfigError) as error:
        checkpoint_activations(_gpt(), ["GPT2Block", "TransformerBlock"])
    text = str(error.value)
    assert error.value.exit_status == 2 and "trainer.activation_checkpointing" in text
    assert "TransformerBlock matches no module" in text and "GPT2Block" in text and "GPT2MLP" in text
    from igniter.check import main

    assert main(["trainer.activation_checkpointing=[GPT2Block]"]) == 2  # the default MLP has none
    err = capsys.readouterr().err
    assert "trainer.activation_checkpointing" in err and "Linear" in err and "Traceback" not in err


def test_the_meter_counts_saved_activations_as_by_hand():
    """4 blocks of Linear(8, 8) + ReLU on a batch of 5: a Linear saves its input, a ReLU its
    output (the next Linear's input, one storage). Without: the input and 4 ReLU outputs, 5
    tensors of 5 x 8 floats. With every block checkpointed: nothing saved outside them, the
    blocks' 4 inputs kept, and the largest block's own 2 tensors: 6."""
    from igniter.activation_memory import ActivationMeter

    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()) for _ in range(4)])
    one = 5 * 8 * 4
    with ActivationMeter(model, list(model)) as meter:
        model(torch.randn(5, 8)).sum().backward()
    assert (meter.without, meter.with_checkpointing) == (5 * one, 6 * one)


def test_the_meter_counts_each_micro_batch_though_its_addresses_are_reused():
    """4 forward and backward passes of 256 x 512 floats, one after the other (gradient
    accumulation): the allocator hands a freed pass's addresses to the next, whose tensors the
    meter counts all the same: a quarter of the 4 passes' bytes is one pass's."""
    from igniter.activation_memory import ActivationMeter

    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU()) for _ in range(4)])
    with ActivationMeter(model, list(model)) as one:
        model(torch.randn(256, 512)).sum().backward()
    with ActivationMeter(model, list(model)) as four:
        for _ in range(4):
            model(torch.randn(256, 512)).sum().backward()
    four.micro_batches = 4
    assert one.without == 5 * 256 * 512 * 4  # the input and the 4 ReLU outputs
    assert (four.without, four.with_checkpointing) == (one.without, one.with_checkpointing)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from igniter.prepare_text import prepare_text

    if not SHAKESPEARE.is_file():
        pytest.skip(f"the Shakespeare text is not at {SHAKESPEARE}")
    root = tmp_path_factory.mktemp("ac_text")
    (root / "small.txt").write_text(SHAKESPEARE.read_text()[:8000])
    prepare_text(root / "small.txt", root / "char", shard_tokens=1000)
    return root / "char"


def test_check_prints_the_activation_estimate_with_and_without(shards, capsys):
    from igniter.check import main

    vocab = json.loads((shards / "meta.json").read_text())["vocab_size"]
    # 2 micro-batches of 8: the measured figures are one micro-batch's (the second one's tensors
    # reuse the first one's freed addresses, and are counted all the same)
    args = [*_tiny(shards, vocab), "trainer.activation_checkpointing=[GPT2Block]", "trainer.accumulate_grad_batches=2"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    line = next(x for x in out if x.strip().startswith("activations"))
    assert "without activation checkpointing" in line and "2 x GPT2Block recomputed" in line, line
    assert "measured on one forward pass of 8 samples (a micro-batch)" in line, line
    units = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
    without, with_ = (float(v) * units[u] for v, u in re.findall(r"([\d.]+) (B|kB|MB|GB)\b", line)[:2])
    assert with_ < without, line
    # estimated before the step from 2 micro-batches of 2 samples, linear in the batch size: within 5%
    ahead = next(x for x in out if x.strip().startswith("headroom"))
    assert "measured on a step of 4 samples, x 8 (a micro-batch)" in ahead, ahead
    value, unit = re.search(r"about ([\d.]+) (B|kB|MB|GB)\b", ahead).groups()
    assert abs(float(value) * units[unit] - with_) <= 0.05 * with_, (ahead, line)


# A 2-layer, 32-wide GPT on windows of 16 characters: 2 epochs of 3 iterations, a checkpoint every
# 2 iterations and at the end of each epoch (iterations 2, 3, 4 and 6, all kept), no validation;
# the recipe's AdamW (ends within 1e-7 here).
def _tiny(shards: Path, vocab: int) -> list[str]:
    return [
        "experiment=shakespeare_char", f"data.root={shards}", f"model.params.vocab_size={vocab}",
        "model.params.block_size=16", "model.params.n_layer=2", "model.params.n_head=2", "model.params.n_embd=32",
        "trainer.max_epochs=2", "trainer.epoch_length=3", "data.val=null", "logging.progress_bar=false",
        "logging.loggers=[]", "checkpoint.n_saved=4", "checkpoint.every_iterations=2", "checkpoint.min_interval_seconds=0",
        "data.loader.batch_size=16",
    ]  # fmt: skip


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return dcp_model_state(path) if path.is_dir() else torch.load(path, weights_only=True)["model"]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, (a[k] - b[k]).abs().max())


# The 4-process settings of the runs below (FSDP with each GPT2Block a unit, 2 micro-batches) and
# the handlers: every global batch's samples (``record_windows``, tag ``$RUN_TAG``) and, at the
# end, every rank's parameter bytes (``record_param_bytes``); runner.fsdp.replicate is added.
AC = "trainer.activation_checkpointing=[GPT2Block]"
HSDP = [
    "runner=spawn", "runner.nproc_per_node=4", "runner.strategy=fsdp", "runner.fsdp.shard_modules=[GPT2Block]",
    "trainer.accumulate_grad_batches=2", "imports=[my_project]",
    "+handlers=[{name: record_param_bytes, event: COMPLETED}, {name: record_windows, event: ITERATION_COMPLETED}]",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict[str, Path]:
    """The plain 1-process run and, side by side, a 4-process run with everything at once: HSDP
    (``runner.fsdp.replicate=2``: 2 replica groups x 2 shards, each GPT2Block a unit),
    torch.compile (TorchDynamo with the eager backend, to keep the test short; aot_eager on 2
    processes, checked by hand, ends within 1e-7 too), 2 micro-batches and activation
    checkpointing (:data:`HSDP`). Both record their global batches (tags ``plain``, ``2x2``)."""
    cwd = tmp_path_factory.mktemp("ac_runs")
    vocab = json.loads((shards / "meta.json").read_text())["vocab_size"]
    base = _tiny(shards, vocab)
    plain = ["imports=[my_project]", "+handlers=[{name: record_windows, event: ITERATION_COMPLETED}]"]
    all_on = [*HSDP, "runner.fsdp.replicate=2", "+trainer.compile.backend=eager", AC]
    procs = run_together(
        [[*base, *plain, f"output_dir={cwd / 'plain'}"], [*base, *all_on, f"output_dir={cwd / 'all'}"]],
        cwd,
        envs=[{"RUN_TAG": "plain"}, {"RUN_TAG": "2x2"}],
    )
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {"plain": cwd / "plain", "all": cwd / "all", "cwd": cwd, "base": base}  # type: ignore[dict-item]


@pytest.mark.slow
def test_with_hsdp_compile_and_accumulation_it_ends_where_the_plain_run_ends(runs):
    """Also the HSDP claims (issue 29, item 2): the 2 x 2 run ends with the 1-process weights, and
    every rank holds half of the model's parameter bytes (sharded over its group of 2), not a
    quarter (sharded over all 4): the 2-D pattern."""
    log = (runs["all"] / "rank0.log").read_text()
    assert "activation checkpointing: 2 modules (GPT2Block) recomputed in the backward pass" in log
    assert "HSDP: 2 replica groups x 2 shards" in log
    for rank in range(4):  # every dim 0 of this GPT is even: exactly half
        local, whole = (int(v) for v in (runs["all"] / f"param_bytes_rank{rank}.txt").read_text().split())
        assert local * 2 == whole, (rank, local, whole)
    assert read_metrics(runs["all"])["compile_s"] > 0
    _assert_close(_weights(checkpoint_files(runs["plain"] / "checkpoints")[0]), _weights(checkpoint_files(runs["all"] / "checkpoints")[0]))  # fmt: skip


@pytest.mark.slow
def test_hsdp_checkpoints_resume_across_mesh_shapes_with_the_same_global_batches(runs, tmp_path):
    """Issue 29, item 2: the 2 x 2 HSDP run stopped at iteration 2 (mid-epoch; a copy of it whose
    newest checkpoint is that of iteration 2), resumed as 1 x 4 (``resume=`` that ``.dcp``
    directory; ``replicate=1``, plain FSDP over 4 processes: each dcp shard read into another
    layout; and without activation checkpointing)
    and SIGKILLed at iteration 5 once the checkpoint of 4 (mid-epoch 2) is on disk
    (``die_once``), then resumed as 4 x 1 (4 replica groups of 1: every rank holds the whole
    model; activation checkpointing on again: a resume with it switched off, then on) to the end.
    Every global batch after each resume
    holds the uninterrupted run's samples in its order (the 1-process run's, which the 2 x 2
    run's equal), and the run ends allclose to it. Without compile (the same numerics as the
    2 x 2 run's eager backend; shorter)."""
    from test_sharding import global_batches

    run, marker = tmp_path / "run", tmp_path / "died"
    shutil.copytree(runs["all"], run)
    for later in checkpoint_files(run / "checkpoints"):
        if not later.name.endswith("_2.dcp"):
            shutil.rmtree(later)
    for stale in run.glob("param_bytes_rank*.txt"):
        stale.unlink()
    (start,) = checkpoint_files(run / "checkpoints")

    def shape(replicate: int, *extra: str) -> list[str]:
        return [
            *runs["base"], *HSDP, *extra, f"runner.fsdp.replicate={replicate}", f"output_dir={run}", "trainer.step=die_once",
            "+trainer.step_params.iteration=[5]", "+trainer.step_params.after=[4]",
            f"+trainer.step_params.checkpoints={run / 'checkpoints'}",
        ]  # fmt: skip

    env = {"DIE_ONCE_MARKER": str(marker)}
    # resume= names the .dcp directory (the 4 x 1 part resumes with the default, resume=auto)
    killed = run_igniter([*shape(1), f"resume={start}"], runs["cwd"], env={**env, "RUN_TAG": "1x4"})
    assert killed.returncode != 0 and Path(f"{marker}.5").exists(), killed.stderr[-3000:]
    middle = checkpoint_files(run / "checkpoints")[0]
    assert middle.name.endswith("_4.dcp"), middle
    proc = run_igniter(shape(4, AC), runs["cwd"], env={**env, "RUN_TAG": "4x1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    log = (run / "rank0.log").read_text()
    assert f"resumed from {start}" in log and f"resumed from {middle}" in log
    assert "HSDP: 2 replica groups x 2 shards" in log and "HSDP: 4 replica groups x 1 shards" in log
    assert log.count("activation checkpointing: 2 modules (GPT2Block)") == 2, "the 2 x 2 and 4 x 1 parts, not 1 x 4"
    for rank in range(4):  # 4 x 1: each rank's parameters are the whole model's
        local, whole = (int(v) for v in (run / f"param_bytes_rank{rank}.txt").read_text().split())
        assert local == whole, (rank, local, whole)
    reference = global_batches(runs["plain"], "plain")
    assert sorted(reference) == list(range(1, 7)) and all(len(b) == 16 for b in reference.values())
    assert global_batches(runs["all"], "2x2") == reference, "2 x 2: other samples or order"
    for tag, iterations in (("1x4", [3, 4]), ("4x1", [5, 6])):
        batches = global_batches(run, tag)
        assert sorted(batches) == iterations, (tag, sorted(batches))
        assert all(batches[i] == reference[i] for i in iterations), f"{tag}: other samples or order after the resume"
    _assert_close(_weights(checkpoint_files(runs["plain"] / "checkpoints")[0]), _weights(checkpoint_files(run / "checkpoints")[0]))  # fmt: skip
