"""Resources: what a task asks for, what a worker offers, routing in the dispatcher's assignment
(plain Python), Slurm's pacing rules, and a local run that asks for more GPUs than the machine has."""
from __future__ import annotations

import textwrap

import pytest

from conftest import run_script
from depio.runtime import protocol as P
from depio.runtime.assignment import Assignment, WorkerInfo
from depio.runtime.resources import (DEFAULT, Offer, Resources, fits, pinned_shape, request_of, shape_of,
                                     slurm_offer, split_gpus)
from depio.slurm.orphans import _parse, with_mark
from depio.slurm.pacing import BATCH, MAX_GATHER, Pacer, transient

pytestmark = pytest.mark.timeout(60)

FN = b"f" * 32


class T:
    def __init__(self, slurm=None, resources=None):
        self.slurm_parameters, self.resources = slurm, resources


def test_request_from_slurm_parameters_and_explicit_resources():
    assert request_of(T()) is DEFAULT
    assert request_of(T({"slurm_gpus_per_task": 1})) == Resources(gpus=1)
    assert request_of(T({"slurm_gres": "gpu:a100:2", "slurm_mem": "4G", "slurm_partition": "gpu"})) == \
        Resources(gpus=2, mem_mb=4096, partition="gpu")
    assert request_of(T({"cpus_per_task": 4, "mem_gb": 2, "timeout_min": 30})) == \
        Resources(cpus=4, mem_mb=2048, time_min=30)
    # resources= wins over the Slurm parameters
    assert request_of(T({"slurm_gpus_per_task": 1}, {"gpus": 2, "cpus": 3})) == Resources(cpus=3, gpus=2)
    assert request_of(T(resources={"gpus": 0})) is DEFAULT
    with pytest.raises(ValueError, match="unknown resource"):
        request_of(T(resources={"tpus": 1}))


def test_fits_and_offers():
    gpu = Resources(gpus=1)
    assert fits(DEFAULT, None) and fits(DEFAULT, Offer())
    assert not fits(gpu, None) and not fits(gpu, Offer(cpus=8)) and fits(gpu, Offer(gpus=1))
    assert not fits(Resources(mem_mb=2000), Offer(mem_mb=1000)) and fits(Resources(mem_mb=2000), Offer())
    # partition and constraint bind only workers in Slurm
    assert fits(Resources(partition="gpu"), Offer())
    assert not fits(Resources(partition="gpu"), Offer(partition="cpu"))
    assert fits(Resources(constraint="a100&ib"), Offer(partition="p", features=("a100", "ib")))
    env = {"SLURM_CPUS_PER_TASK": "4", "CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_PARTITION": "debug",
           "SLURM_MEM_PER_NODE": "1000"}
    assert slurm_offer(2, 10, env=env) == Offer(cpus=2, gpus=1, mem_mb=500, time_min=10, partition="debug")
    assert split_gpus(["0", "1", "2", "3"], 2) == [["0", "1"], ["2", "3"]]
    assert split_gpus(["0"], 2) == [["0"], ["0"]] and split_gpus([], 2) == [[], []]


def _setup(offers):
    a = Assignment()
    c = a.add_client(b"c", "c", "h", 1)
    c.functions[FN] = b"code"
    workers = []
    for i, offer in enumerate(offers):
        w = WorkerInfo(f"w{i}".encode(), f"w{i}", "h", i, 1, credits=1, offer=offer)
        a.workers.add(w)
        workers.append(w)
    return a, c, workers


def _jobs(a, w):
    return sorted(a.jobs[j].spec.key for j in w.jobs)


def test_gpu_tasks_go_only_to_gpu_workers_common_ones_anywhere():
    a, c, (cpu, gpu) = _setup([Offer(cpus=4), Offer(cpus=4, gpus=1)])
    g = shape_of(Resources(gpus=1))
    a.queue(c, (P.TaskSpec(0, 1, "train", FN, b"", shape=g), P.TaskSpec(1, 1, "prep", FN, b""),
                P.TaskSpec(2, 1, "train2", FN, b"", shape=g)))
    a.assign()
    assert _jobs(a, gpu) == [0] and _jobs(a, cpu) == [1]
    assert a.routing.waiting() == {g: 1}            # the second GPU task waits for the GPU worker
    a.on_report(cpu, P.WorkerReport(done=((next(iter(cpu.jobs)), P.TaskResult(1, 1, 0, 1)),), credits=1))
    a.assign()
    assert _jobs(a, cpu) == []                      # never to the CPU worker
    a.on_report(gpu, P.WorkerReport(done=((next(iter(gpu.jobs)), P.TaskResult(0, 1, 0, 1)),), credits=1))
    a.assign()
    assert _jobs(a, gpu) == [2] and a.routing.waiting() == {}
    a.cancel(c, None, "over")
    assert not a.jobs


