"""Retraining on a PBS Pro cluster (e.g. ALCF Polaris): one node per block.

Use: ``{"executor": "parsl", "remote": {"parsl_config_file": "/path/to/pbs.py"}}``; the
same network and data notes as slurm.py apply.
"""

from parsl.addresses import address_by_hostname
from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.launchers import MpiExecLauncher
from parsl.providers import PBSProProvider

config = Config(
    executors=[
        HighThroughputExecutor(
            label="edgeloop",
            # where workers reach the interchange; on a multi-homed login node use
            # parsl.addresses.address_by_interface("<high-speed interface>")
            address=address_by_hostname(),
            max_workers_per_node=1,
            available_accelerators=4,  # GPUs per node; one worker each if raised above
            provider=PBSProProvider(
                account="my-allocation",
                queue="debug",
                cpus_per_node=32,
                select_options="ngpus=4",
                scheduler_options="#PBS -l filesystems=home:eagle",
                nodes_per_block=1,
                init_blocks=0,
                min_blocks=0,
                max_blocks=1,
                walltime="01:00:00",
                worker_init="source /path/to/edgeloop/.venv/bin/activate",
                launcher=MpiExecLauncher(bind_cmd="--cpu-bind", overrides="--depth=32 --ppn 1"),
            ),
        )
    ],
)
