"""Launching a run's processes: the runners (single, spawn, torchrun, slurm), what the launch
environment says, signals, threads, and a worker's errors back to the launcher."""

from igniter.launch import runners, slurm_runner, torchrun_runner  # noqa: F401  (register the built-in runners)
