"""igniter: config-driven PyTorch training on Ignite, from one CPU process to SLURM.

Importing the package registers every built-in component in the registries
(tests/test_injection.py checks that importing any other igniter module adds no
name), so which names exist does not depend on what else was imported. A user
module's registration replaces a built-in of the same name (see
:mod:`igniter.registry`).
"""

import time as _time

_T0 = (_time.monotonic(), _time.process_time())  # igniter.timing.interpreter_age_s: before any other import

# Built-in components: importing them fills the registries. Every module under igniter/
# with a registry decorator belongs here (telemetry: the gpu_telemetry handler).
from igniter import (  # noqa: F401,E402
    datasets,
    engines,
    handlers,
    launch,  # noqa: F401,E402  (the runners)
    lm,
    models,
    solver,
    steps,
    telemetry,
    token_shards,
    transforms,
)
from igniter.checkpoint import object_store, saver  # noqa: F401,E402  (savers; s3fs etc. imported on use)
from igniter.registry import (  # noqa: E402,F401
    REGISTRIES,
    Registry,
    RegistryError,
    dataset_registry,
    engine_registry,
    event_handler_registry,
    function_registry,
    io_registry,
    model_registry,
    runner_registry,
    solver_registry,
    transforms_registry,
)
from igniter.trackers import mlflow_tracker, tensorboard, wandb_tracker  # noqa: F401,E402  (mlflow/wandb imported on use)

__version__ = "0.1.0"
