import importlib
import pathlib
import sys

from depio import BuildMode, Pipeline, SequentialExecutor, Task

BLD = pathlib.Path("build")
BLD.mkdir(exist_ok=True)
(BLD / "raw.csv").write_text("3,1,2\n")
sys.path.insert(0, str(BLD))
sys.dont_write_bytecode = True       # the module is edited below: always compile what is on disk

# your own module with the two steps (written here so that the demo can edit it)
STEPS = '''from pathlib import Path
from typing import Annotated

from depio import Dependency, Product


def clean(raw: Annotated[Path, Dependency], out: Annotated[Path, Product]):
    out.write_text(",".join(sorted(raw.read_text().strip().split(","))))


def total(data: Annotated[Path, Dependency], out: Annotated[Path, Product]):
    out.write_text(str(sum(int(x) for x in data.read_text().split(","))))
'''


def run(steps_source: str, what: str) -> int:
    print(f"--- {what}")
    (BLD / "rerun_steps.py").write_text(steps_source)
    importlib.invalidate_caches()
    steps = importlib.reload(sys.modules["rerun_steps"]) if "rerun_steps" in sys.modules \
        else importlib.import_module("rerun_steps")
    pipeline = Pipeline(SequentialExecutor())
    pipeline.add_task(Task("clean", steps.clean, [BLD / "raw.csv", BLD / "clean.csv"],
                           buildmode=BuildMode.IF_CHANGED))
    pipeline.add_task(Task("total", steps.total, [BLD / "clean.csv", BLD / "total.txt"],
                           buildmode=BuildMode.IF_CHANGED))
    for task, why in pipeline.explain():          # what the dry run says, before running
        print(f"{task.name}: {why or 'up to date'}")
    return pipeline.run()


run(STEPS, "first run (or whatever changed since the last one)")
# a comment and new formatting: the compiled code is the same, nothing reruns
run(STEPS.replace("def clean(", "# sort the values\ndef clean(\n    ").replace(
    '.split(","))))', '.split(",")\n    )))'), "comments and formatting edited")
# a real edit of `total`: it reruns, `clean` does not
exit(run(STEPS.replace("str(sum(", "str(max("), "total edited"))
