"""distill.report.records: the cells of a sweep dir as the report reads them (unfinished, unreadable,
superseded, stale cells, attempts, rollout labels), on the fixture sweep (tests/fixtures/report/sweep)."""

import json
import shutil
from pathlib import Path

import pytest

from distill.report.records import references, scan_sweep
from distill.report.wandb import record_from_wandb
from distill.report.write import build_report
from tests.report.sweeps import (
    FIXTURE,
    FIXTURES,
    TEACHER,
    WARM_START,
    expected_scores,
    read_csv,
)


def test_unfinished_cells_are_listed_not_dropped(sweep):
    from distill.cell.lock import CellLock

    running = next(d for d in sweep.iterdir() if (d / "metrics.json").exists()
                   and json.loads((d / "metrics.json").read_text())["status"] == "running")
    lock = CellLock(running)  # a live holder: the cell really is running
    lock.acquire(wait_s=0)
    try:
        build_report(sweep)
    finally:
        lock.release()
    md = (sweep / "report.md").read_text()
    problems = md.split("## Unfinished cells", 1)[1]
    statuses = {}
    for d in FIXTURE.iterdir():
        if d.name.startswith("."):
            continue
        m = d / "metrics.json"
        statuses[d.name] = json.loads(m.read_text())["status"] if m.exists() else "missing"
    unfinished = {k: v for k, v in statuses.items() if v != "completed"}
    assert sorted(unfinished.values()) == ["failed", "missing", "running"]
    for name, status in unfinished.items():
        line = next(l for l in problems.splitlines() if l.startswith(f"| {name} |"))
        assert f"| {status} |" in line
    failed = next(k for k, v in unfinished.items() if v == "failed")
    err = json.loads((FIXTURE / failed / "metrics.json").read_text())["error"]
    assert err.splitlines()[-1] in problems
    assert "1 running, 1 failed, 1 missing" in md
    # the unfinished cells are seed 2, which must not appear as a seed in any entry
    assert all(r["n"] == "2" and "2" not in r["seeds"].split() for r in read_csv(sweep / "report.csv").values())


def test_unreadable_and_duplicate_cells(sweep):
    (sweep / "bad-cell-0123abcd").mkdir()
    (sweep / "bad-cell-0123abcd" / "metrics.json").write_text("{not json")
    (sweep / "old-cell-89abcdef").mkdir()
    (sweep / "old-cell-89abcdef" / "metrics.json").write_text(json.dumps({"schema_version": 0, "status": "completed"}))
    # a second completed dir for an existing cell: newer one wins, the older is listed as superseded
    src = next(FIXTURE.glob("fkl-tau1-s0-*/metrics.json"))
    m = json.loads(src.read_text())
    m["updated_at"] = "2026-11-29T00:00:00+00:00"
    for ev in m["eval"].values():
        ev["rougeL_mean"] += 10.0
    (sweep / "fkl-tau1-s0-ffffffff").mkdir()
    (sweep / "fkl-tau1-s0-ffffffff" / "metrics.json").write_text(json.dumps(m))
    build_report(sweep)
    md = (sweep / "report.md").read_text()
    assert "| bad-cell-0123abcd | unreadable |" in md and "not valid JSON" in md
    assert "| old-cell-89abcdef | unreadable |" in md and "schema_version 0" in md
    assert f"| {src.parent.name} | superseded |" in md
    r = read_csv(sweep / "report.csv")[("test", "fkl", 1.0)]
    exp = expected_scores()[("test", "fkl", 1.0)]
    assert int(r["n"]) == 2
    assert float(r["rougeL_mean"]) == pytest.approx((exp[0] + 10.0 + exp[1]) / 2)


def test_dead_running_cells_are_stale_and_attempts_are_counted(sweep):
    from distill.cell.lock import LOCK_FILE, Holder

    cells = {d.name: d for d in sweep.iterdir() if (d / "metrics.json").exists()}
    running = next(d for d in cells.values() if json.loads((d / "metrics.json").read_text())["status"] == "running")
    dead = Holder.me(30, 300)
    dead.host, dead.updated_at = "node9", dead.updated_at - 3600
    (running / LOCK_FILE).write_text(dead.to_json())  # its job was SIGKILLed an hour ago
    failed = next(d for d in cells.values() if json.loads((d / "metrics.json").read_text())["status"] == "failed")
    m = json.loads((failed / "metrics.json").read_text())
    m.update(status="interrupted", error="stopped by SIGTERM at step 40",
             attempts=[{"attempt": 1, "start_step": 0, "end_step": 40, "status": "interrupted"}])
    (failed / "metrics.json").write_text(json.dumps(m))
    done = next(d for d in cells.values() if json.loads((d / "metrics.json").read_text())["status"] == "completed")
    m = json.loads((done / "metrics.json").read_text())
    m["attempts"] = [{"attempt": 1, "status": "interrupted"}, {"attempt": 2, "status": "completed"}]
    (done / "metrics.json").write_text(json.dumps(m))

    build_report(sweep)
    md = (sweep / "report.md").read_text()
    problems = md.split("## Unfinished cells", 1)[1]
    stale = next(l for l in problems.splitlines() if l.startswith(f"| {running.name} |"))
    assert "| stale |" in stale and "heartbeat is 3600 s old" in stale
    line = next(l for l in problems.splitlines() if l.startswith(f"| {failed.name} |"))
    assert "| interrupted | 40 | 1 |" in line and "stopped by SIGTERM at step 40" in line
    assert f"more than one: {done.name} (2)." in md
    assert "1 stale, 1 interrupted, 1 missing" in md


