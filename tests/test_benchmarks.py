"""The benchmark scripts run end to end on a tiny configuration and write what they promise.

These check the scripts, not the speed: a test never times anything."""

import csv
import os
import sys

import pytest

from conftest import ROOT, run_checked


def run_benchmark(script, *arguments):
    # The interpreter stays off (run_checked), or it would be probed as a CPU backend.
    return run_checked([sys.executable, os.path.join(ROOT, "benchmarks", script), *arguments], HGLOSS_BACKEND="")


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_loss_benchmark_writes_csv_summary_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    run_benchmark(
        "bench_loss.py", "--batch", "2,4", "--size", "16x12", "--providers", "eager,reference,cpu",
        "--repeats", "3", "--warmup", "1", "--out", str(tmp_path),
    )
    rows = read_csv(tmp_path / "bench_loss.csv")
    assert {(row["batch"], row["provider"]) for row in rows} == {
        (batch, provider) for batch in ("2", "4") for provider in ("eager", "reference", "cpu")
    }
    assert all(float(row["median_ms"]) > 0 and row["torch_version"] for row in rows)
    assert "| 4 |" in (tmp_path / "summary.md").read_text()
    assert list(tmp_path.glob("*.png")), "a plot of time and memory against batch size"


def test_loss_benchmark_times_each_thread_count(tmp_path):
    pytest.importorskip("matplotlib")
    run_benchmark(
        "bench_loss.py", "--batch", "2,4", "--size", "16x12", "--providers", "cpu", "--threads", "1,2",
        "--repeats", "3", "--warmup", "1", "--out", str(tmp_path),
    )
    rows = read_csv(tmp_path / "bench_loss.csv")
    assert {(row["batch"], row["threads"]) for row in rows} == {(b, t) for b in ("2", "4") for t in ("1", "2")}
    assert "| threads | batch | provider |" in (tmp_path / "summary.md").read_text()
    assert {path.name.rsplit("_", 1)[-1] for path in tmp_path.glob("*.png")} == {"1threads.png", "2threads.png"}


def test_train_step_benchmark_writes_csv_summary_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    result = run_benchmark(
        "bench_train_step.py", "--device", "cpu", "--model", "simplebaseline_res18_small", "--batch", "2",
        "--input-size", "64x64", "--providers", "eager,cpu", "--rounds", "2", "--repeats", "1",
        "--warmup", "0", "--out", str(tmp_path),
    )
    rows = read_csv(tmp_path / "train_step.csv")
    expected = {("-", "model only")} | {(variant, provider) for variant in ("mse", "hg", "hg+teacher")
                                        for provider in ("eager", "cpu")}
    assert {(row["variant"], row["provider"]) for row in rows} == expected
    for row in rows:
        assert int(row["runs"]) == 2 and float(row["step_median_ms"]) > 0
        if row["provider"] != "model only":
            assert 0 < float(row["loss_share"]) < 1
    assert "| hg+teacher | **cpu** |" in result.stdout
    assert (tmp_path / "train_step.md").read_text().startswith("# Training step:")
    assert (tmp_path / "train_step.png").stat().st_size > 0


def test_keypoint_targets_benchmark_writes_csv_summary_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    run_benchmark(
        "bench_keypoint_targets.py", "--device", "cpu", "--batch", "2", "--teacher", "off,on", "--repeats", "2",
        "--warmup", "1", "--workers", "0", "--loader-images", "4", "--loader-epochs", "1", "--out", str(tmp_path),
    )
    rows = read_csv(tmp_path / "bench_keypoint_targets.csv")
    losses = {(row["teacher"], row["provider"]) for row in rows if row["part"] == "loss"}
    assert losses == {(teacher, provider) for teacher in ("off", "on")
                      for provider in ("fused", "materialised", "compile", "eager")}
    loaders = {(row["workers"], row["targets"]) for row in rows if row["part"] == "loader"}
    assert loaders == {("0", "heatmaps"), ("0", "keypoints")}
    assert all(float(row["median_ms"] or row["samples_per_s"]) > 0 for row in rows)
    summary = (tmp_path / "keypoint_targets.md").read_text()
    assert "| 2 | on | fused | cpu |" in summary and "| 0 | keypoints |" in summary
    assert (tmp_path / "keypoint_targets.png").is_file()


def test_pixel_weight_benchmark_writes_csv_summary_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    result = run_benchmark(
        "bench_pixel_weight.py", "--device", "cpu", "--batch", "2", "--repeats", "2", "--warmup", "1",
        "--buffer-sets", "1", "--out", str(tmp_path),
    )
    rows = read_csv(tmp_path / "bench_pixel_weight.csv")
    providers = ("mmpose", "compile", "reference", "cpu")
    assert {(row["weights"], row["provider"]) for row in rows} == {
        (weights, provider) for weights in ("mask", "pixel", "plane") for provider in providers
    }
    for row in rows:
        assert row["batch"] == "2" and row["grad_weight"] == "0" and float(row["median_ms"]) > 0
        assert bool(row["speedup_vs_mmpose"]) == (row["provider"] != "mmpose")
        assert bool(row["pct_copy_bw"]) == (row["provider"] == "cpu")
    summary = (tmp_path / "pixel_weight.md").read_text()
    assert summary.startswith("# Per-pixel weights") and "bench_pixel_weight.py --device cpu" in summary
    assert "| 2 | mask | cpu |" in summary and "| 2 | plane | mmpose |" in summary
    assert "| 2 | pixel | reference |" in result.stdout
    assert (tmp_path / "pixel_weight.png").stat().st_size > 0
