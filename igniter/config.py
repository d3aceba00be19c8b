"""The typed configuration schema, registered in Hydra's ConfigStore.

Every section a run needs is a dataclass; the YAML files in ``configs/``
(shipped inside the package as ``igniter.configs``) fill them in. Hydra
rejects unknown keys and wrong types while composing; :mod:`igniter.validate`
checks the values (ranges, registry names, paths, world size).

Batch sizes are *global*: the number of samples in one optimizer step summed
over all processes. Each process loads ``batch_size / world_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

__all__ = [
    "TransformConfig",
    "DatasetConfig",
    "LoaderConfig",
    "DataConfig",
    "ModelConfig",
    "SchedulerConfig",
    "SolverConfig",
    "TrainerConfig",
    "EvaluationConfig",
    "HandlerConfig",
    "CheckpointConfig",
    "TorchProfilerConfig",
    "LoggingConfig",
    "FsdpConfig",
    "RunnerConfig",
    "IgniterConfig",
    "CONFIG_MODULE",
    "register_schema",
]

#: Python package holding the YAML config tree (``configs/`` in the repository).
CONFIG_MODULE = "igniter.configs"


@dataclass
class TransformConfig:
    """One per-sample transform from the transforms registry, with its keyword arguments."""

    name: str = MISSING
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetConfig:
    """A dataset from the dataset registry.

    ``root`` is a directory (checked to exist before anything runs) for
    datasets that read files; ``download``: fetch missing files into ``root``
    (passed to factories that take ``download``, as torchvision's datasets do;
    the built-in ``mnist`` checks each file's SHA-256); ``subset`` keeps a
    seeded random subset of that many samples (quick runs and tests).
    """

    name: str = MISSING
    split: str = "train"
    root: Optional[str] = None
    download: bool = False
    subset: Optional[int] = None
    params: Dict[str, Any] = field(default_factory=dict)
    transforms: List[TransformConfig] = field(default_factory=list)


@dataclass
class LoaderConfig:
    """Data loading. ``batch_size`` and ``val_batch_size`` are global (all processes together).

    ``num_workers``: ``DataLoader`` worker processes per node (:func:`igniter.loading.workers_per_process`:
    each of a node's ``nproc_per_node`` training processes gets ``ceil(num_workers / nproc_per_node)``,
    or ``num_workers`` when that is fewer than ``nproc_per_node``; 0 loads in the training process). Every sample's randomness is seeded from ``(trainer.seed, epoch,
    index)`` (:mod:`igniter.loading`): the batches are the same whatever ``num_workers``.
    ``prefetch_factor``: batches each worker loads ahead (``None``: torch's 2).
    ``persistent_workers``: keep the workers between epochs (``None``: on when there are
    workers). ``pin_memory``: page-locked batches for faster copies to the GPU (``None``: on
    when the device is CUDA). ``multiprocessing_context``: how workers start (``fork``,
    ``spawn``, ``forkserver``; ``None``: ``fork`` on Linux, see :func:`igniter.loading.start_method`).
    ``prefetch_factor``, ``persistent_workers=true`` and ``multiprocessing_context`` need
    ``num_workers > 0`` (:func:`igniter.loading.loader_problems`).
    """

    batch_size: int = 32
    val_batch_size: Optional[int] = None
    num_workers: int = 0
    shuffle: bool = True
    drop_last: bool = True
    pin_memory: Optional[bool] = None
    collate_fn: Optional[str] = None
    prefetch_factor: Optional[int] = None
    persistent_workers: Optional[bool] = None
    multiprocessing_context: Optional[str] = None


@dataclass
class DataConfig:
    """Train/val datasets and loading. ``root`` is a shared data directory the
    dataset configs may refer to as ``${data.root}``; ``download`` likewise as
    ``${data.download}`` (``configs/data/mnist.yaml`` does)."""

    root: Optional[str] = None
    download: bool = False
    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: Optional[DatasetConfig] = None
    loader: LoaderConfig = field(default_factory=LoaderConfig)


@dataclass
class ModelConfig:
    """A model from the model registry, built as ``factory(**params)``.

    ``weights``: initial weights loaded before training (strict: every key and shape), a
    local file or a URL (``s3://...``, ``https://...``) downloaded once into the cache
    (:func:`igniter.checkpoint.object_store.cache_dir`); a model state dict or an igniter checkpoint
    (its ``model``). ``weights_sha256``: the download's expected SHA-256 (hex), when known.
    """

    name: str = MISSING
    params: Dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None
    weights_sha256: Optional[str] = None


@dataclass
class SchedulerConfig:
    """An LR scheduler from the solver registry or ``torch.optim.lr_scheduler``.

    ``step_on``: ``epoch`` (after every epoch) or ``iteration`` (after every step).
    """

    name: Optional[str] = None
    step_on: str = "epoch"
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SolverConfig:
    """The optimizer: a solver-registry name or a ``torch.optim`` class name."""

    name: str = "Adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    params: Dict[str, Any] = field(default_factory=dict)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class TrainerConfig:
    """The training engine.

    ``step`` and ``loss`` name entries of the function registry (``step_params``
    are extra keyword arguments of the step factory); ``engine`` an entry of the
    engine registry. ``epoch_length`` caps iterations per epoch
    (``None``: one pass over the data). ``grad_clip_norm`` clips the global L2
    norm of the gradients. ``custom_events`` are dotted paths to
    ``ignite.engine.EventEnum`` classes registered on the trainer.

    ``precision``: ``32``, ``bf16-mixed`` or ``16-mixed`` (CUDA only), see
    :mod:`igniter.precision`. ``accumulate_grad_batches``: micro-batches per optimizer
    step (``data.loader.batch_size`` stays the global batch of one step). ``compile``:
    ``false``, ``true`` or ``{mode, backend, fullgraph, dynamic, options}`` for
    ``torch.compile`` (:mod:`igniter.compile`). ``activation_checkpointing``: class names
    (``GPT2Block``) or dotted paths of the submodules whose activations are recomputed in the
    backward pass instead of kept (PyTorch's non-reentrant checkpoint; less memory, one more
    forward of those modules per step); empty: none
    (:func:`igniter.parallel.strategy.checkpoint_activations`).
    """

    engine: str = "supervised_trainer"
    step: str = "supervised"
    step_params: Dict[str, Any] = field(default_factory=dict)
    loss: str = "cross_entropy"
    max_epochs: int = 10
    epoch_length: Optional[int] = None
    grad_clip_norm: Optional[float] = None
    seed: int = 0
    deterministic: bool = False
    custom_events: List[str] = field(default_factory=list)
    precision: str = "32"
    accumulate_grad_batches: int = 1
    compile: Any = False
    activation_checkpointing: List[str] = field(default_factory=list)


@dataclass
class EvaluationConfig:
    """Validation: run every ``every`` epochs with ``metrics`` (function registry).

    ``monitor``/``mode`` pick the metric for best checkpoints and early
    stopping (``patience`` evaluations without improvement; ``None`` = off).
    """

    engine: str = "supervised_evaluator"
    step: str = "supervised_eval"
    every: int = 1
    metrics: List[str] = field(default_factory=lambda: ["accuracy", "loss"])
    monitor: Optional[str] = "accuracy"
    mode: str = "max"
    patience: Optional[int] = None


@dataclass
class HandlerConfig:
    """An event handler from the event-handler registry attached to an engine event.

    ``event`` uses Ignite's names and filters, combined with ``|`` (either event)
    and ``&`` (filters of one event that must all pass; binds tighter than ``|``),
    with parentheses for grouping, e.g.
    ``"ITERATION_COMPLETED(every=10) | EPOCH_COMPLETED(once=2)"`` or
    ``"EPOCH_COMPLETED(every=2) & EPOCH_COMPLETED(after=3)"`` (epochs 4, 6, 8, ...);
    see :mod:`igniter.events`. Names of the trainer's ``custom_events`` are
    accepted too. ``engine``: ``trainer`` or ``evaluator``.
    """

    name: str = MISSING
    event: str = "EPOCH_COMPLETED"
    engine: str = "trainer"
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    """Checkpoints (model, optimizer, scheduler, trainer state) written by an io-registry saver.

    Saved every ``every_epochs`` epochs, but at most once every ``min_interval_seconds``
    (default 60 s: a run of short epochs does not spend its time writing checkpoints; ``0``:
    every epoch), and also every ``every_iterations`` iterations and/or once ``every_seconds``
    seconds have passed since the last save (checked every 10 iterations), when set; always
    at the end of training and on a requeue signal. Rank 0's clock decides. The last
    ``n_saved`` are kept, plus the ``n_best`` best by ``evaluation.monitor``.
    Files are written atomically and an old file is deleted only after its
    successor is complete. ``format``: ``torch`` (one file, rank 0 writes) or ``dcp``
    (a ``torch.distributed.checkpoint`` directory every rank writes its shards to); ``None``:
    ``torch`` with ``runner.strategy=ddp``, ``dcp`` with ``fsdp``. ``async_save`` (``dcp``):
    training waits only for the copy to host memory.

    ``dir``: where checkpoints go, ``<output_dir>/checkpoints`` when ``None``; a local path
    or an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``file://...``): objects plus a
    manifest written last (:mod:`igniter.checkpoint.object_store`), credentials from the environment.
    """

    enabled: bool = True
    dir: Optional[str] = None
    saver: str = "disk"
    every_epochs: int = 1
    min_interval_seconds: float = 60.0
    every_iterations: Optional[int] = None
    every_seconds: Optional[float] = None
    n_saved: int = 2
    n_best: int = 1
    format: Optional[str] = None
    async_save: bool = False


@dataclass
class TorchProfilerConfig:
    """The keys of ``logging.torch_profiler`` and their defaults (:mod:`igniter.profiling`).

    A ``torch.profiler.schedule(wait, warmup, active, repeat)`` counted in training iterations:
    ``wait`` iterations not profiled, ``warmup`` profiled and discarded, ``active`` recorded (one
    trace file per cycle), the cycle run ``repeat`` times (``0``: until training ends). ``ranks``:
    the ranks that profile (each writes its own files). Traces go to ``<run dir>/profiler`` as
    ``rank<N>.<time>.pt.trace.json`` (TensorBoard's profiler plugin and Perfetto read them).
    """

    wait: int = 1
    warmup: int = 1
    active: int = 3
    repeat: int = 1
    ranks: List[int] = field(default_factory=lambda: [0])


@dataclass
class LoggingConfig:
    """Console, file and experiment logging.

    ``progress_bar``: ``None`` shows it only when stdout is a terminal.
    ``log_every``: iterations between training-loss log lines and TensorBoard
    scalars (and training-loss points for ``curves.png``). ``loggers``:
    io-registry names (``tensorboard``). ``profile``: use Ignite's
    ``HandlersTimeProfiler`` (the time of every handler, logged as a table at the
    end; several us per handler call) instead of the cheap timer that splits the
    summary's time into data / step / handlers. ``gpu_telemetry_every``: iterations between NVML samples (``null``
    turns telemetry off; it is off by itself without an NVIDIA driver).
    ``peak_tflops``: the peak TFLOP/s of one process's device that MFU is measured against, instead
    of the table of GPU peaks (:data:`igniter.flops.PEAK_TFLOPS`); on CPU MFU is reported only
    with it. ``torch_profiler``: ``null`` (off, the default), ``true`` (on, the defaults of
    :class:`TorchProfilerConfig`) or a mapping of some of its keys (``{active: 5, ranks: [0, 1]}``);
    checked by :func:`igniter.profiling.profiler_problems`.
    """

    level: str = "INFO"
    progress_bar: Optional[bool] = None
    log_every: int = 50
    loggers: List[str] = field(default_factory=lambda: ["tensorboard"])
    profile: bool = False
    gpu_telemetry_every: Optional[int] = 50
    peak_tflops: Optional[float] = None
    torch_profiler: Any = None


@dataclass
class FsdpConfig:
    """FSDP2 options (``runner.strategy=fsdp``, :mod:`igniter.parallel.strategy`).

    ``shard_modules``: class names (``Linear``) or dotted paths (``my_project.Block``) of the
    submodules sharded as units; empty: every child of the root module with at least
    ``min_params`` parameters. ``reshard_after_forward``: free the gathered parameters after
    the forward pass (less memory, one more all-gather in the backward pass).
    ``cpu_offload``: keep parameters, gradients and optimizer state in host memory.
    ``replicate``: replica groups (HSDP: a 2-D ``DeviceMesh`` of ``replicate`` x ``world size /
    replicate``; parameters sharded within a group, gradients all-reduced across groups); 1: every
    process shards (FSDP); ``None``: the number of nodes (shard within a node, replicate across
    nodes; 1 on one node).
    """

    shard_modules: List[str] = field(default_factory=list)
    min_params: int = 100_000
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    replicate: Optional[int] = None


@dataclass
class RunnerConfig:
    """How processes are launched and joined (see :mod:`igniter.launch`).

    ``backend``: ``gloo``, ``nccl`` or ``None`` (nccl when CUDA is available,
    gloo otherwise). ``timeout_s``: collective-operation timeout in seconds.
    ``bucket_cap_mb`` (MB, ``None``: PyTorch's 25) and ``gradient_as_bucket_view``
    are passed to ``DistributedDataParallel``: smaller buckets start all-reducing
    earlier in the backward pass; bucket views save a gradient copy per step.
    ``strategy``: ``ddp`` (a full copy of the model per process) or ``fsdp`` (FSDP2: parameters,
    gradients and optimizer state sharded over the processes; options in ``fsdp``).
    ``threads_per_process``: PyTorch intra-op threads of each process; ``None``:
    ``OMP_NUM_THREADS`` if the user set it, else usable cores / processes on the node
    (see :mod:`igniter.launch.cpu_threads`).
    ``malloc_trim_threshold_mb``: MiB of freed heap each process keeps for reuse instead of
    returning it to the OS (glibc's ``M_TRIM_THRESHOLD``; blocks up to 32 MiB then come from
    the heap); ``None``: glibc's adaptive thresholds, which can make every iteration page-fault
    its activations in again (see :mod:`igniter.launch.cpu_heap`).
    ``hang_timeout_s``: seconds without progress on every rank after which the job is hung: the
    watchdog names the rank behind, writes the stacks to the rank logs and ends the job (exit
    status 4); ``None``: no watchdog (:mod:`igniter.supervision.watchdog`). ``requeue_on_hang``:
    inside a SLURM job, requeue it on a hang instead (it resumes from the newest checkpoint).
    ``straggler_factor``: a rank whose own time per step (its step less its wait for the others)
    stays above this many times the median of the ranks over ``straggler_window`` iterations is
    named in the log, TensorBoard and the summary, with whether it waits for data or computes
    (:mod:`igniter.supervision.stragglers`); ``None``: off.
    """

    name: str = "single"
    backend: Optional[str] = None
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: Optional[int] = None
    timeout_s: float = 600.0
    bucket_cap_mb: Optional[float] = None
    gradient_as_bucket_view: bool = True
    threads_per_process: Optional[int] = None
    malloc_trim_threshold_mb: Optional[float] = 1024.0
    hang_timeout_s: Optional[float] = 120.0
    requeue_on_hang: bool = False
    straggler_factor: Optional[float] = 1.2
    straggler_window: int = 50
    strategy: str = "ddp"
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)


@dataclass
class IgniterConfig:
    """The whole run. ``imports`` are modules imported before building (user registries);
    ``output_dir`` is the run directory (Hydra's ``hydra.run.dir`` follows it).

    ``resume``: ``auto`` continues from the newest valid checkpoint in
    ``<output_dir>/checkpoints`` if there is one (re-run the same command with
    the same ``output_dir``); a path continues from that file; ``false`` starts over.
    """

    imports: List[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    handlers: List[HandlerConfig] = field(default_factory=list)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    output_dir: str = "outputs"
    resume: Optional[str] = "auto"


def register_schema() -> None:
    """Store the schema as ``igniter_schema`` (the base of ``configs/config.yaml``)."""
    ConfigStore.instance().store(name="igniter_schema", node=IgniterConfig)
