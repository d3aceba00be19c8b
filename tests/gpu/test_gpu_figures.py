"""MFU on CUDA (``pytest -m gpu tests/gpu``; ``bench/gpu_check.sh`` runs it): a tiny GPT in
``bf16-mixed`` on one GPU reports an MFU between 0 and 1 against the table peak of its GPU, found
by the GPU's NVML name, and the CUDA allocator's peak memory.

Skipped without CUDA or without the ``lm`` extra (transformers). The text is generated here (no
data set needed on the GPU machine): 200,000 characters of seeded random words.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_igniter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)"),
]
pytest.importorskip("transformers")

TIMEOUT = 420


def test_the_peak_table_finds_this_gpu_by_its_nvml_name():
    from igniter.flops import PEAK_TFLOPS, table_key
    from igniter.telemetry import device_name, open_nvml

    nvml, reason = open_nvml()
    assert nvml is not None, f"NVML is not usable: {reason}"
    names = []
    for i in range(nvml.nvmlDeviceGetCount()):
        name = nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i))
        names.append(name.decode() if isinstance(name, bytes) else name)
    name = device_name(torch.device("cuda", 0))
    assert name in names, (name, names)  # found through NVML (by the device's UUID)
    key = table_key(name)
    assert key is not None, f"{name!r} is not in igniter.flops.PEAK_TFLOPS: add its datasheet figures"
    assert PEAK_TFLOPS[key]["bf16"] > 0


@pytest.fixture(scope="module")
def bf16_gpt_run(tmp_path_factory) -> tuple[Path, dict, str]:
    from igniter.prepare_text import prepare_text

    cwd = tmp_path_factory.mktemp("gpt_bf16")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(500)]
    text = cwd / "text.txt"
    text.write_text(" ".join(rng.choice(words) for _ in range(40_000))[:200_000])
    prepare_text(text, cwd / "shards")
    vocab = json.loads((cwd / "shards" / "meta.json").read_text())["vocab_size"]
    run = cwd / "run"
    proc = run_igniter(
        [
            "experiment=shakespeare_char",
            f"data.root={cwd / 'shards'}",
            f"model.params.vocab_size={vocab}",
            "model.params.block_size=128",
            "model.params.n_layer=4",
            "model.params.n_head=4",
            "model.params.n_embd=256",
            "data.loader.batch_size=64",
            "trainer.precision=bf16-mixed",
            "trainer.max_epochs=1",
            "trainer.epoch_length=60",
            "data.val.subset=256",
            "logging.progress_bar=false",
            f"output_dir={run}",
        ],
        cwd,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return run, read_metrics(run), (run / "rank0.log").read_text()


def test_a_bf16_gpt_on_cuda_reports_mfu_against_its_gpus_peak(bf16_gpt_run):
    from igniter.flops import table_key
    from igniter.telemetry import device_name

    run, m, log = bf16_gpt_run
    assert "device cuda" in log
    name = device_name(torch.device("cuda", 0))
    assert m["peak_tflops_source"].startswith(f"{name}, bf16 ({table_key(name)}"), m["peak_tflops_source"]
    assert 0 < m["mfu"] < 1, m["mfu"]
    assert m["mfu"] == pytest.approx(m["model_tflops_per_s"] / m["peak_tflops"])
    # the first step (FLOP count, CUDA context, kernel selection) is outside the MFU's time base
    assert m["first_step_s"] > 0 and m["train_time_s"] > 0
    assert 0 <= m["data_wait_fraction"] <= 1
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < m["peak_memory_bytes"]["0"] < total  # the allocator's peak, not the host's RSS
    assert "MFU         " in log and "% of " in log
