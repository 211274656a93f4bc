"""The reference trainer: a short run with each loss choice, resume after a stop, a 2-process
DistributedDataParallel run, and configuration errors. Tiny synthetic sets and 64x96 crops keep
each run to seconds."""

import json
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch

from hgloss.distill import ReplayDistillation, SeededBatchSampler, SnapshotDistillation
from hgloss.pose import codecs
from trainer import Trainer, evaluate, load_config
from trainer.data import DataSplit, load_split
from trainer.loop import build_distillation, build_model
from trainer.loss import PoseLoss

from conftest import ROOT

TINY = {
    "synthetic_train": 10, "synthetic_val": 4, "input_size": [64, 96], "heatmap_size": [16, 24], "sigma": 1.0,
    "model": "simplebaseline_res18_small", "epochs": 1, "batch_size": 4, "workers": 0, "log_every": 1,
    "progress": False, "lr_steps": [1],
}  # fmt: skip


def run(tmp_path, name, **settings):
    config = load_config(None, {**TINY, "data_root": str(tmp_path / "data"), "out": str(tmp_path / name), **settings})
    return Trainer(config).fit(), tmp_path / name


def read_log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "settings",
    [{"loss": "mse"}, {"loss": "hg", "stencil": "sobel"}, {"loss": "hg+sd", "distill": "replay"},
     {"loss": "hg+sd", "distill": "snapshot"}],
    ids=["mse", "hg", "hg+sd-replay", "hg+sd-snapshot"],
)
def test_a_short_run_with_each_loss_writes_every_output(tmp_path, settings):
    metrics, out = run(tmp_path, "run", **settings)
    for name in ("config.yaml", "log.jsonl", "last.pt", "best.pt", "metrics.json", "curves.png", "predictions.png"):
        assert (out / name).is_file(), name
    assert 0.0 <= metrics["AP"] <= 1.0 and json.loads((out / "metrics.json").read_text()) == metrics
    assert 0.0 <= metrics["gaussian_residual"] <= 1.0 and metrics["fitted_sigma"] > 0
    assert metrics["localisation_error"] >= 0 and metrics["peak"] == metrics["peak"]
    records = read_log(out)
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(r["loss"] > 0 and r["loss"] == r["loss"] for r in train)
    assert [r["kind"] for r in records].count("val") == 1
    checkpoint = torch.load(out / "last.pt", weights_only=False)
    assert checkpoint["run"]["next_epoch"] == 1 and checkpoint["config"]["loss"] == settings["loss"]
    assert not list(out.glob("*.tmp")), "a checkpoint was left half-written"


def test_resume_continues_exactly(tmp_path):
    settings = {"loss": "hg+sd", "distill": "replay", "epochs": 3, "eval_every": 3, "lr_steps": [2]}
    _, straight = run(tmp_path, "straight", **settings)
    run(tmp_path, "stopped", **{**settings, "epochs": 1})
    config = load_config(None, {**TINY, **settings, "data_root": str(tmp_path / "data"), "out": str(tmp_path / "stopped")})
    Trainer(config, resume="auto").fit()
    losses = lambda folder: [(r["step"], r["loss"], r["lr"]) for r in read_log(folder) if r["kind"] == "train"]  # noqa: E731
    assert losses(tmp_path / "stopped") == losses(straight)
    resumed = torch.load(tmp_path / "stopped" / "last.pt", weights_only=False)["model"]
    uninterrupted = torch.load(straight / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted)


def test_the_gradient_term_switches_on_at_grad_start_epoch():
    config = load_config(None, {**TINY, "loss": "hg", "grad_weight": 2.0, "grad_start_epoch": 3})
    criterion = PoseLoss(config)
    seen = []
    for epoch in range(5):
        criterion.set_epoch(epoch)
        seen.append(criterion.criterion.grad_weight)
    assert seen == [0.0, 0.0, 0.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="grad_start_epoch must be an integer >= 0, got -1"):
        load_config(None, {"grad_start_epoch": -1})
    with pytest.raises(ValueError, match=r"gradient_form must be one of \['components', 'magnitude'\]"):
        load_config(None, {"gradient_form": "norm"})


@pytest.mark.parametrize("loss, distill", [("mse", "replay"), ("hg", "snapshot"), ("hg+sd", "replay"),
                                           ("hg+sd", "snapshot")])
def test_build_distillation_alone(loss, distill):
    config = load_config(None, {**TINY, "loss": loss, "distill": distill, "batch_size": 4})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    distillation, sampler = build_distillation(config, optimizer, torch.nn.Linear(1, 1), dataset_size=10)
    if loss != "hg+sd":
        assert distillation is None and type(sampler) is SeededBatchSampler
    elif distill == "replay":
        assert isinstance(distillation, ReplayDistillation) and distillation.batch_sampler is sampler
    else:
        assert isinstance(distillation, SnapshotDistillation) and type(sampler) is SeededBatchSampler
    assert len(sampler) >= 3 and sampler.seed == config.seed


