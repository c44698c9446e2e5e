"""distill-train on a real (single-node) SLURM cluster through hydra/launcher=slurm_cpu.

Needs the cluster of scripts/slurm-up.sh (CI starts it in .ci/run). Skipped only where SLURM's
client tools are not installed at all; installed but not running is a failure.

1. the smoke sweep (2x2) goes out as ONE job array, every cell completes, the report is built;
2. preemption: a running cell is stopped after its first checkpoint (`scontrol requeue`, or
   the USR2 that precedes a time limit), restarts from that checkpoint (not step 0), keeps its
   W&B run id, and ends where an uninterrupted run of the same cell ends.
"""

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Until conf/train.yaml enables the callbacks itself; `++` also works once it does.
CALLBACK = "++hydra.callbacks.report._target_=distill.sweep.callbacks.ReportCallback"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("sinfo") is None,
                       reason="SLURM client tools (sinfo) not installed; start a cluster with scripts/slurm-up.sh"),
]


@pytest.fixture(scope="module")
def cluster():
    """The node must be up and usable; a down cluster is an error, not a skip."""
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s in ("idle", "mix", "alloc") for s in states[1::2]):
        pytest.fail(f"SLURM is installed but no usable node (sinfo: {proc.stdout.strip() or proc.stderr.strip()}); "
                    "run scripts/slurm-up.sh")


