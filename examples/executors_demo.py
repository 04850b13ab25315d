import os
import time

from depio.Executors import ParallelExecutor, SequentialExecutor
from depio.Pipeline import Pipeline
from depio.Task import Task


def work(i: int):
    time.sleep(0.2)
    print(f"task {i} ran in process {os.getpid()}")


if os.environ.get("DEBUG"):
    # one task at a time, in this process: breakpoint() and pdb work
    executor = SequentialExecutor()
else:
    # 2 local worker processes with 2 slots each: 4 tasks at once,
    # at most 8 tasks handed out (queued or running) at any time
    executor = ParallelExecutor(workers=2, slots_per_worker=2, max_jobs_queued=8)

pipeline = Pipeline(depioExecutor=executor)
for i in range(8):
    pipeline.add_task(Task(f"work{i}", work, [i]))

exit(pipeline.run())
