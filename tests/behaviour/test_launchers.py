"""Launcher configs (conf/hydra/launcher), sweep files (sweeps/ via conf/sweep) and the report callback.

- the launcher configs compose and their values reach submitit: the real hydra-submitit launcher
  is instantiated and launched with submitit.AutoExecutor replaced by a spy that forwards to a real
  executor (so submitit validates every parameter name) and renders the sbatch script;
- every sweep file composes and expands into the right grid of job overrides, each of which
  composes into the intended cell;
- distill.sweep.callbacks.ReportCallback writes the report at the end of a real (tiny) multirun, also
  when a job failed, and under the submitit local launcher.
"""

import itertools
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from distill.config import CONF_DIR as CONF

SWEEPS = CONF.parent / "sweeps"


@pytest.fixture
def compose_train(tmp_path, monkeypatch):
    """compose(overrides) -> the root config with its hydra node, outputs under tmp_path."""
    monkeypatch.setenv("DISTILL_OUTPUT", str(tmp_path / "out"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides: compose("train", overrides=list(overrides), return_hydra_config=True)
    GlobalHydra.instance().clear()


# ----------------------------------------------------------------------------- launchers

@pytest.mark.parametrize("name, target", [
    ("slurm", "SlurmLauncher"), ("slurm_cpu", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launcher_composes(compose_train, name, target):
    cfg = compose_train([f"hydra/launcher={name}", "sweep_name=abc"])
    launcher = cfg.hydra.launcher
    # Our files extend submitit's launcher configs: the _target_ comes from those, our values override theirs.
    assert launcher._target_.endswith(target)
    assert "submitit_folder" not in cfg and "timeout_min" not in cfg  # nothing lands outside hydra.launcher
    assert launcher.name == "distill-abc"
    assert launcher.submitit_folder == str(Path(cfg.paths.sweep_dir) / ".submitit" / "%j")
    if name == "slurm":
        assert launcher.tasks_per_node == launcher.gpus_per_node >= 1  # one rank per GPU
        assert launcher.max_num_timeout > 0 and launcher.additional_parameters.requeue is True
        assert launcher.partition is None and launcher.account is None and launcher.qos is None
    if name == "slurm_cpu":
        assert launcher.gpus_per_node is None and launcher.tasks_per_node == 1
        assert launcher.max_num_timeout > 0


def test_slurm_tasks_follow_gpus_override(compose_train):
    cfg = compose_train(["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu"])
    assert cfg.hydra.launcher.tasks_per_node == 4 and cfg.hydra.launcher.partition == "gpu"


class SpyExecutor:
    """Stands in for submitit.AutoExecutor: records what the launcher passes, forwards to a real one."""

    calls: dict = {}

    def __init__(self, cluster, **kwargs):
        SpyExecutor.calls = {"cluster": cluster, "init": kwargs}
        self.real = REAL_AUTO_EXECUTOR(cluster=cluster, **kwargs)

    def update_parameters(self, **kwargs):
        SpyExecutor.calls["params"] = kwargs
        self.real.update_parameters(**kwargs)  # submitit rejects unknown names here

    def map_array(self, fn, *iterables):
        n = len(iterables[0])
        SpyExecutor.calls["n_jobs"] = n
        SpyExecutor.calls["job_args"] = list(zip(*iterables))
        inner = self.real._executor
        if isinstance(inner, submitit.SlurmExecutor):
            SpyExecutor.calls["sbatch"] = submitit.slurm.slurm._make_sbatch_string(
                command="python -m submitit.core._submit", folder=inner.folder, map_count=n, **inner.parameters)
        return [SimpleNamespace(results=lambda i=i: [f"result{i}"]) for i in range(n)]


REAL_AUTO_EXECUTOR = submitit.AutoExecutor


def launch_with_spy(cfg, monkeypatch, overrides):
    monkeypatch.setattr(submitit, "AutoExecutor", SpyExecutor)
    # the real SlurmExecutor refuses to exist where there is no srun; it never submits here
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 1))
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    out = launcher.launch(overrides, initial_job_idx=0)
    return out, SpyExecutor.calls


GRID = [["divergence=fkl", "tau=1.0"], ["divergence=fkl", "tau=2.0"], ["divergence=rkl", "tau=1.0"]]


def test_slurm_parameters_reach_submitit(compose_train, monkeypatch):
    cfg = compose_train(["hydra/launcher=slurm", "sweep_name=grid", "hydra.launcher.gpus_per_node=8",
                         "hydra.launcher.partition=gpu", "hydra.launcher.account=proj",
                         "hydra.launcher.timeout_min=600", "hydra.launcher.array_parallelism=16"])
    out, calls = launch_with_spy(cfg, monkeypatch, GRID)
    assert out == ["result0", "result1", "result2"]
    assert calls["cluster"] == "slurm"
    launcher = cfg.hydra.launcher
    assert calls["init"] == {"folder": launcher.submitit_folder, "slurm_max_num_timeout": launcher.max_num_timeout}
    p = calls["params"]
    assert (p["gpus_per_node"], p["tasks_per_node"], p["timeout_min"]) == (8, 8, 600)
    assert p["cpus_per_task"] == launcher.cpus_per_task and p["name"] == "distill-grid"
    assert p["slurm_partition"] == "gpu" and p["slurm_account"] == "proj"
    assert p["slurm_array_parallelism"] == 16 and p["slurm_signal_delay_s"] == launcher.signal_delay_s
    assert p["slurm_additional_parameters"] == {"requeue": True}
    assert f"export OMP_NUM_THREADS={launcher.cpus_per_task}" in p["slurm_setup"]
    assert calls["n_jobs"] == 3 and [a[0] for a in calls["job_args"]] == GRID
    sbatch = calls["sbatch"]
    for flag in ("--gpus-per-node=8", "--ntasks-per-node=8", "--partition=gpu", "--account=proj",
                 "--time=600", "--array=0-2%3", "--requeue", "--job-name=distill-grid",
                 f"--cpus-per-task={launcher.cpus_per_task}", f"--signal=USR2@{launcher.signal_delay_s}"):
        assert f"#SBATCH {flag}\n" in sbatch, flag
    assert "--qos" not in sbatch and "--mem" not in sbatch  # null = the cluster's default


def test_slurm_cpu_parameters_reach_submitit(compose_train, monkeypatch):
    cfg = compose_train(["hydra/launcher=slurm_cpu", "+sweep=smoke"])
    _, calls = launch_with_spy(cfg, monkeypatch, GRID + [["divergence=rkl", "tau=2.0"]])
    p = calls["params"]
    assert p["gpus_per_node"] is None and p["tasks_per_node"] == 1 and p["mem_gb"] == 2
    assert calls["init"]["slurm_max_num_timeout"] > 0
    sbatch = calls["sbatch"]
    assert "--gpus-per-node" not in sbatch and "#SBATCH --ntasks-per-node=1\n" in sbatch
    assert f"#SBATCH --array=0-3%{min(4, cfg.hydra.launcher.array_parallelism)}\n" in sbatch
    assert "#SBATCH --mem=2GB\n" in sbatch and "#SBATCH --job-name=distill-smoke\n" in sbatch


def test_local_parameters_reach_submitit(compose_train, monkeypatch):
    cfg = compose_train(["hydra/launcher=local", "hydra.launcher.timeout_min=5"])
    _, calls = launch_with_spy(cfg, monkeypatch, GRID)
    assert calls["cluster"] == "local"
    p = calls["params"]
    assert (p["gpus_per_node"], p["tasks_per_node"], p["timeout_min"]) == (0, 1, 5)


def test_pool_composes_as_hydras_joblib_launcher(compose_train):
    launcher = compose_train(["hydra/launcher=pool"]).hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2


def _attempt_pids(log: Path) -> list[int]:
    return [int(line.split(" pid ")[1].split()[0]) for line in log.read_text().splitlines() if "attempt on" in line]


def test_pool_runs_cells_in_reused_workers_with_the_numbers_of_a_process_of_their_own(tmp_path):
    # Started the way distill-pipeline starts a local grid (`python -m distill.train -m`, hydra/launcher=pool).
    from distill.sweep.pipeline import train_command
    from distill.cell.results import read_metrics

    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    base = ["experiment=smoke", "logger=none", "trainer.num_threads=1", "eval.max_examples=4"]
    grid = subprocess.run(train_command([*base, f"paths.root={tmp_path}/pool", "hydra/launcher=pool",
                                         "hydra.launcher.n_jobs=2", "divergence=fkl,rkl", "seed=0,1"], multirun=True),
                          capture_output=True, text=True, env=env, timeout=600)
    assert grid.returncode == 0, grid.stderr[-3000:]
    logs = {p.parent.name.rsplit("-", 1)[0]: p for p in (tmp_path / "pool").glob("*/*/train.log")}
    assert sorted(logs) == [f"{d}-tau1-toy-2x32-s{s}" for d in ("fkl", "rkl") for s in (0, 1)]
    pids = [pid for log in logs.values() for pid in _attempt_pids(log)]
    assert len(pids) == 4 and len(set(pids)) <= 2          # one attempt a cell, in two workers: each ran two
    for name, log in logs.items():
        lines = log.read_text().splitlines()
        assert len(lines) == len(set(lines)) and sum("step 6/6" in line for line in lines) == 1, log.read_text()
        results = [ln.split("distill.train: ")[1].split(":")[0] for ln in lines if re.search(r"train: \S+-s\d: ", ln)]
        assert results == [name]  # its own result line, no other cell's

    # The grid's last cell ran after another in the same worker; alone in a fresh process it scores the same.
    solo = subprocess.run(train_command([*base, f"paths.root={tmp_path}/solo", "divergence=rkl", "seed=1"]),
                          capture_output=True, text=True, env=env, timeout=600)
    assert solo.returncode == 0, solo.stderr[-3000:]
    (alone,) = [read_metrics(p.parent) for p in (tmp_path / "solo").glob("*/*/metrics.json")]
    pooled = read_metrics(logs["rkl-tau1-toy-2x32-s1"].parent)
    for key in ("train", "valid", "eval"):
        drop = ("time_s", "tokens_per_s")  # wall-clock figures
        assert {k: v for k, v in pooled[key].items() if k not in drop} == \
            {k: v for k, v in alone[key].items() if k not in drop}, key


# ----------------------------------------------------------------------------- sweeps

def sweep_jobs(cfg):
    """The job overrides Hydra's basic sweeper makes: sweeper params, then the command line's."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()] + list(cfg.hydra.overrides.task)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    (batch,) = BasicSweeper.split_arguments(parser.parse_overrides(params), None)
    return batch


def test_sweep_group_is_a_relative_symlink():
    link = CONF / "sweep"
    assert link.is_symlink() and os.readlink(link) == "../sweeps"
    assert sorted(p.name for p in link.iterdir()) == sorted(p.name for p in SWEEPS.glob("*.yaml"))


@pytest.mark.parametrize("sweep, grid, extra", [
    ("demo", {"divergence": ["fkl", "rkl"], "tau": [1.0, 2.0, 4.0], "seed": [0, 1, 2]}, {}),
    ("smoke", {"divergence": ["fkl", "rkl"], "tau": [1.0, 2.0], "seed": [0]}, {}),
    ("paper_gpt2", {"divergence": ["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl"],
                    "tau": [0.5, 1.0, 2.0, 3.0, 4.0], "seed": [0, 1, 2]},
     {"model": "gpt2xl_gpt2", "data": "dolly"}),
    ("family", {"divergence": sorted(p.stem for p in (CONF / "divergence").glob("*.yaml")),
                "tau": [1.0, 2.0, 4.0], "seed": [0, 1, 2]}, {}),
    ("demo_ablation", {"divergence": ["fkl", "rkl", "jsd"], "tau": [1.0, 1.5, 2.0, 3.0, 4.0],
                       "loss.tau_squared": [True, False], "trainer.max_steps": [150, 450], "seed": [0, 1, 2]},
     {"experiment": "demo"}),
])
def test_sweep_file_expands_to_grid(compose_train, sweep, grid, extra):
    cfg = compose_train([f"+sweep={sweep}"])
    assert cfg.sweep_name == sweep and "sweep" not in cfg  # the file sets root keys, not a `sweep` node
    assert cfg.paths.sweep_dir.endswith(f"/{sweep}")
    for group, choice in extra.items():
        assert cfg.hydra.runtime.choices[group] == choice
    jobs = sweep_jobs(cfg)
    assert all(job[-1] == f"+sweep={sweep}" for job in jobs)  # every job composes the sweep file too
    cells = {tuple(o.split("=", 1)[1] for o in job[:-1]) for job in jobs}
    assert [o.split("=")[0] for o in jobs[0][:-1]] == list(grid)
    expected = set(itertools.product(*[[str(v) for v in vals] for vals in grid.values()]))
    assert len(jobs) == len(cells) == len(expected)
    assert cells == expected
    # a job's overrides compose into the intended cell (first and last of the grid)
    loader = GlobalHydra.instance().config_loader()
    for job in (jobs[0], jobs[-1]):
        job_cfg = loader.load_sweep_config(cfg, list(job))
        want = dict(o.split("=", 1) for o in job[:-1])
        assert job_cfg.divergence.name == want["divergence"]
        assert job_cfg.tau == float(want["tau"]) and isinstance(job_cfg.tau, float)
        assert job_cfg.seed == int(want["seed"])
        assert job_cfg.sweep_name == sweep


def test_sota_sweep_pairs_each_recipe_with_its_rollout(compose_train):
    cfg = compose_train(["+sweep=sota", "experiment=demo"])
    jobs = sweep_jobs(cfg)
    assert len(jobs) == 6 * 3 * 3 and cfg.sweep_name == "sota" and cfg.trainer.eval_every > 0
    loader = GlobalHydra.instance().config_loader()
    expected = {"gkd": ("jsd", "on_policy"), "distillm": ("skl", "sgo"), "ab": ("ab", "offline"),
                "akl": ("akl", "offline"), "fkl": ("fkl", "offline"), "rkl": ("rkl", "offline")}
    seen = {}
    for job in jobs:
        want = dict(o.split("=", 1) for o in job if "=" in o and not o.startswith("+"))
        if want["tau"] != "2.0" or want["seed"] != "1":
            continue
        job_cfg = loader.load_sweep_config(cfg, list(job))
        seen[want["method"]] = (job_cfg.divergence.name, job_cfg.rollout.name)
        assert job_cfg.tau == 2.0 and job_cfg.trainer.max_steps == 150  # the demo preset still applies
        if want["method"] == "gkd":
            assert (job_cfg.divergence.beta, job_cfg.rollout.lmbda) == (0.5, 0.5)
        if want["method"] == "distillm":
            assert (job_cfg.divergence.alpha, job_cfg.rollout.init_threshold, job_cfg.rollout.loss_eps,
                    job_cfg.rollout.capacity) == (0.1, 0.0, 0.1, 1000)
    assert seen == expected


def test_demo_ablation_cells_compose_with_their_factor_and_budget(compose_train):
    cfg = compose_train(["+sweep=demo_ablation"])
    jobs = sweep_jobs(cfg)
    assert len(jobs) == 5 * 3 * 2 * 2 * 3 == 180
    loader = GlobalHydra.instance().config_loader()
    demo = OmegaConf.load(CONF / "experiment" / "demo.yaml")
    seen = set()
    for job in jobs:
        want = dict(o.split("=", 1) for o in job[:-1])
        if (want["loss.tau_squared"], want["trainer.max_steps"]) in seen:
            continue
        seen.add((want["loss.tau_squared"], want["trainer.max_steps"]))
        job_cfg = loader.load_sweep_config(cfg, list(job))
        assert job_cfg.loss.tau_squared is {"True": True, "False": False}[want["loss.tau_squared"]]
        assert job_cfg.trainer.max_steps == int(want["trainer.max_steps"])
        # everything else is the demo's: same lr, warmup, eval, teacher cache
        assert job_cfg.trainer.lr == demo.trainer.lr and job_cfg.trainer.warmup_steps == demo.trainer.warmup_steps
        assert job_cfg.eval.seeds == demo.eval.seeds and job_cfg.loss.teacher_cache is True
    assert len(seen) == 4


def test_demo_sft_is_the_demo_cells_without_the_teacher(compose_train):
    """The SFT continuation: one cell per demo seed, in the demo's sweep dir, same steps/optimizer, kd_ratio 0."""
    demo = compose_train(["+sweep=demo"])
    cfg = compose_train(["+sweep=demo_sft"])
    assert cfg.sweep_name == "demo" and cfg.paths.sweep_dir == demo.paths.sweep_dir
    jobs = sweep_jobs(cfg)
    assert [j[:-1] for j in jobs] == [[f"seed={s}"] for s in (0, 1, 2)]
    assert {int(o.split("=")[1]) for j in jobs for o in j[:-1]} == {int(s) for s in str(demo.hydra.sweeper.params.seed).split(",")}
    job_cfg = GlobalHydra.instance().config_loader().load_sweep_config(cfg, list(jobs[0]))
    assert job_cfg.loss.kd_ratio == 0.0
    for key in ("trainer", "data", "eval", "model"):
        assert OmegaConf.to_container(job_cfg[key]) == OmegaConf.to_container(demo[key]), key


def test_smoke_sweep_selects_smoke_experiment(compose_train):
    cfg = compose_train(["+sweep=smoke"])
    assert cfg.hydra.runtime.choices["experiment"] == "smoke"
    smoke = OmegaConf.load(CONF / "experiment" / "smoke.yaml")
    assert cfg.trainer.max_steps == smoke.trainer.max_steps


def test_root_config_wires_the_report_and_preemption_callbacks(compose_train):
    cfg = compose_train([])
    assert type(instantiate(cfg.hydra.callbacks.report)).__name__ == "ReportCallback"
    assert type(instantiate(cfg.hydra.callbacks.preemption)).__name__ == "PreemptionCallback"


# ----------------------------------------------------------------------------- report callback

APP = '''
import json, os, hashlib
from pathlib import Path
import hydra
from omegaconf import DictConfig

@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    name = f"{cfg.objective}-tau{cfg.tau:g}-s{cfg.seed}"
    sig = hashlib.sha1(name.encode()).hexdigest()[:8]
    d = Path(cfg.sweep_dir) / f"{name}-{sig}"
    d.mkdir(parents=True, exist_ok=True)
    cell = {"divergence": cfg.objective, "tau": float(cfg.tau), "seed": cfg.seed}
    m = {"schema_version": 1, "signature": sig, "name": name, "sweep": cfg.sweep_name, "cell": cell}
    if cfg.objective == cfg.fail_on:
        m.update(status="failed", error="RuntimeError: boom")
        (d / "metrics.json").write_text(json.dumps(m))
        raise RuntimeError("boom")
    m.update(status="completed", eval={"test": {"rougeL_mean": 10.0 * cfg.tau + cfg.seed}})
    (d / "metrics.json").write_text(json.dumps(m))

if __name__ == "__main__":
    main()
'''

# The app's own keys avoid the names of conf/ groups (divergence, ...): conf/ is on its search
# path for hydra/launcher=local.
APP_CONF = '''
sweep_name: cb
sweep_dir: {sweep_dir}
objective: fkl
tau: 1.0
seed: 0
fail_on: none
hydra:
  searchpath: [file://{conf}]
  sweep:
    dir: ${{sweep_dir}}
    subdir: .hydra-jobs/${{hydra.job.num}}
  callbacks:
    report:
      _target_: distill.sweep.callbacks.ReportCallback
'''


def run_app(tmp_path, *args, extra_conf: str = ""):
    (tmp_path / "conf").mkdir(exist_ok=True)
    sweep_dir = tmp_path / "sweep"
    (tmp_path / "conf" / "config.yaml").write_text(APP_CONF.format(sweep_dir=sweep_dir, conf=CONF) + extra_conf)
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(tmp_path / "app.py"), "-m", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # 2 shared cores can be 7x slow
    return proc, sweep_dir


def test_report_callback_at_multirun_end(tmp_path):
    proc, sweep_dir = run_app(tmp_path, "objective=fkl,rkl", "tau=1.0,2.0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = (sweep_dir / "report.csv").read_text().splitlines()
    assert len([r for r in rows if r.startswith("test,fkl,")]) == 2
    assert "4 cells: 4 completed" in (sweep_dir / "report.md").read_text()
    assert "Plotly.newPlot" in (sweep_dir / "report.html").read_text()   # the offline dashboard, too
    assert not (sweep_dir / "wandb").exists()                           # no W&B logger, no summary run


def test_report_callback_logs_the_sweep_summary_run_to_wandb(tmp_path):
    from distill.tracking import offline as wandb_offline
    from distill.report.wandb import summary_run_id

    logger = "logger:\n  name: wandb\n  project: distill-test\n  mode: offline\n  dir: ${sweep_dir}\n"
    proc, sweep_dir = run_app(tmp_path, "objective=fkl,rkl", "tau=1.0", extra_conf=logger)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = wandb_offline.run_files(sweep_dir, summary_run_id("cb"))
    info, _ = wandb_offline.run_info(path)
    assert (info["group"], info["job_type"]) == ("cb", "sweep-report")
    (row,) = wandb_offline.history_rows(path)
    assert {"report/table", "report/plot", "sweep/rougeL_vs_tau", "sweep/fkl_minus_rkl"} <= set(row)


def test_report_callback_lists_failed_cell_even_though_multirun_fails(tmp_path):
    # the failing cell runs first; Hydra then skips on_multirun_end, on_job_end still reports
    proc, sweep_dir = run_app(tmp_path, "objective=jsd,fkl", "tau=1.0", "fail_on=jsd")
    assert proc.returncode != 0 and "boom" in proc.stderr
    md = (sweep_dir / "report.md").read_text()
    assert "2 cells: 1 completed, 1 failed" in md
    assert "| failed |" in md and "RuntimeError: boom" in md


@pytest.mark.slow
def test_report_callback_with_submitit_local_launcher(tmp_path):
    proc, sweep_dir = run_app(tmp_path, "hydra/launcher=local", "objective=fkl,rkl", "tau=1.0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 cells: 2 completed" in (sweep_dir / "report.md").read_text()
    assert list((sweep_dir / ".submitit").iterdir())  # it really went through submitit
