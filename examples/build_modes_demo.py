import pathlib
from typing import Annotated

from depio.BuildMode import BuildMode
from depio.Executors import ParallelExecutor
from depio.Pipeline import Pipeline
from depio.Task import Dependency, Product, Task

BLD = pathlib.Path("build")
BLD.mkdir(exist_ok=True)
(BLD / "raw.txt").write_text("raw data\n")


def copy(src: Annotated[pathlib.Path, Dependency], dst: Annotated[pathlib.Path, Product]):
    dst.write_text(src.read_text())


def report():
    print("a task without products: runs every time (even under IF_MISSING)")


pipeline = Pipeline(depioExecutor=ParallelExecutor(workers=2))
# IF_MISSING (the default): runs when a product is missing
clean = pipeline.add_task(Task("clean", copy, [BLD / "raw.txt", BLD / "clean.txt"]))
# IF_NEW: also runs when an upstream task ran
pipeline.add_task(Task("features", copy, [BLD / "clean.txt", BLD / "features.txt"], buildmode=BuildMode.IF_NEW))
# ALWAYS: runs every time; NEVER: never runs (SKIPPED), its dependents treat it as done
pipeline.add_task(Task("snapshot", copy, [BLD / "raw.txt", BLD / "snapshot.txt"], buildmode=BuildMode.ALWAYS))
pipeline.add_task(Task("archive", copy, [BLD / "raw.txt", BLD / "archive.txt"], buildmode=BuildMode.NEVER))
pipeline.add_task(Task("report", report, depends_on=[clean]))

exit(pipeline.run())
