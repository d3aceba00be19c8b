"""Launch modes (runners) and data sharding; everything that knows about the process group."""

from igniter.distributed.runners import Runner, default_backend, make_runner  # noqa: F401
from igniter.distributed.sampler import ShardedSampler  # noqa: F401
from igniter.distributed import slurm_runner, torchrun_runner  # noqa: F401,E402  (register the slurm and torchrun runners)
