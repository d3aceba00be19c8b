"""igniter: config-driven PyTorch training on Ignite, from one CPU process to SLURM.

Importing the package registers the built-in components in the registries.
"""

from igniter.registry import (  # noqa: F401
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

# Built-in components: importing them fills the registries.
from igniter import datasets, distributed, engines, functions, handlers, io, models, solver, transforms  # noqa: F401,E402

__version__ = "0.1.0"