def job_env(out: Path, **extra: str) -> dict:
    env = {**os.environ, "DISTILL_OUTPUT": str(out), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    env.update(extra)
    return env


def sacct_states(job: str, duplicates: bool = False) -> list[tuple[str, str]]:
    args = ["sacct", "-j", job, "-X", "-n", "-P", "-o", "JobID,State"] + (["-D"] if duplicates else [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    # One line per job record; a state may carry words ("CANCELLED by 0"): keep its first word.
    return [(job_id, state.split()[0] if state.split() else state)
            for job_id, state, *_ in (line.split("|") for line in proc.stdout.splitlines() if "|" in line)]


def read_metrics(cell_dir: Path) -> dict:
    return json.loads((cell_dir / "metrics.json").read_text())


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text()[-n:] if path.exists() else ""


def test_smoke_grid_runs_as_one_job_array(cluster, tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "sweep.log"
    with log.open("w") as f:
        proc = subprocess.run([str(BIN / "distill-train"), "-m", "+sweep=smoke", "hydra/launcher=slurm_cpu", CALLBACK],
                              cwd=tmp_path, env=job_env(out), stdout=f, stderr=subprocess.STDOUT, timeout=1200)
    sweep = out / "smoke"
    assert proc.returncode == 0, tail(log) + "\n".join(tail(p) for p in sweep.glob(".submitit/*/*.err"))

    # one array of four tasks: submitit names each task's folder <array id>_<index>
    tasks = [p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)]
    array_ids = {t.split("_")[0] for t in tasks}
    assert len(array_ids) == 1, tasks
    assert sorted(int(t.split("_")[1]) for t in tasks) == [0, 1, 2, 3]
    (array_id,) = array_ids
    for _ in range(60):  # accounting is written asynchronously
        states = sacct_states(array_id)
        if len(states) == 4 and all(s == "COMPLETED" for _, s in states):
            break
        time.sleep(1)
    assert sorted(states) == [(f"{array_id}_{i}", "COMPLETED") for i in range(4)]

    smoke = OmegaConf.load(REPO / "conf" / "experiment" / "smoke.yaml")
    cells = [d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith(".")]
    metrics = [read_metrics(d) for d in cells]
    assert all(m["status"] == "completed" for m in metrics), [m.get("error") for m in metrics]
    assert all(m["train"]["steps"] == smoke.trainer.max_steps for m in metrics)
    assert {(m["cell"]["divergence"], m["cell"]["tau"]) for m in metrics} == set(
        itertools.product(["fkl", "rkl"], [1.0, 2.0]))

    # the callback wrote the report; the CLI rebuilds the same from the files
    md = (sweep / "report.md").read_text()
    assert "4 cells: 4 completed" in md
    assert (sweep / "report.png").stat().st_size > 10_000
    csv_before = (sweep / "report.csv").read_text()
    rep = subprocess.run([str(BIN / "distill-report"), str(sweep)], capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert (sweep / "report.csv").read_text() == csv_before
    rows = [r.split(",") for r in csv_before.splitlines()[1:]]
    assert {(r[1], r[3]) for r in rows if r[1] in ("fkl", "rkl")} >= {("fkl", "1"), ("fkl", "2"), ("rkl", "1"), ("rkl", "2")}


# A cell that runs long enough after its first checkpoint (step 10) to be stopped mid-training.
PREEMPT_CELL = ["experiment=smoke", "divergence=fkl", "tau=2.0", "trainer.max_steps=150", "trainer.ckpt_every=10",
                "trainer.eval_every=50"]
PREEMPT_CALLBACK = "++hydra.callbacks.preemption._target_=distill.sweep.callbacks.PreemptionCallback"


def wait_for(predicate, timeout_s: float, what: str, procs=()):
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"waiting for {what}: {p.args[:3]} exited early with {p.returncode}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same cell, uninterrupted, in-process, one thread like the SLURM task (same float sums).

    Started at first use and left running while the SLURM cell trains; call it for its metrics.
    """
    tmp = tmp_path_factory.mktemp("reference")
    log = (tmp / "reference.log").open("w")
    proc = subprocess.Popen([str(BIN / "distill-train"), "sweep_name=reference", "logger=none", *PREEMPT_CELL],
                            cwd=tmp, env=job_env(tmp / "out", OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT)

    def metrics() -> dict:
        assert proc.wait(timeout=900) == 0, tail(tmp / "reference.log")
        (cell,) = (tmp / "out" / "reference").glob("fkl-tau2-*s0-*")
        return read_metrics(cell)

    yield metrics
    stop(proc)
    log.close()


@pytest.mark.parametrize("how", ["requeue", "usr2", "term"])
def test_stopped_cell_resumes_from_its_checkpoint(cluster, reference, tmp_path, how):
    """requeue: `scontrol requeue` (SIGTERM, as for an admin requeue or a preemption): SLURM requeues;
    usr2: the signal SLURM sends `signal_delay_s` before the time limit: the job requeues itself through
    submitit's handler; term: `scancel --signal=TERM`, a TERM that SLURM will not requeue: the job
    requeues itself instead of ending FAILED. Each time the cell checkpoints at the step boundary."""
    out = tmp_path / "out"
    slurm_log = tmp_path / "slurm.log"
    sweep_name = f"preempt-{how}"
    job_name = f"distill-{sweep_name}"
    with slurm_log.open("w") as f:
        slurm = subprocess.Popen(
            [str(BIN / "distill-train"), "-m", "hydra/launcher=slurm_cpu", f"sweep_name={sweep_name}", "logger=wandb",
             CALLBACK, PREEMPT_CALLBACK, *PREEMPT_CELL], cwd=tmp_path, env=job_env(out), stdout=f, stderr=subprocess.STDOUT)
        try:
            latest = wait_for(lambda: next((out / sweep_name).glob("fkl-tau2-*s0-*/checkpoints/latest"), None),
                              900, "the first checkpoint", [slurm])
            job = subprocess.run(["squeue", "-h", "-n", job_name, "-o", "%i"], capture_output=True, text=True).stdout.split()
            assert len(job) == 1, f"expected one running job named {job_name}, squeue says {job}"
            step_at_stop = int(re.sub(r"\D", "", latest.read_text()))
            if how == "requeue":
                subprocess.run(["scontrol", "requeue", job[0]], check=True, timeout=30)
            else:
                subprocess.run(["scancel", f"--signal={how.upper()}", job[0]], check=True, timeout=30)
            assert slurm.wait(timeout=1200) == 0, tail(slurm_log)
        finally:
            stop(slurm)
            subprocess.run(["scancel", "-n", job_name], timeout=30)

    cell = latest.parent.parent
    m = read_metrics(cell)
    assert m["status"] == "completed", m.get("error")
    resumed = m["train"]["resumed_from_step"]
    assert resumed > 0, "the requeued cell started again from step 0"
    # the stop itself checkpoints at the step it was in (not the last periodic checkpoint)
    assert resumed >= step_at_stop and m["train"]["steps"] == 150
    assert m["attempts"][0]["status"] == "interrupted" and m["attempts"][0]["end_step"] == resumed
    assert [a["status"] for a in m["attempts"]][-1] == "completed"
    assert "REQUEUED" in {s for _, s in sacct_states(job[0], duplicates=True)}, sacct_states(job[0], True)

    # the same cell (same signature) ends where the uninterrupted run ends
    ref = reference()
    assert ref["signature"] == m["signature"] and ref["train"]["resumed_from_step"] == 0
    # data order is a function of the step and the RNG state is checkpointed: on this CPU the
    # numbers come out bit-identical; the tolerance only allows for other kernels
    assert m["train"]["final_loss"] == pytest.approx(ref["train"]["final_loss"], rel=1e-4)
    for k, v in ref["valid"].items():
        assert m["valid"][k] == pytest.approx(v, rel=1e-4, abs=1e-7), k
    for bench, ev in ref["eval"].items():
        assert m["eval"][bench]["rougeL_mean"] == pytest.approx(ev["rougeL_mean"], abs=1.0), bench

    # both attempts logged to one W&B run (id = sweep-name-signature) in the sweep's own W&B folder,
    # and together they hold every logged step once (what `wandb sync` of the folder uploads)
    from distill.tracking import wandb_run as tracking
    from distill.tracking import offline as wandb_offline

    run_id = tracking.run_id(sweep_name, m["name"], m["signature"])
    # the sweep's folder also holds the per-sweep report run (`<sweep>-report-sweep`): only the cell's runs here
    runs = sorted((out / sweep_name / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) >= 2, runs  # one local run dir per attempt
    assert all(r.name.endswith(f"-{run_id}") and (r / f"run-{run_id}.wandb").exists() for r in runs), runs
    files = wandb_offline.run_files(out / sweep_name, run_id)
    logged = [r["_step"] for f in files for r in wandb_offline.history_rows(f) if "train/loss" in r]
    local = {json.loads(line)["step"] for line in (cell / "train_log.jsonl").read_text().splitlines()
             if "train/loss" in line}
    assert sorted(logged) == sorted(local), (sorted(logged), sorted(local))
