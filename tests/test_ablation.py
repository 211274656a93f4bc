"""examples/ablation.py, the evidence study's runner: how runs are planned and configured, the
paired interval, the report, and a tiny study end to end (resumable, skipping finished runs)."""

import csv
import json
import math

import pytest

import ablation  # examples/ is on the path (conftest)
from trainer import load_config

SB, HR = ablation.MODELS


def setting(name):
    return next(setting for setting in ablation.SETTINGS if setting.name == name)


def test_the_plan_runs_the_sweep_first_and_pairs_every_seed():
    plan = ablation._planned([SB, HR], list(ablation.SETTINGS), [0, 1])
    names = [(run.model, run.setting.name, run.seed) for run in plan]
    assert len(names) == len(set(names))
    first_best = next(index for index, run in enumerate(plan) if run.setting.needs_best_weight)
    assert all(run.model == SB for run in plan[: first_best + 1])
    assert {run.setting.name for run in plan[:first_best]} == {
        "mse", "hg-w0.1", "hg-w0.3", "hg-w1", "hg-w4", "sd-snapshot", "sd-snapshot-fixed"}
    assert [run.seed for run in plan[:5]] == [0] * 5  # seed-major: seed 0 of every swept setting first
    assert {run.setting.name for run in plan if run.model == HR} == {
        "mse", "hg-w0.1", "hg-w0.3", "hg-w1", "hg-w4", "hg+sd-snapshot"}


def test_another_model_gets_the_shared_settings_and_its_own_report_section(tmp_path):
    other = "simplebaseline_res18"
    plan = ablation._planned([other], list(ablation.SETTINGS), [0])
    assert {run.setting.name for run in plan} == {"mse", "hg-w0.1", "hg-w0.3", "hg-w1", "hg-w4", "hg+sd-snapshot"}
    runs, results = tmp_path / "runs", tmp_path / "results"
    for seed, (mse, hg) in enumerate([(0.70, 0.71), (0.72, 0.72)]):
        write_result(runs, other, "mse", seed, mse)
        write_result(runs, other, "hg-w0.1", seed, hg)
    write_result(runs, SB, "mse", 0, 0.30)
    ablation.write_report(runs, results, ablation.DEFAULT_CONFIG)
    summary = (results / "summary.md").read_text()
    assert summary.index(f"## {SB}\n") < summary.index(f"## {other}\n")  # the study's models first
    assert "| hg-w0.1 | 2 |" in summary.split(f"## {other}\n")[1]
    with pytest.raises(SystemExit):
        ablation.main(["--models", "not_a_model", "--report-only"])


def test_overrides_even_the_steps_of_replay_and_resolve_the_best_weight(tmp_path):
    base = load_config(ablation.DEFAULT_CONFIG, {})
    replay = ablation._run_overrides(ablation.Run(SB, setting("hg+sd-replay"), 3), base, 0.3, tmp_path)
    assert replay["grad_weight"] == 0.3 and replay["seed"] == 3 and replay["model"] == SB
    assert replay["epochs"] == round(base.epochs * (1 - base.replay_fraction))
    assert replay["lr_steps"] == [round(step * (1 - base.replay_fraction)) for step in base.lr_steps]
    late = ablation._run_overrides(ablation.Run(SB, setting("hg-late"), 0), base, 1.0, tmp_path)
    assert late["grad_start_epoch"] == base.lr_steps[0] and "epochs" not in late
    fixed = ablation._run_overrides(ablation.Run(SB, setting("sd-snapshot-fixed"), 0), base, None, tmp_path)
    assert fixed["step_factor"] == 1 and fixed["grad_weight"] == 0.0 and fixed["distill"] == "snapshot"
    load_config(ablation.DEFAULT_CONFIG, replay)  # every override is a valid setting


def test_paired_interval():
    mean, half = ablation.paired_interval([0.01, 0.03, 0.02])
    # mean 0.02, standard deviation 0.01, t(2 degrees of freedom) = 4.303
    assert mean == pytest.approx(0.02) and half == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert math.isnan(ablation.paired_interval([0.5])[1])


def write_result(runs, model, name, seed, ap, **extra):
    folder = ablation.Run(model, setting(name), seed).folder(runs)
    folder.mkdir(parents=True)
    row = {column: 0 for column in ablation.COLUMNS}
    row.update(model=model, setting=name, seed=seed, AP=ap, optimizer_steps=100, wall_s=60.0, **extra)
    (folder / "result.json").write_text(json.dumps(row))


