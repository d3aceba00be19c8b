"""Slow ranks named (issue 29, item 4): the detector's rules on synthetic records, then one real
3-process run (gloo, windows of 10 iterations) in which nothing is slow for 10 iterations, then
rank 1's handler sleeps (config: a ``sleep_on_rank`` handler on iterations 11-20), then rank 2's
loader does (config: the ``sleepy_digits`` dataset, its batches 21-30), then nothing again
(31-60): rank 1 is named as computing, rank 2 as waiting for data, each in the window of its
slowdown, nobody in the 4 healthy windows (one run instead of a separate healthy run of the
same length: the suite's time). Every rank's step itself sleeps 50 ms (``slow_supervised``), so
the CPU scheduling of 3 processes on 2 cores stays small beside it. The reports come every 0.5 s
(``runner.hang_timeout_s=5``): the 30 healthy iterations at the end leave rank 0's reporter
thread time to read rank 2's slow window before the run ends."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import read_metrics, run_igniter
from omegaconf import OmegaConf

from igniter.supervision.stragglers import StragglerDetector, straggler_problems


def _window(last: int, step_s: float, data_s: float = 0.001, steps: int = 10) -> dict:
    return {
        "last": last,
        "steps": steps,
        "step_s": step_s,
        "data_s": data_s,
        "compute_s": step_s - data_s,
        "wait_s": 0.0,
    }


def _records(*windows_per_rank: list[dict]) -> dict[int, dict]:
    return {r: {"rank": r, "host": f"h{r}", "windows": w} for r, w in enumerate(windows_per_rank)}


def test_a_healthy_window_names_nobody():
    detector = StragglerDetector(1.2, [0, 1, 2, 3])
    records = _records(*[[_window(10, 0.100 + 0.01 * r)] for r in range(4)])  # up to 1.14 x the median
    assert detector.observe(records) == []
    assert detector.judged == {10}


def test_a_slow_rank_is_named_once_per_window_with_its_cause():
    detector = StragglerDetector(1.2, [0, 1, 2])
    records = _records(
        [_window(10, 0.10), _window(20, 0.10)],
        [_window(10, 0.25), _window(20, 0.10)],  # computing
        [_window(10, 0.10), _window(20, 0.30, data_s=0.2)],  # its loader
    )
    found = detector.observe(records)
    assert [(s.rank, s.host, s.first, s.last, s.cause) for s in found] == [
        (1, "h1", 1, 10, "computing"),
        (2, "h2", 11, 20, "waiting for data"),
    ]
    assert found[0].step_s == 0.25 and found[0].median_s == 0.10
    assert "rank 1 (host h1) is slow: 0.250 s" in found[0].message(1.2, 3) and "x2.5" in found[0].message(1.2, 3)
    assert detector.observe(records) == [], "each window is judged once"


def test_a_window_is_judged_only_once_every_rank_has_published_it():
    detector = StragglerDetector(1.2, [0, 1])
    assert detector.observe({0: {"windows": [_window(10, 0.1)]}, 1: None}) == []
    assert detector.observe(_records([_window(10, 0.1), _window(20, 0.1)], [])) == []
    assert detector.judged == set()
    found = detector.observe(_records([_window(10, 0.1), _window(20, 0.1)], [_window(10, 0.1), _window(20, 0.5)]))
    assert [(s.rank, s.last) for s in found] == [(1, 20)]


@pytest.mark.parametrize(
    "runner, key",
    [({"straggler_factor": 1.0, "straggler_window": 50}, "runner.straggler_factor"),
     ({"straggler_factor": None, "straggler_window": 1}, "runner.straggler_window")],
)  # fmt: skip
def test_bad_straggler_settings_are_named(runner, key):
    assert [p.key for p in straggler_problems(OmegaConf.create(runner))] == [key]
    assert straggler_problems(OmegaConf.create({"straggler_factor": None, "straggler_window": 50})) == []


@pytest.mark.slow
def test_three_processes_name_the_computing_and_the_data_waiting_rank_and_nobody_else(tmp_path):
    run = tmp_path / "run"
    handler = '{name: sleep_on_rank, event: "ITERATION_COMPLETED(after=10) & ITERATION_COMPLETED(before=21)", params: {rank: 1, seconds: 0.1}}'  # fmt: skip
    proc = run_igniter(
        [
            "imports=[my_project]",
            "runner=spawn",
            "runner.nproc_per_node=3",
            "runner.hang_timeout_s=5",
            "runner.straggler_window=10",
            "data.loader.batch_size=12",
            "trainer.max_epochs=1",
            "trainer.epoch_length=60",
            "data.val=null",
            "checkpoint.enabled=false",
            "logging.progress_bar=false",
            "data.train.name=sleepy_digits",
            "+data.train.params.after_samples=80",
            "+data.train.params.until_samples=120",
            "+data.train.params.sleep_s=0.025",
            "trainer.step=slow_supervised",
            "+trainer.step_params.sleep_s=0.05",
            f"+handlers=[{handler}]",
            f"output_dir={run}",
        ],  # fmt: skip
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    named = re.findall(r"rank (\d) \(host [^)]+\) is slow: .* over iterations (\d+)-(\d+) .*?: (computing|waiting for data)", proc.stdout)  # fmt: skip
    assert named, proc.stdout
    by_window = {(int(first), int(last)): (int(rank), cause) for rank, first, last, cause in named}
    assert by_window.get((11, 20)) == (1, "computing"), proc.stdout  # within one window of its start
    assert by_window.get((21, 30)) == (2, "waiting for data"), proc.stdout
    for (first, last), (rank, cause) in by_window.items():
        assert first > 10 and last <= 30, f"nobody in the healthy iterations 1-10 and 31-60: {proc.stdout}"
        assert (rank, cause) == ((1, "computing") if last <= 20 else (2, "waiting for data")), proc.stdout
    assert len(named) == len(by_window), "at most once per window"
    recorded = read_metrics(run)["stragglers"]
    assert {(s["rank"], s["cause"]) for s in recorded} == {(1, "computing"), (2, "waiting for data")}
    assert re.search(r"stragglers +rank 1 \(host .*\) computing in \d window\(s\) from iteration 11", proc.stdout)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    assert 20 in [e.step for e in events.Scalars("stragglers/rank1_step_over_median")]
    assert 30 in [e.step for e in events.Scalars("stragglers/rank2_step_over_median")]
    assert any("stragglers" in tag for tag in events.Tags()["tensors"])  # the text entries
    json.dumps(recorded)  # plain values in metrics.json
    assert Path(run / "metrics.json").is_file()
