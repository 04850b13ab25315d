import sys

from depio.Executors import ParallelExecutor
from depio.Pipeline import Pipeline
from depio.Task import Task


def chatty(n: int):
    print(f"step {n}: hello on stdout")
    print(f"step {n}: a warning on stderr", file=sys.stderr)


pipeline = Pipeline(depioExecutor=ParallelExecutor(), quiet=True)
tasks = [pipeline.add_task(Task(f"chatty{n}", chatty, [n])) for n in range(3)]
code = pipeline.run()

for t in tasks:
    # the text is kept on the task, and written to .depio/logs/<run>/<id>-<name>.out/.err
    print(t.name, repr(t.get_stdout()), "->", t.stdout_path)
    print(t.name, repr(t.get_stderr()), "->", t.stderr_path)

exit(code)