def test_load_split_and_build_model_alone(tmp_path):
    config = load_config(None, {**TINY, "data_root": str(tmp_path / "data")})
    split = load_split(config)
    assert isinstance(split, DataSplit) and split.num_joints == 17 and split.train and split.val
    assert split.annotation_file.endswith("person_keypoints_val.json") and split.head_sizes is None
    model = build_model(config, split.num_joints, torch.device("cpu"))
    assert model(torch.zeros(1, 3, 96, 64)).shape == (1, 17, 24, 16)
    with pytest.raises(ValueError, match="but heatmap_size is 12x16"):
        build_model(load_config(None, {**TINY, "heatmap_size": [12, 16]}), 17, torch.device("cpu"))


def test_cached_images_give_the_same_samples(tmp_path):
    config = load_config(None, {**TINY, "data_root": str(tmp_path / "data"), "out": str(tmp_path / "out")})
    plain = Trainer(config).train_set
    cached = Trainer(load_config(None, {**TINY, "data_root": str(tmp_path / "data"), "out": str(tmp_path / "out"),
                                        "cache_images": True})).train_set
    for item in [(0, 11, False), (1, 12, False), (0, 11, False)]:  # the repeat comes from the cache
        first, second = plain[item], cached[item]
        assert torch.equal(first["image"], second["image"]) and torch.equal(first["keypoints"], second["keypoints"])
    assert len(cached._cache) == len({cached.records[index].image_path for index in (0, 1)})
    assert not next(iter(cached._cache.values())).flags.writeable


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    marker = tmp_path / "code-ran"
    _, out = run(tmp_path, "run", loss="hg")
    checkpoint = torch.load(out / "last.pt", weights_only=True)  # what the trainer writes loads safely
    checkpoint["run"] = RunsCodeWhenUnpickled(marker)
    torch.save(checkpoint, out / "last.pt")
    config = load_config(None, {**TINY, "loss": "hg", "data_root": str(tmp_path / "data"), "out": str(out)})
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        Trainer(config, resume="auto")
    assert not marker.exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_ddp_run(tmp_path):
    flags = [f"--{key.replace('_', '-')}={','.join(map(str, value)) if isinstance(value, list) else value}"
             for key, value in TINY.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               os.path.join(ROOT, "examples", "train_pose.py"), *flags, "--loss", "hg+sd",
               "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "ddp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "2 process(es)" in result.stderr
    assert "AP=" in result.stdout
    _, single = run(tmp_path, "single", loss="hg+sd")
    last_step = lambda folder: max(r["step"] for r in read_log(folder) if r["kind"] == "train")  # noqa: E731
    # Each rank trains on its half of the data: fewer iterations than one process over all of it.
    assert last_step(tmp_path / "ddp") < last_step(single)


def test_dark_decoding_blurs_with_the_size_matched_to_sigma_unless_one_is_set(tmp_path, monkeypatch):
    assert load_config(None, {**TINY, "sigma": 1.0}).decode_kernel == 5
    assert load_config(None, {**TINY, "sigma": 2.0}).decode_kernel == 11
    assert load_config(None, {**TINY, "sigma": 1.0, "dark_kernel": 11}).decode_kernel == 11
    kernels, decode = [], codecs.decode

    def recording_decode(heatmaps, refine="dark", kernel=11):
        kernels.append((refine, kernel))
        return decode(heatmaps, refine=refine, kernel=kernel)

    monkeypatch.setattr(evaluate.codecs, "decode", recording_decode)
    run(tmp_path, "run", loss="mse", sigma=1.0)
    assert kernels and set(kernels) == {("dark", 5)}
    kernels.clear()
    run(tmp_path, "pinned", loss="mse", sigma=1.0, dark_kernel=3)
    assert kernels and set(kernels) == {("dark", 3)}


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "examples", "configs"))))
def test_shipped_configs_load(name):
    config = load_config(os.path.join(ROOT, "examples", "configs", name), {})
    assert config.epochs >= 1 and config.out


def test_configuration_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"unknown settings \['learning_rate'\]"):
        load_config(None, {"learning_rate": 0.1})
    with pytest.raises(ValueError, match=r"loss must be one of \['mse', 'hg', 'hg\+sd'\], got 'l1'"):
        load_config(None, {"loss": "l1"})
    with pytest.raises(ValueError, match="dataset 'coco' needs train_images"):
        load_config(None, {"dataset": "coco"})
    mismatched = load_config(None, {**TINY, "heatmap_size": [12, 16], "data_root": str(tmp_path / "data"),
                                    "out": str(tmp_path / "bad")})
    with pytest.raises(ValueError, match=r"turns 64x96 crops into 16x24 heatmaps, but heatmap_size is 12x16"):
        Trainer(mismatched)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_pose.py"), "--loss", "l1"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "train_pose.py: error: loss must be one of" in result.stderr
