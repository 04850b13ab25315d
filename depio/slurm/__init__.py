"""Slurm through submitit: per-task jobs (`SubmitItExecutor`, upstream's mode) and pilot workers
(`SlurmPilotExecutor`).

Both modes run the worker inside Slurm jobs: the job's function (`job`) starts
`python -m worker.slurm_job` as a command, so depio never imports the worker package. The jobs connect
back over ZeroMQ to the pipeline (signed with the run's key), so a task's start and end arrive at
once over the socket; Slurm is asked about jobs only when something went wrong (a job's worker left
or fell silent) and, rate limited, about jobs that never showed up. Every question is one batched
`squeue` call (`sacct` only for ids squeue no longer knows, and only if it works): depio needs no
accounting database.

Per-task mode (`SubmitItExecutor`): every ready task becomes one Slurm job, served by the same
dispatcher as pilots and local workers (so keys, liveness, resources and limits exist once): the
task is queued there pinned to its job, whose one-slot worker registers with that pin, gets exactly
that task and leaves. Jobs go out paced (`pacing`): tasks that become ready together with the same
parameters are gathered into one job array, at most one sbatch per second; transient sbatch
failures are retried with backoff, arrays are split below the cluster's MaxArraySize. The table
shows each task's Slurm job id and raw Slurm state (sent to the scheduler as `SlurmState`: the
scheduler actor alone writes tasks).

Pilot mode (`SlurmPilotExecutor`): `workers` long-lived `depio-worker`s run as one Slurm job array
and stream many tasks each from the pipeline's dispatcher (`DispatcherBackend`). They know their
walltime: they stop asking for tasks they cannot finish and leave before the limit; the launcher
submits replacements while work remains, between `min_workers` and `max_workers`. Tasks asking for
other resources (GPUs, memory, a partition) get a group of pilots of their own shape.

The address: the dispatcher binds `address=` / `$DEPIO_ADDRESS`, else the address of the interface
that routes off this host (what compute nodes reach); every message is signed with the configured
key (`key_file=`, `$DEPIO_KEY`) or a fresh per-run key, which reaches the jobs through a mode-0600
file in the submitit folder (never on a command line, in a job's arguments or in the environment).

Every job carries its pipeline's mark (`orphans`): a run of the same script in the same folder
cancels the live jobs of an earlier run whose process is gone before it submits, and leaves those
of a run that is still alive alone. The built-in default partition ("gpu", upstream's) falls back
to the cluster's default partition where the cluster has none of that name (`cluster`).

Ctrl-C, SIGTERM or a failure: `close()` cancels every Slurm job of the run (one `scancel`) and waits
until squeue no longer lists them as pending or running.

The modules: `states` (what a Slurm state means for a task), `query` (batched squeue, sacct,
scancel), `addresses` (where jobs connect back, the key file), `submission` (submitit parameters),
`job` (what a job runs: the worker, as a command), `cluster` (partitions, nodes, MaxArraySize), `pacing`
(when to call sbatch), `orphans` (jobs of a killed run), `tasks` and `task_jobs` (per-task mode),
`pilots` and `pilot_launcher` (pilot mode, and a pool's pilots).
"""
from .addresses import ADDRESS_ENV, bind_address, default_host, write_key_file
from .job import run_pilot, run_task_job
from .pilot_launcher import SlurmPilotLauncher
from .pilots import SlurmPilotBackend, SlurmPilotExecutor, pool_pilots
from .query import QUERY_INTERVAL, SlurmQuery, scancel, wait_gone
from .states import slurm_status
from .submission import DEFAULT_PARAMS, TWO_DAYS_IN_MINUTES, sbatch_parameters
from .tasks import SlurmTaskBackend, SubmitItExecutor

__all__ = ["SubmitItExecutor", "SlurmPilotExecutor", "SlurmTaskBackend", "SlurmPilotBackend", "SlurmPilotLauncher",
           "SlurmQuery", "slurm_status", "bind_address", "default_host", "sbatch_parameters", "run_task_job",
           "run_pilot", "pool_pilots", "DEFAULT_PARAMS", "ADDRESS_ENV", "TWO_DAYS_IN_MINUTES", "QUERY_INTERVAL",
           "scancel", "wait_gone", "write_key_file"]
