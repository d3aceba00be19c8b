"""igniter's Hydra launcher plugin: ``hydra/launcher=slurm`` (configs/hydra/launcher/slurm.yaml).

Hydra instantiates launchers only from the ``hydra_plugins`` namespace, so the class
Hydra names lives here; what it does is :mod:`igniter.cluster.submit`.
"""

try:
    from igniter.cluster.submit import SlurmLauncher as _SlurmLauncher
except ImportError:  # hydra-submitit-launcher not installed (igniter's `slurm` extra): nothing to offer
    _SlurmLauncher = None

if _SlurmLauncher is not None:

    class SlurmLauncher(_SlurmLauncher):
        """:class:`igniter.cluster.submit.SlurmLauncher`, under the name Hydra accepts."""