def test_a_pinned_task_goes_only_to_its_job_and_cancel_forgets_it():
    a, c, (other, job) = _setup([Offer(pin="tok-b"), Offer(pin="tok-a")])
    a.queue(c, (P.TaskSpec(0, 1, "t", FN, b"", shape=pinned_shape("tok-a")),
                P.TaskSpec(1, 1, "u", FN, b"", shape=pinned_shape("tok-c"))))
    a.assign()
    assert _jobs(a, job) == [0] and _jobs(a, other) == []
    a.cancel(c, {1}, "no longer needed")
    assert a.routing.pinned == {}


def test_pacing_gathers_while_jobs_wait_and_spaces_sbatch_calls():
    p = Pacer(min_interval=1.0)
    assert p.due(100.0, 1, waiting_in_slurm=0) == pytest.approx(100.3)        # the cluster may idle
    assert p.due(100.0, 1, waiting_in_slurm=5) == pytest.approx(100.0 + MAX_GATHER)
    assert p.due(100.0, BATCH, waiting_in_slurm=5) == pytest.approx(100.0)
    p.sent(ok=True, now=100.0)
    assert p.due(100.0, BATCH, 5) == pytest.approx(101.0)                       # one sbatch per second
    p.sent(ok=False, now=101.0)
    p.sent(ok=False, now=103.0)
    assert p.due(100.0, BATCH, 5) == pytest.approx(107.0)                       # backoff doubles
    assert transient("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation")
    assert transient("sbatch: error: AssocMaxSubmitJobLimit")
    assert transient("error: QOSMaxSubmitJobPerUser")
    assert not transient("sbatch: error: invalid partition specified: gpu")


def test_jobs_are_marked_without_changing_what_the_user_set():
    assert with_mark({}, "depio:h:1:2:x") == {"comment": "depio:h:1:2:x"}
    assert with_mark({"comment": "mine"}, "depio:h:1:2:x") == {"comment": "mine", "job_name": "depio:h:1:2:x"}
    assert with_mark({"comment": "mine", "job_name": "n"}, "m") == {"comment": "mine", "job_name": "n"}
    assert _parse("(null);depio:vm:123:456:abc") == ("vm", 123, "456", "abc")
    assert _parse("something else") is None


def test_a_local_task_asking_for_more_gpus_than_the_machine_has_fails_at_once(workdir):
    script = workdir / "p.py"
    script.write_text(textwrap.dedent("""
        import os, pathlib, sys
        from depio import Pipeline, ParallelExecutor, Task

        def visible(marker):
            pathlib.Path(marker).touch()
            return os.environ.get("CUDA_VISIBLE_DEVICES")

        p = Pipeline(ParallelExecutor(workers=1, slots_per_worker=2), quiet=True)
        ok = p.add_task(Task("gpu_ok", visible, ["ran-ok"], resources={"gpus": 1}))
        cpu = p.add_task(Task("cpu", visible, ["ran-cpu"]))
        # chains across shapes: a follower never rides along onto a worker that does not fit it
        chain = [p.add_task(Task("c0", visible, ["c0"]))]
        for i, res in enumerate([{"gpus": 1}, None, None, {"gpus": 1}], 1):
            chain.append(p.add_task(Task(f"c{i}", visible, [f"c{i}"], resources=res, depends_on=[chain[-1]])))
        code = p.run()
        print("RESULT", ok.status[0].name, ok.result, cpu.result)
        print("CHAIN", [t.status[0].name for t in chain], [t.result for t in chain])
        p2 = Pipeline(ParallelExecutor(workers=1), quiet=True)
        big = p2.add_task(Task("greedy", visible, ["ran-big"], resources={"gpus": 3}))
        code2 = p2.run()
        print("BIG", big.status[0].name, code2, big.reason)
        sys.exit(code)
    """))
    r = run_script(script, workdir, timeout=50, env={"CUDA_VISIBLE_DEVICES": "3,5"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    assert line.split()[1] == "FINISHED" and line.split()[2] in ("3", "5"), out     # one GPU of the two
    chain = next(x for x in out.splitlines() if x.startswith("CHAIN"))
    assert chain.count("FINISHED") == 5, out
    big = next(x for x in out.splitlines() if x.startswith("BIG"))
    assert big.split()[1] == "FAILED" and big.split()[2] == "1", out
    assert "greedy" in big and "3 GPU(s)" in big, out                                # names task and ask
    assert not (workdir / "ran-big").exists()                                         # nothing ran
