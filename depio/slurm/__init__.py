"""Slurm through submitit: per-task jobs (`SubmitItExecutor`, upstream's mode) and pilot workers
(`SlurmPilotExecutor`).

Both modes run the worker inside Slurm jobs: the job's function (`job`) starts
`python -m worker.slurm_job` as a command, so depio never imports the worker package. The jobs connect
back over ZeroMQ to the pipeline (signed with the run's key), so a task's start and end arrive at
once over the socket; Slurm is asked about jobs only when something went wrong (a job's worker left
or fell silent) and, rate limited, about jobs that never showed up. Every question is one batched
`squeue` call (`sacct` only for ids squeue no longer knows, and only if it works): depio needs no
accounting database.

Per-task mode (`SubmitItExecutor`): every ready task becomes one Slurm job (tasks ready at the same
time with the same parameters go out as one job array: one sbatch call). The job runs a one-slot
worker named after its task attempt; a small server in the pipeline (`SlurmTaskBackend`) hands it
exactly that attempt, relays started/done to the scheduler and tells the worker to leave. The
table shows each task's Slurm job id and raw Slurm state.

Pilot mode (`SlurmPilotExecutor`): `workers` long-lived `depio-worker`s run as one Slurm job array
and stream many tasks each from the pipeline's dispatcher (`DispatcherBackend`). They know their
walltime: they stop asking for tasks they cannot finish and leave before the limit; the launcher
submits replacements while work remains, between `min_workers` and `max_workers`.

The address: the dispatcher (or task server) binds `address=` / `$DEPIO_ADDRESS`, else the address of
the interface that routes off this host (what compute nodes reach); every message is signed with a
fresh per-run key, which reaches the jobs through a mode-0600 file in the submitit folder (never on
a command line, in a job's arguments or in the environment).

Ctrl-C, SIGTERM or a failure: `close()` cancels every Slurm job of the run (one `scancel`) and waits
until squeue no longer lists them as pending or running.

The modules: `states` (what a Slurm state means for a task), `query` (batched squeue, sacct,
scancel), `addresses` (where jobs connect back, the key file), `submission` (submitit parameters),
`job` (what a job runs: the worker, as a command), `tasks` (per-task mode), `pilots` (pilot mode, and a pool's pilots).
"""
from .addresses import ADDRESS_ENV, bind_address, default_host, write_key_file
from .job import run_pilot, run_task_job
from .pilots import SlurmPilotBackend, SlurmPilotExecutor, SlurmPilotLauncher, pool_pilots
from .query import QUERY_INTERVAL, SlurmQuery, scancel, wait_gone
from .states import slurm_status
from .submission import DEFAULT_PARAMS, TWO_DAYS_IN_MINUTES, sbatch_parameters
from .tasks import SlurmTaskBackend, SubmitItExecutor

__all__ = ["SubmitItExecutor", "SlurmPilotExecutor", "SlurmTaskBackend", "SlurmPilotBackend", "SlurmPilotLauncher",
           "SlurmQuery", "slurm_status", "bind_address", "default_host", "sbatch_parameters", "run_task_job",
           "run_pilot", "pool_pilots", "DEFAULT_PARAMS", "ADDRESS_ENV", "TWO_DAYS_IN_MINUTES", "QUERY_INTERVAL",
           "scancel", "wait_gone", "write_key_file"]
