"""Whether a task runs or is skipped, and why: one decision for runs, dry runs and `explain()`.

`build_reason` holds the build-mode rules (`Task.run_reason` is it, as a method); `decide` turns
its answer into the reason text every caller shows, so the texts live here (and, for what the
state store tells, in `depio.state.records.Decision`) only.

The modes that read the state store (IF_CHANGED, IF_CODE_CHANGED, `track_code`) find it on the
task (`task._state`, set by the pipeline for a run, a dry run or `accept`); without it (the store
is off, or a task decided outside a run) they decide as IF_MISSING.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from ..BuildMode import BuildMode

UPSTREAM_RAN = "an upstream task ran"
UPSTREAM_WOULD_RUN = "an upstream task would run"
UPSTREAM_MAY_CHANGE = "an upstream task would run (this reruns unless it writes the same bytes)"

NEVER, ALWAYS, IF_MISSING, IF_NEW = BuildMode.NEVER, BuildMode.ALWAYS, BuildMode.IF_MISSING, BuildMode.IF_NEW
IF_CHANGED, IF_CODE_CHANGED = BuildMode.IF_CHANGED, BuildMode.IF_CODE_CHANGED
IF_OLDER, IF_OLD = BuildMode.IF_OLDER, BuildMode.IF_OLD
# the fork's modes also run when an upstream task ran (its rule for every mode; kept for these three only:
# IF_MISSING keeps 0.1.x's meaning, NEVER never runs, IF_CHANGED looks at what the upstream task wrote)
PROPAGATING = (IF_OLDER, IF_OLD, IF_CODE_CHANGED)
NO_PRODUCTS = "declares no products"
UP_TO_DATE = "up to date"


class Decision(NamedTuple):
    run: bool
    reason: str                  # why it runs, why it is skipped, or why no decision was possible
    error: bool = False          # the build mode could not be judged (e.g. a product cannot be stat'ed)


def _upstream_ran(task, upstream_ran: Optional[bool]) -> bool:
    if upstream_ran is None:
        deps = task.task_dependencies
        upstream_ran = bool(deps) and any(t.should_run() for t in deps)
    return upstream_ran


def _code_reason(task) -> Optional[str]:
    state = task._state
    return state.why_code_changed(task) if state is not None else None


def build_reason(task, upstream_ran: Optional[bool] = None) -> Optional[str]:
    """Why the task must run (None: it is skipped). `upstream_ran` is known to the scheduler during
    a run; before a run it is estimated from the upstream tasks' own build modes."""
    mode = task.buildmode
    if mode is NEVER:
        return None
    if mode is ALWAYS:
        return "build mode ALWAYS"
    products = task.products
    if mode is IF_CHANGED and products and task._state is not None:
        return task._state.check_changed(task)       # missing products too, with one stat a file
    missing = task.missing_products()
    if missing:
        return f"product missing: {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
    if mode is IF_MISSING:
        reason = None if products else NO_PRODUCTS
    elif mode is IF_NEW:
        reason = UPSTREAM_RAN if _upstream_ran(task, upstream_ran) else None
    elif mode is IF_CHANGED:
        state = task._state
        reason = NO_PRODUCTS if not products else state.why_changed(task) if state is not None else None
    elif mode is IF_CODE_CHANGED:
        reason = _code_reason(task)
        if reason is None and not products and task._state is None:
            reason = NO_PRODUCTS
    elif mode is IF_OLDER or mode is IF_OLD:
        from ..state.records import Decision as _Why
        from ..state.tasks import inputs_of
        if not products:
            reason = NO_PRODUCTS
        elif mode is IF_OLDER:
            reason = _Why.why_older(products, inputs_of(task))
        elif task.max_age is None:
            raise ValueError("build mode IF_OLD needs max_age (seconds)")
        else:
            reason = _Why.why_old(products, task.max_age)
    else:
        raise ValueError(f"Task {task.label}: unknown build mode {mode!r}")
    if reason is None and task.track_code and mode is not IF_CODE_CHANGED:
        reason = _code_reason(task)
    if reason is None and mode in PROPAGATING and _upstream_ran(task, upstream_ran):
        reason = UPSTREAM_RAN
    return reason


def skip_reason(task) -> str:
    return UP_TO_DATE if task.products and task.buildmode is not BuildMode.NEVER else \
        f"build mode {task.buildmode.name}"


def decide(task, upstream_ran: bool, planning: bool = False) -> Decision:
    """Run or skip `task`, given whether an upstream task ran (or, `planning` a dry run, would run)."""
    try:
        reason = task.run_reason(upstream_ran)
    except Exception as e:
        return Decision(False, f"cannot decide whether to run: {e}", True)
    if reason is None:
        if planning and upstream_ran and task.buildmode is IF_CHANGED:
            return Decision(True, UPSTREAM_MAY_CHANGE)    # what it writes is not known before it runs
        why = skip_reason(task)
        return _SKIP_BECAUSE.get(why) or Decision(False, why)
    if planning and reason == UPSTREAM_RAN:
        reason = UPSTREAM_WOULD_RUN
    return _RUN_BECAUSE.get(reason) or Decision(True, reason)


# the reasons shared by many tasks, decided once each (a run decides every task, one by one)
_RUN_BECAUSE = {r: Decision(True, r) for r in (NO_PRODUCTS, UPSTREAM_RAN, UPSTREAM_WOULD_RUN, "build mode ALWAYS")}
_SKIP_BECAUSE = {UP_TO_DATE: Decision(False, UP_TO_DATE)}
