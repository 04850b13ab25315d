"""When a task runs (make's rules, chosen per task)."""
from enum import Enum


class BuildMode(Enum):
    """`IF_MISSING` (default): run when a product is missing, or always when the task declares none.
    `ALWAYS`: always run. `NEVER`: never run (SKIPPED).
    `IF_NEW`: run when a product is missing or any upstream task ran in this run."""

    NEVER = 0
    IF_MISSING = 1
    ALWAYS = 2
    IF_NEW = 3
