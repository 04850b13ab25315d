"""The README's "How to use with Slurm" example, runnable: one Slurm job per task.

The executor keeps upstream's defaults, partition "gpu" included; on a cluster without such a
partition (the local test cluster of scripts/local-slurm.sh, most clusters) the jobs go to the
cluster's default partition, and depio says so in one line. Set SBATCH_RESERVATION /
SBATCH_PARTITION as you would for sbatch (or pass parameters={"slurm_partition": ...} to
SubmitItExecutor). Where the jobs connect back to: $DEPIO_ADDRESS (default: this host's outward
interface); no key set-up is needed (a fresh one per run reaches the jobs in a mode-600 file).
"""
import os  # noqa: F401  (for the SBATCH_RESERVATION line below)
import pathlib
import time
from typing import Annotated

import submitit  # noqa: F401  (as in the README)

from depio.Executors import SubmitItExecutor
from depio.Pipeline import Pipeline
from depio.Task import Dependency, Product
from depio.decorators import task

BLD = pathlib.Path("build")
BLD.mkdir(exist_ok=True)

SLURM = pathlib.Path("slurm")
SLURM.mkdir(exist_ok=True)

# Configure the slurm pipeline
# os.environ["SBATCH_RESERVATION"] = "<your reservation>"
defaultpipeline = Pipeline(depioExecutor=SubmitItExecutor())

print("Touching an initial file")
(BLD / "input.txt").touch()


@task("datapipeline")
def slowfunction(output: Annotated[pathlib.Path, Product],
                 input: Annotated[pathlib.Path, Dependency] = None,
                 sec: int = 0
                 ):
    print(f"A function that is reading from {input} and writing to {output} in {sec} seconds.")
    time.sleep(sec)
    with open(output, 'w') as f:
        f.write("Hallo from depio")


defaultpipeline.add_task(slowfunction(BLD / "output1.txt", input=BLD / "input.txt", sec=2))
defaultpipeline.add_task(slowfunction(BLD / "final1.txt", BLD / "output1.txt", sec=1))

exit(defaultpipeline.run())
