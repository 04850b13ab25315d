"""How many tasks the worker asks its dispatcher for (credit-based flow), and how deep it fills a slot.

The worker grants the dispatcher credits for as many tasks as it wants to hold: its slots, plus a
prefetch that grows for short tasks and shrinks to zero for long ones, so short tasks stream and
long ones are not hoarded. Both follow a moving average of the tasks' run times.
"""
from __future__ import annotations


class Credits:
    """Credits open with the dispatcher and the task-length average that sizes them."""

    __slots__ = ("nslots", "avg_duration", "samples", "open")

    def __init__(self, nslots: int) -> None:
        self.nslots = nslots
        self.avg_duration = 0.5      # seconds, moving average (unknown yet: long enough for no prefetch)
        self.samples = 0
        self.open = 0                # tasks the dispatcher may still send without asking

    def capacity(self) -> int:
        """Tasks this worker wants to hold: its slots, plus a prefetch that only short tasks get."""
        d = self.avg_duration
        prefetch = 0 if d > 0.2 else 1 if d > 0.01 else 8 if d > 0.001 else 64
        return self.nslots * (1 + prefetch)

    def depth(self) -> int:
        """Tasks a slot is handed ahead: one at a time for long tasks, up to 16 for short ones."""
        d = self.avg_duration
        return 1 if d > 0.01 else 4 if d > 0.001 else 16

    def record(self, seconds: float) -> None:
        """A task ran this long."""
        self.samples += 1
        alpha = max(0.2, 1.0 / self.samples)      # the first results count fully: adapt at once
        self.avg_duration += alpha * (seconds - self.avg_duration)

    def received(self, n: int) -> None:
        """The dispatcher sent `n` tasks against credits."""
        self.open = max(0, self.open - n)

    def want(self, capacity: int, held: int) -> int:
        """Credits to grant now: in chunks (a quarter of the capacity, or whatever brings an idle worker
        work), so that short tasks travel in batches."""
        want = capacity - held - self.open
        if want < max(1, capacity // 4) and (held or self.open):
            return 0
        return max(0, want)
