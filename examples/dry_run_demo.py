import pathlib
from typing import Annotated

from depio.Executors import ParallelExecutor
from depio.Pipeline import Pipeline
from depio.Task import Dependency, Product
from depio.decorators import task

BLD = pathlib.Path("build")
BLD.mkdir(exist_ok=True)
(BLD / "input.txt").touch()

pipeline = Pipeline(depioExecutor=ParallelExecutor())


@task("step")
def step(output: Annotated[pathlib.Path, Product], input: Annotated[pathlib.Path, Dependency]):
    output.write_text(input.read_text() + "step\n")


pipeline.add_task(step(BLD / "a.txt", BLD / "input.txt"))
pipeline.add_task(step(BLD / "b.txt", BLD / "a.txt"))

# Which tasks would run, and why? Nothing runs, no file is touched, the result is 0.
pipeline.run(dry_run=True)

# The same as a list: (task, reason) with reason None for a task that would be skipped.
for t, reason in pipeline.explain():
    print(t.name, "->", reason or "skip")