def test_the_report_marks_what_is_significant(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    for seed, (mse, better, same) in enumerate([(0.30, 0.35, 0.29), (0.32, 0.36, 0.33), (0.28, 0.34, 0.28)]):
        write_result(runs, SB, "mse", seed, mse)
        write_result(runs, SB, "hg-w4", seed, better)
        write_result(runs, SB, "hg-w0.1", seed, same)
    ablation.write_report(runs, results, ablation.DEFAULT_CONFIG)
    with open(results / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9 and tuple(rows[0]) == ablation.COLUMNS
    assert [row["setting"] for row in rows[::3]] == ["mse", "hg-w0.1", "hg-w4"]
    lines = (results / "summary.md").read_text().splitlines()
    better = next(line for line in lines if line.startswith("| hg-w4 "))
    same = next(line for line in lines if line.startswith("| hg-w0.1 "))
    assert "+0.0500" in better and "| yes |" in better
    assert "| no |" in same
    for plot in ("ap_vs_grad_weight.png", "heatmap_shape.png"):
        assert (results / plot).stat().st_size > 10_000


def test_a_tiny_study_end_to_end_skips_finished_runs(tmp_path):
    protocol = tmp_path / "tiny.yaml"
    protocol.write_text("synthetic_train: 8\nsynthetic_val: 3\ninput_size: [64, 96]\nheatmap_size: [16, 24]\n"
                        "sigma: 1.0\nepochs: 1\nbatch_size: 4\nlr_steps: [1]\nworkers: 0\n")
    arguments = ["--config", str(protocol), "--models", SB, "--settings", "mse,hg-w0.1,hg-w0.3,hg-w1,hg-w4,hg-sobel",
                 "--seeds", "0", "--best-after", "1", "--jobs", "1", "--runs", str(tmp_path / "runs"),
                 "--results", str(tmp_path / "results")]
    assert ablation.main(arguments) == 0
    best = json.loads((tmp_path / "results" / "best_weights.json").read_text())[SB]
    with open(tmp_path / "results" / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["setting"] for row in rows] == ["mse", "hg-w0.1", "hg-w0.3", "hg-w1", "hg-w4", "hg-sobel"]
    sobel = rows[-1]
    assert float(sobel["grad_weight"]) == best and sobel["stencil"] == "sobel"
    assert all(int(row["optimizer_steps"]) > 0 and row["gaussian_residual"] for row in rows)
    assert not list((tmp_path / "runs").glob("*/*/seed0/*.pt")), "a finished run keeps no checkpoint"
    finished = {path: path.stat().st_mtime_ns for path in (tmp_path / "runs").glob("*/*/seed0/result.json")}
    assert ablation.main(arguments) == 0  # everything is done: nothing runs again
    assert {path: path.stat().st_mtime_ns for path in finished} == finished


def test_a_fresh_clone_carries_on_from_the_committed_runs_csv(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    for seed in (0, 1):
        write_result(runs, SB, "mse", seed, 0.30 + seed / 100, distill="", distance0="", AP75=0.125)
        write_result(runs, SB, "hg-w1", seed, 0.31 + seed / 100, grad_weight=1.0, distance0=48, step_factor=2)
    ablation.write_report(runs, results, ablation.DEFAULT_CONFIG)
    committed = {name: (results / name).read_bytes() for name in ("runs.csv", "summary.md")}
    in_folders = ablation._finished(runs, results)
    fresh = tmp_path / "fresh-runs"  # the run folders are not committed
    from_csv = ablation._finished(fresh, results)
    assert sorted(from_csv, key=ablation._run_key) == sorted(in_folders, key=ablation._run_key)  # the same rows, the same types
    ablation.write_report(fresh, results, ablation.DEFAULT_CONFIG)
    assert {name: (results / name).read_bytes() for name in committed} == committed
    arguments = ["--models", SB, "--settings", "mse,hg-w1", "--seeds", "0,1", "--runs", str(fresh),
                 "--results", str(results)]
    assert ablation.main(arguments) == 0  # nothing left to run: no run folder is made
    assert not list(fresh.glob("*/*/seed*"))