def test_rollouts_get_their_own_rows_and_old_cells_count_as_offline(tmp_path):
    def write(name, div, rollout, seed, score):
        d = tmp_path / name
        d.mkdir()
        cell = {"divergence": div, "divergence_params": {}, "tau": 1.0, "seed": seed}
        if rollout is not None:
            cell["rollout"] = rollout
        (d / "metrics.json").write_text(json.dumps({"schema_version": 1, "status": "completed", "sweep": "s",
                                                    "cell": cell, "eval": {"b": {"rougeL_mean": score}}}))

    write("fkl-old-00000001", "fkl", None, 0, 30.0)          # written before rollouts existed
    write("fkl-new-00000002", "fkl", "offline", 1, 32.0)
    write("rkl-new-00000003", "rkl", "offline", 0, 35.0)
    write("jsd-onp-00000004", "jsd", "on_policy λ=0.5", 0, 40.0)
    build_report(tmp_path)
    rows = read_csv(tmp_path / "report.csv")
    assert rows[("b", "fkl (rollout=offline)", 1.0)]["n"] == "2"  # the old cell joined the new one
    assert rows[("b", "jsd (rollout=on_policy λ=0.5)", 1.0)]["best"] == "1"
    assert float(rows[("b", "fkl-rkl (rollout=offline)", 1.0)]["rougeL_mean"]) == pytest.approx(-5.0)
    cell = record_from_wandb("r", "finished", {"divergence": {"name": "jsd"}, "tau": 1, "seed": 0,
                                                      "rollout": {"name": "on_policy", "lmbda": 0.5}},
                                    {"eval/b/rougeL": 40.0})   # nested config, slash summary (distill.tracking)
    assert cell.label_source["rollout"] == "on_policy λ=0.5"


def test_references_come_from_the_teacher_and_warm_start_cells(sweep_with_refs):
    refs = references(scan_sweep(sweep_with_refs), sweep_with_refs)
    assert [(r.label, Path(r.cell_dir).name) for r in refs] == [("teacher", TEACHER), ("SFT warm start", WARM_START)]
    assert refs[0].scores == {"test": 55.0, "shift_long": 41.0} and refs[1].scores["test"] == 30.0


def test_no_reference_for_hub_models_or_random_inits(tmp_path):
    sweep = tmp_path / "s"
    shutil.copytree(FIXTURES / "sweep", sweep)   # teacher "toy-teacher", student "toy-student": not our cells
    assert references(scan_sweep(sweep), sweep) == []


# ----------------------------------------------------------------------------- malformed metrics.json
DAMAGED = "fkl-tau1-s0-45807ce7"  # one of the two seeds of fkl at tau=1


def _damage(sweep: Path, how) -> None:
    path = sweep / DAMAGED / "metrics.json"
    m = json.loads(path.read_text())
    how(m)
    path.write_text(json.dumps(m))


WRONG_SHAPES = {
    "cell is a list": lambda m: m.update(cell=[]),
    "eval is a string": lambda m: m.update(eval="x"),
    "a benchmark is a string": lambda m: m["eval"].update(test="x"),
    "a score as a string": lambda m: m["eval"]["test"].update(rougeL_mean="40.0"),
    "tau as a string": lambda m: m["cell"].update(tau="1.0"),
    "seed as a string": lambda m: m["cell"].update(seed="0"),
    "kd_ratio as a string": lambda m: m["cell"].update(kd_ratio="1"),
    "the eval block missing": lambda m: m.pop("eval"),
    "a score missing": lambda m: m["eval"]["test"].pop("rougeL_mean"),
    "train is a list": lambda m: m.update(train=[]),
    "per-seed scores as a string": lambda m: m["eval"]["test"].update(rougeL_per_seed="x"),
    "the divergence as a number": lambda m: m["cell"].update(divergence=3),
    "the error as a number": lambda m: m.update(status="failed", error=5),
}


@pytest.mark.parametrize("how", list(WRONG_SHAPES))
def test_a_metrics_json_of_the_wrong_shape_is_skipped_with_one_warning(sweep, how, caplog):
    from distill.report.cli import main

    _damage(sweep, WRONG_SHAPES[how])
    with caplog.at_level("WARNING"):
        assert main([str(sweep)]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and DAMAGED in warned[0] and "\n" not in warned[0], warned
    md = (sweep / "report.md").read_text()
    assert f"| {DAMAGED} | unreadable |" in md
    # The report is built from the other cells: fkl at tau=1 has only its other seed left.
    other = expected_scores()[("test", "fkl", 1.0)][1]
    row = read_csv(sweep / "report.csv")[("test", "fkl", 1.0)]
    assert row["n"] == "1" and float(row["rougeL_mean"]) == pytest.approx(other)
    assert read_csv(sweep / "report.csv")[("test", "rkl", 1.0)]["n"] == "2"


def test_distill_report_exits_0_and_warns_once_on_a_malformed_cell(sweep):
    import subprocess
    import sys

    _damage(sweep, WRONG_SHAPES["a score as a string"])
    proc = subprocess.run([sys.executable, "-c", "import sys; from distill.report.cli import main; sys.exit(main())",
                           str(sweep)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and DAMAGED in lines[0] and "eval.test.rougeL_mean must be a number" in lines[0], lines
    assert "Traceback" not in proc.stderr
    assert read_csv(sweep / "report.csv")[("test", "fkl", 1.0)]["n"] == "1"


def test_a_malformed_reference_cell_gives_no_reference_line_instead_of_a_crash(sweep_with_refs):
    teacher = sweep_with_refs.parent / "prep" / TEACHER / "metrics.json"
    m = json.loads(teacher.read_text())
    m["eval"]["test"]["rougeL_mean"] = "55"
    teacher.write_text(json.dumps(m))
    refs = references(scan_sweep(sweep_with_refs), sweep_with_refs)
    assert [r.label for r in refs] == ["SFT warm start"]
