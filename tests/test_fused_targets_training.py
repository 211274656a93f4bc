"""Training with fused targets: the data loader hands the loss keypoints and the loss paints the
codec's heatmaps (hgloss.keypoint_heatmap_loss). The codec's keypoints with that loss equal its
heatmaps with hgloss.heatmap_gradient_loss; the dataset paints nothing; the training-step PCK
from keypoints equals heatmap_pck on the codec's heatmaps; and a training run gives the same
losses and metrics either way."""

import itertools
import json

import numpy as np
import pytest
import torch

import hgloss
from hgloss.distill import SeededBatchSampler
from hgloss.pose import codecs, datasets, evaluation
from trainer import Trainer, load_config
from trainer.data import build_codec, build_datasets, collate, load_split
from trainer.evaluate import target_pck
from trainer.loop import build_model
from trainer.loss import PoseLoss

TINY = {
    "synthetic_train": 8, "synthetic_val": 4, "input_size": [64, 96], "heatmap_size": [16, 24], "sigma": 1.0,
    "model": "simplebaseline_res18_small", "epochs": 1, "batch_size": 4, "workers": 0, "log_every": 1,
    "progress": False, "lr_steps": [1], "flip_test": False,
}  # fmt: skip

CODECS = [codecs.MSRAHeatmap, codecs.UDPHeatmap]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One synthetic set for the module's runs (generating it takes longer than a run)."""
    return str(tmp_path_factory.mktemp("data"))


def crop_keypoints(codec, count, rng):
    """(count, 2) crop-pixel keypoints inside the heatmap, on its border and outside it, and
    (count,) 0/1 visibility, about a quarter 0. Outside, with r = codec.radius, the Gaussian
    window reaches one column or row of the heatmap, ends exactly at 0 (the weight is kept, the
    map is 0), or misses (the weight becomes 0), on each side."""
    width, height = codec.heatmap_size
    r = codec.radius
    heatmap_keypoints = np.stack([rng.uniform(-0.5, width - 0.5, count), rng.uniform(-0.5, height - 0.5, count)], 1)
    border = [[0.0, 3.2], [width - 1.0, 5.0], [2.0, height - 1.0], [0.0, 0.0], [width - 1.0, height - 1.0]]
    reaching = [[-r - 0.8, 4.0], [width - 1 + r + 0.4, 6.0], [3.0, -r - 0.8], [5.0, height - 1 + r + 0.3]]
    ending_at_0 = [[-r - 1.6, 4.0], [6.0, -r - 1.9]]
    missing = [[-r - 2.6, 4.0], [width + r - 0.4, 6.0], [3.0, -r - 2.9], [5.0, height + r + 0.6]]
    fixed = np.array(border + reaching + ending_at_0 + missing)
    heatmap_keypoints[: len(fixed)] = fixed
    visible = (rng.random(count) > 0.25).astype(np.float64)
    return heatmap_keypoints * codec.stride, visible


# ------------------------------------------------------------------------------------------------
# The codec and the loss


