"""One run of a pipeline, from the main thread's side: the view, the task logs, the state recorder,
the scheduler actor and the loop that waits for it.

The main thread never writes a task's state (the scheduler actor alone does); it reads the changes
from the scheduler's feed, shows them, writes the logs, and turns what goes wrong on its side (an
interrupt, a key, a failure of the loop, the view or the scheduler) into the run's outcome.
"""
from __future__ import annotations

import gc
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from typing import Iterator, List, Optional

import pykka

from ..TaskStatus import SUCCESSFUL_TERMINAL_STATES
from ..state.recorder import Recorder
from ..state.tasks import TaskState
from ..view.display import Display, KeyReader, isatty
from ..view.logs import LogWriter, RunLogs
from .backends import InlineBackend
from .graph import Graph
from .scheduler import Cancel, Limits, Pause, SchedulerActor, Start
from .transitions import ChangeFeed


class PipelineRun:
    """The parts of one `Pipeline.run()` and their order of start and stop."""

    def __init__(self, pipeline, graph: Graph, executor, state: Optional[TaskState]) -> None:
        self.pipeline, self.graph, self.executor, self.state = pipeline, graph, executor, state
        self.tasks = pipeline.tasks
        self.errors: List[str] = []      # what failed the run itself: the scheduler's crash, this loop's
        self.interrupted = False
        self.quit_by_key = False

    def run(self) -> int:
        """0 when every task ended FINISHED or SKIPPED and nothing failed the run; 1 otherwise."""
        p, tasks = self.pipeline, self.tasks
        backend = self.executor.make_backend() if tasks else None
        inline = isinstance(backend, InlineBackend)   # tasks print to this terminal; pdb needs stdin
        live = isatty(sys.stdout) and not inline and not p.quiet
        feed = ChangeFeed()
        display = Display(tasks, quiet=p.quiet, clear_screen=p.clear_screen,
                          hide_successful=p.hide_successful_terminated_tasks, refreshrate=p.refreshrate,
                          name=p.name, live=live, keys=live and isatty(sys.stdin), feed=feed)
        if not tasks:
            display.final(0)
            return 0
        logs = RunLogs()
        logs.open()
        display.log_folder = logs.folder
        writer = LogWriter(logs, tasks, display.board)
        recorder = Recorder.start(self.state, tasks, logs.folder, may_make=p._may_make())
        done = threading.Event()
        ex = self.executor
        limits = Limits(ex.max_jobs_queued, ex.max_jobs_pending, ex.retries_on_worker_loss)
        scheduler = SchedulerActor.start(self.graph, backend, done, limits, feed=feed, crash=self.errors)
        backend.bind(scheduler, self.graph)
        self.display, self.scheduler = display, scheduler
        keys = KeyReader(self._on_key) if display.keys else None
        previous = _install_sigterm()
        try:
            if keys is not None and not keys.start():
                display.keys, keys = False, None
            _notices(backend, display)      # e.g. said while the backend was made
            display.start()
            scheduler.tell(Start())
            while not backend.wait(done, p.refreshrate):
                if not scheduler.is_alive():
                    break
                if not self.quit_by_key:
                    display.note = backend.note      # e.g. a pool that has no worker yet
                _notices(backend, display)
                display.refresh()
                writer.poll()
        except KeyboardInterrupt:
            self.interrupted = True
            display.close()
            if not p.quiet:
                print("\nInterrupted: cancelling the run ...", file=sys.stderr, flush=True)
            _tell(scheduler, Cancel("interrupted (Ctrl-C / SIGTERM)"))
            done.wait(10)
        except Exception as e:
            self.errors.append(f"the pipeline's loop failed:\n{traceback.format_exc()}")
            _tell(scheduler, Cancel(f"the pipeline's loop failed: {type(e).__name__}: {e}"))
            done.wait(10)
        finally:
            if keys is not None:
                keys.stop()
                self.errors += keys.errors
            display.close()
            self._end(done)
            if recorder is not None:
                recorder.finish()      # its last batch is written while the workers stop
            backend.close()
            _restore_sigterm(previous)
        _notices(backend, display)          # said while the run ended (they go into the summary)
        display.board.update()
        writer.poll(final=True)
        writer.write_errors(self.errors + display.errors)
        if recorder is not None:
            recorder.close()
        ok = all(t._status in SUCCESSFUL_TERMINAL_STATES for t in tasks) and not self.interrupted \
            and not self.quit_by_key and not self.errors and not display.errors
        code = 0 if ok else 1
        display.final(code, self.errors)
        return code

    def _on_key(self, ch: str) -> None:
        """upstream's keys: p pauses (no new submissions), r resumes, q cancels the run."""
        display, scheduler = self.display, self.scheduler
        ch = ch.lower()
        if ch == "p" and not display.paused:
            scheduler.tell(Pause(True))
            display.paused = True
        elif ch == "r" and display.paused:
            scheduler.tell(Pause(False))
            display.paused = False
        elif ch == "q" and not self.quit_by_key:
            self.quit_by_key = True
            display.note = "quitting: cancelling the run ..."
            scheduler.tell(Cancel("quit by the user (key q)"))
        else:
            return
        display.refresh()

    def _end(self, done: threading.Event) -> None:
        """Stop the scheduler. A task it has not ended yet (the run stopped early) it cancels first,
        as the only writer of task states; one it could not reach is reported."""
        scheduler, errors = self.scheduler, self.errors
        if scheduler.is_alive() and not done.is_set():
            try:
                scheduler.ask(Cancel("the run ended before this task"), timeout=10)
            except Exception as e:
                errors.append(f"the scheduler did not answer at the end of the run: {type(e).__name__}: {e}")
        try:
            scheduler.stop(timeout=10)
        except Exception as e:
            errors.append(f"the scheduler did not stop: {type(e).__name__}: {e}")
        left = sum(1 for t in self.tasks if not t.is_in_terminal_state)
        if left:
            errors.append(f"{left} task(s) never ended: the scheduler stopped before it could end them")


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the cyclic garbage collector off the objects that exist when a run starts (the user's
    tasks among them) until it ends: a full collection walks every one of them, about 0.3 s per
    100,000 tasks, several times a run. Left alone when someone else froze the heap already."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _notices(backend, display: Display) -> None:
    """The backend's notices (`Backend.notice`) into the view, which keeps them."""
    for line in backend.take_notices():
        display.notice(line)


def _tell(actor, msg) -> None:
    """Tell the scheduler, if it still runs (if not, its crash already ended every task)."""
    try:
        actor.tell(msg)
    except pykka.ActorDeadError:
        pass


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _install_sigterm():
    """SIGTERM stops a run like Ctrl-C does (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
