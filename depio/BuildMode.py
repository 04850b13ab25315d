"""When a task runs (make's rules, chosen per task)."""
from enum import Enum


class BuildMode(Enum):
    """`IF_MISSING` (default): run when a product is missing, or always when the task declares none.
    `ALWAYS`: always run. `NEVER`: never run (SKIPPED).
    `IF_NEW`: run when a product is missing or any upstream task ran in this run.
    `IF_OLDER`: also when a product is older than an input file (make's rule).
    `IF_OLD`: also when a product is older than the task's `max_age` seconds.
    `IF_CODE_CHANGED`: also when the task's code changed since depio last made its products.
    `IF_CHANGED`: also when its code, a dependency's content or an argument changed since depio last
    made its products, or depio has no record of making them (see the README's "Rerun what changed").
    IF_CODE_CHANGED and IF_CHANGED read the state store (`.depio/state.sqlite`); with it off
    (`DEPIO_STATE=off`) they decide as IF_MISSING."""

    NEVER = 0
    IF_MISSING = 1
    ALWAYS = 2
    IF_NEW = 3
    IF_OLDER = 4
    IF_OLD = 5
    IF_CODE_CHANGED = 6
    IF_CHANGED = 7
