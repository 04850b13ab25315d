"""Whether a task runs or is skipped, and why: one decision for runs, dry runs and `explain()`.

`build_reason` holds the build-mode rules (`Task.run_reason` is it, as a method); `decide` turns
its answer into the reason text every caller shows, so the texts live here only.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from ..BuildMode import BuildMode

UPSTREAM_RAN = "an upstream task ran"
UPSTREAM_WOULD_RUN = "an upstream task would run"


class Decision(NamedTuple):
    run: bool
    reason: str                  # why it runs, why it is skipped, or why no decision was possible
    error: bool = False          # the build mode could not be judged (e.g. a product cannot be stat'ed)


def build_reason(task, upstream_ran: Optional[bool] = None) -> Optional[str]:
    """Why the task must run (None: it is skipped). `upstream_ran` is known to the scheduler during
    a run; before a run it is estimated from the upstream tasks' own build modes."""
    mode = task.buildmode
    if mode == BuildMode.NEVER:
        return None
    if mode == BuildMode.ALWAYS:
        return "build mode ALWAYS"
    missing = task.missing_products()
    if missing:
        return f"product missing: {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
    if mode == BuildMode.IF_MISSING:
        return None if task.products else "declares no products"
    if mode == BuildMode.IF_NEW:
        if upstream_ran is None:
            deps = task.task_dependencies
            upstream_ran = bool(deps) and any(t.should_run() for t in deps)
        return UPSTREAM_RAN if upstream_ran else None
    raise ValueError(f"Task {task.label}: unknown build mode {mode!r}")


def skip_reason(task) -> str:
    return "up to date" if task.products and task.buildmode is not BuildMode.NEVER else \
        f"build mode {task.buildmode.name}"


def decide(task, upstream_ran: bool, planning: bool = False) -> Decision:
    """Run or skip `task`, given whether an upstream task ran (or, `planning` a dry run, would run)."""
    try:
        reason = task.run_reason(upstream_ran)
    except Exception as e:
        return Decision(False, f"cannot decide whether to run: {e}", True)
    if reason is None:
        return Decision(False, skip_reason(task))
    if planning and reason == UPSTREAM_RAN:
        reason = UPSTREAM_WOULD_RUN
    return Decision(True, reason)