@pytest.mark.parametrize("codec_class", CODECS, ids=["msra", "udp"])
@pytest.mark.parametrize("sigma", [2.0, 1.5])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_encode_keypoints_with_the_keypoint_loss_equals_encode_with_the_heatmap_loss(codec_class, sigma, backend):
    if backend not in hgloss.available_backends():
        pytest.skip(f"backend {backend!r} is not available")
    rng = np.random.default_rng(int(sigma * 10))
    codec = codec_class((64, 96), (16, 24), sigma)
    batch, joints = 3, 17
    heatmaps, weights, heatmap_keypoints, keypoint_weights = [], [], [], []
    for _ in range(batch):
        keypoints, visible = crop_keypoints(codec, joints, rng)
        encoded = codec.encode(keypoints, visible)
        heatmaps.append(encoded[0])
        weights.append(encoded[1])
        scaled, weight = codec.encode_keypoints(keypoints, visible)
        assert scaled.dtype == np.float64 and weight.dtype == np.float32
        np.testing.assert_array_equal(weight, visible.astype(np.float32))
        scaled[visible == 0] = np.nan  # never read where the weight is 0
        heatmap_keypoints.append(scaled)
        keypoint_weights.append(weight)
    heatmaps, weights = torch.from_numpy(np.stack(heatmaps)), torch.from_numpy(np.stack(weights))
    assert (weights == 0).sum() > (torch.from_numpy(np.stack(keypoint_weights)) == 0).sum(), "no window missed"
    heatmap_keypoints = torch.from_numpy(np.stack(heatmap_keypoints))
    keypoint_weights = torch.from_numpy(np.stack(keypoint_weights))
    pred = torch.rand(batch, joints, 24, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    teacher = torch.rand(pred.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for extra in ({}, {"teacher": teacher, "alpha": 0.3}, {"mse_weight": 0.5, "grad_weight": 0.0}):
        for reduction in ("mean", "none"):
            expected = hgloss.heatmap_gradient_loss(pred, heatmaps.double(), weights.double(), stencil="sobel",
                                                    reduction=reduction, backend=backend, **extra)
            fused = hgloss.keypoint_heatmap_loss(
                pred, heatmap_keypoints, keypoint_weights.double(), sigma=sigma, encoding=codec.encoding,
                stencil="sobel", reduction=reduction, backend=backend, **extra,
            )
            torch.testing.assert_close(fused, expected, rtol=0, atol=1e-12)


def test_encode_keypoints_checks_as_encode_does():
    codec = codecs.MSRAHeatmap((64, 96), (16, 24), 2.0)
    assert (codecs.MSRAHeatmap.encoding, codecs.UDPHeatmap.encoding) == ("msra", "udp")
    for keypoints, visible, message in [
        (np.zeros((3, 3)), np.ones(3), r"keypoints must have shape \(K, 2\)"),
        (np.zeros((3, 2)), np.ones(2), r"visible must have shape \(3,\)"),
        (np.zeros((3, 2)), [1.0, -1.0, 0.0], "visible must be finite and >= 0"),
        ([[np.nan, 0.0], [1.0, 1.0]], [1.0, 1.0], "keypoints of visible joints must be finite"),
    ]:
        for method in (codec.encode, codec.encode_keypoints):
            with pytest.raises(ValueError, match=message):
                method(keypoints, visible)


@pytest.mark.parametrize("codec_class", CODECS, ids=["msra", "udp"])
@pytest.mark.parametrize("sigma", [2.0, 1.5, 0.8])
def test_the_pck_from_keypoints_equals_heatmap_pck_on_the_codecs_heatmaps(codec_class, sigma):
    # Crops of 61x93 and 64x96 give strides of exactly 4 for both codecs, so that keypoints half
    # way between two heatmap pixels stay so: UDP's heatmap then has two equal maxima.
    input_size = (61, 93) if codec_class is codecs.UDPHeatmap else (64, 96)
    codec = codec_class(input_size, (16, 24), sigma)
    rng = np.random.default_rng(7)
    batch, joints = 6, 17
    keypoints, visible = zip(*(crop_keypoints(codec, joints, rng) for _ in range(batch)))
    keypoints, visible = np.stack(keypoints), np.stack(visible)
    halves = rng.random((batch, joints, 2)) < 0.3
    keypoints = np.where(halves, (np.floor(keypoints / codec.stride) + 0.5) * codec.stride, keypoints)
    visible[0, :4] = [0.3, 0.5, 0.7, 2.0]  # the codec's visibility rule: painted where > 0.5
    encoded = [codec.encode(keypoints[n], visible[n]) for n in range(batch)]
    heatmaps = torch.from_numpy(np.stack([maps for maps, _ in encoded]))
    scaled, weights = zip(*(codec.encode_keypoints(keypoints[n], visible[n]) for n in range(batch)))
    scaled, weights = np.stack(scaled), np.stack(weights)
    assert np.any(np.modf(scaled[weights > 0.5])[0] == 0.5), "no keypoint half way between two pixels"

    peaks, painted = codec.heatmap_peaks(scaled, weights)
    flat = heatmaps.flatten(2).argmax(-1).numpy()
    np.testing.assert_array_equal(painted, heatmaps.flatten(2).amax(-1).numpy() > 0)
    np.testing.assert_array_equal(peaks[painted], np.stack([flat % 16, flat // 16], -1)[painted])

    output = heatmaps + 0.3 * torch.rand(heatmaps.shape, generator=torch.Generator().manual_seed(2))
    fused = target_pck(output, collate_like(keypoints=torch.from_numpy(scaled), weights=torch.from_numpy(weights)),
                       codec)
    expected = evaluation.heatmap_pck(output, heatmaps)
    np.testing.assert_array_equal(fused[0], expected[0])
    assert fused[1:] == expected[1:] and 0 < expected[1] < 1


def collate_like(keypoints, weights):
    """A Batch with keypoint targets and nothing else target_pck reads."""
    batch, joints = weights.shape
    return collate([{"image": torch.zeros(3, 1, 1), "keypoints": keypoints[n], "keypoint_weight": weights[n],
                     "index": n, "replayed": False, "center": torch.zeros(2), "scale": torch.ones(2),
                     "image_id": n, "score": 1.0, "area": 1.0, "joints": torch.zeros(joints, 3)}
                    for n in range(batch)])


# ------------------------------------------------------------------------------------------------
# The dataset


def test_the_keypoint_dataset_paints_no_heatmap(data_root, monkeypatch):
    config = load_config(None, {**TINY, "data_root": data_root})
    split = load_split(config)
    codec = build_codec(config)
    painting = datasets.TopDownDataset(split.train, codec, datasets.Augmentation(), targets="heatmaps")
    painted = [painting[(index, 100 + index, False)] for index in range(3)]

    def refuse(*args):
        raise AssertionError("codec.encode was called")

    monkeypatch.setattr(type(codec), "encode", refuse)
    keypoint_set = datasets.TopDownDataset(split.train, codec, datasets.Augmentation(), targets="keypoints")
    for index, with_heatmaps in enumerate(painted):
        sample = keypoint_set[(index, 100 + index, False)]
        assert "target" not in sample and "target_weight" not in sample
        assert sample["keypoints"].shape == (17, 2) and sample["keypoints"].dtype == torch.float64
        assert sample["keypoint_weight"].dtype == torch.float32
        assert torch.equal(sample["image"], with_heatmaps["image"])
        # The sample's keypoints paint its heatmaps: the loss between them is 0 (float64 exactly).
        loss = hgloss.keypoint_heatmap_loss(
            with_heatmaps["target"][None].double(), sample["keypoints"][None], sample["keypoint_weight"][None],
            sigma=codec.sigma, encoding=codec.encoding, backend="reference", reduction="none",
        )
        assert torch.equal(loss, torch.zeros(1, 17, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"targets must be one of \['heatmaps', 'keypoints'\], got 'maps'"):
        datasets.TopDownDataset(split.train, codec, targets="maps")


def test_the_trainer_takes_keypoints_where_the_loss_can_paint_the_targets(data_root):
    settings = {**TINY, "data_root": data_root}
    assert load_config(None, settings).targets_in_loss
    assert not load_config(None, {**settings, "fused_targets": False}).targets_in_loss
    magnitude = load_config(None, {**settings, "loss": "hg", "gradient_form": "magnitude"})
    assert magnitude.fused_targets and not magnitude.targets_in_loss
    assert isinstance(PoseLoss(magnitude).criterion, hgloss.HeatmapGradientLoss)
    train_set, val_set = build_datasets(magnitude, load_split(magnitude), build_codec(magnitude))
    assert train_set.targets == val_set.targets == "heatmaps"


@pytest.mark.parametrize("kind", ["mse", "hg", "hg+sd"])
def test_the_trainers_loss_is_the_same_on_keypoints_as_on_heatmaps(kind):
    settings = {**TINY, "loss": kind, "stencil": "central", "grad_weight": 0.7, "sigma": 2.0, "codec": "udp"}
    fused, painted = (PoseLoss(load_config(None, {**settings, "fused_targets": fused})) for fused in (True, False))
    codec = build_codec(load_config(None, settings))
    rng = np.random.default_rng(3)
    keypoints, weights, heatmaps = [], [], []
    for _ in range(2):
        crop, visible = crop_keypoints(codec, 17, rng)
        visible *= rng.choice([0.6, 0.8, 1.0], 17)  # fractional, where the visibility rules agree (> 0.5)
        keypoints.append(codec.encode_keypoints(crop, visible)[0])
        maps, weight = codec.encode(crop, visible)
        heatmaps.append(maps)
        weights.append(weight)
    keypoints, weights, heatmaps = (torch.from_numpy(np.stack(array)) for array in (keypoints, weights, heatmaps))
    output = torch.rand(heatmaps.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    teacher, alpha = (torch.rand_like(output), 0.4) if kind == "hg+sd" else (None, None)
    weights = weights.double()
    torch.testing.assert_close(fused(output, keypoints, weights, teacher, alpha),
                               painted(output, heatmaps.double(), weights, teacher, alpha), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Training


def float64_losses(data_root, kind, fused_targets, steps=2):
    """Per-step losses of a float64 model trained by the trainer's loss on the trainer's data, and
    its weights after the steps. hg+sd takes the previous step's heatmaps as the teacher."""
    config = load_config(None, {**TINY, "loss": kind, "stencil": "sobel", "fused_targets": fused_targets,
                                "data_root": data_root})
    split = load_split(config)
    train_set, _ = build_datasets(config, split, build_codec(config))
    torch.manual_seed(0)
    model = build_model(config, split.num_joints, torch.device("cpu")).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    criterion = PoseLoss(config)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=SeededBatchSampler(len(train_set), 4, seed=0),
                                         collate_fn=collate)
    losses, teacher = [], None
    for batch in itertools.islice(loader, steps):
        assert (batch.keypoints is not None) == fused_targets and (batch.target is None) == fused_targets
        output = model(batch.image.double())
        target, target_weight = batch.targets
        loss = criterion(output, target, target_weight.double(), teacher, None if teacher is None else 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        teacher = output.detach() if kind == "hg+sd" else None
    return losses, [parameter.detach().clone() for parameter in model.parameters()]


@pytest.mark.parametrize("loss", ["mse", "hg+sd"])
def test_float64_training_steps_are_bit_identical_with_fused_targets(data_root, loss):
    fused_losses, fused_weights = float64_losses(data_root, loss, fused_targets=True)
    losses, weights = float64_losses(data_root, loss, fused_targets=False)
    assert fused_losses == losses and all(loss > 0 for loss in losses)
    assert all(torch.equal(fused, plain) for fused, plain in zip(fused_weights, weights))


def test_a_float32_run_gives_the_same_metrics_with_fused_targets(data_root, tmp_path):
    settings = {**TINY, "loss": "hg+sd", "data_root": data_root}
    runs = {}
    for fused_targets in (True, False):
        out = tmp_path / f"fused-{fused_targets}"
        metrics = Trainer(load_config(None, {**settings, "fused_targets": fused_targets, "out": str(out)})).fit()
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        runs[fused_targets] = metrics, [(r["loss"], r["pck"]) for r in log if r["kind"] == "train"]
    (fused_metrics, fused_log), (metrics, log) = runs[True], runs[False]
    # The fused targets are the codec's float32 heatmaps value for value, so only a fused backend
    # that sums in another order could differ, by float32 rounding (relative 1e-7 per step): that
    # moves the few-step model's keypoints by far less than the metrics' thresholds.
    assert [pck for _, pck in fused_log] == [pck for _, pck in log]
    np.testing.assert_allclose([loss for loss, _ in fused_log], [loss for loss, _ in log], rtol=1e-5)
    assert fused_metrics.keys() == metrics.keys()
    for name in ("AP", "pck"):
        assert fused_metrics[name] == pytest.approx(metrics[name], abs=1e-6), name
