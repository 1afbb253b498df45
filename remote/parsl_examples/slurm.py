"""Retraining on a Slurm cluster: one GPU node per block, workers in the project's env.

Use: ``{"executor": "parsl", "remote": {"parsl_config_file": "/path/to/slurm.py"}}``.
The edge host must reach the cluster's login node (the interchange runs here and workers
connect back: open ``worker_port_range`` or run the service on the login node), and the
nodes must see the scans (shared filesystem, or ``remote.staging = "globus"``).
"""

from parsl.addresses import address_by_hostname
from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.launchers import SrunLauncher
from parsl.providers import SlurmProvider

config = Config(
    executors=[
        HighThroughputExecutor(
            label="edgeloop",
            address=address_by_hostname(),
            max_workers_per_node=1,  # one training per node; it uses the node's GPU
            available_accelerators=1,
            provider=SlurmProvider(
                partition="gpu",  # your GPU partition
                account="my-allocation",  # your allocation
                nodes_per_block=1,
                init_blocks=0,
                min_blocks=0,
                max_blocks=1,
                walltime="01:00:00",
                scheduler_options="#SBATCH --gpus-per-node=1",
                worker_init="source /path/to/edgeloop/.venv/bin/activate",
                launcher=SrunLauncher(),
            ),
        )
    ],
)
