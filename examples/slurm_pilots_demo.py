import os

from depio.Executors import SlurmPilotExecutor, SubmitItExecutor
from depio.Pipeline import Pipeline
from depio.Task import Task


def simulate(seed: int):
    print(f"seed {seed} on {os.uname().nodename}")


if os.environ.get("DEPIO_SLURM_MODE") == "per-task":
    # one Slurm job per task (depio 0.1.x's mode); the job id and state show in the table
    executor = SubmitItExecutor(folder="slurm", parameters={"slurm_time": 10, "slurm_mem": 1})
else:
    # 2 pilot jobs (one job array), each a depio-worker running many tasks, 1 at a time
    executor = SlurmPilotExecutor(workers=2, slots=1, walltime=10, folder="slurm",
                                  parameters={"slurm_mem": 1})

pipeline = Pipeline(depioExecutor=executor)
for seed in range(6):
    pipeline.add_task(Task(f"simulate{seed}", simulate, [seed]))

exit(pipeline.run())
