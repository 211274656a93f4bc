"""The trainer's plots (examples/trainer/plots.py): the training-curve and prediction figures are written, readable PNGs of the
expected layout, and bad inputs raise ValueError naming what is wrong."""

import json
import re

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib", reason="the pose plots need matplotlib (pip install hgloss[pose])")
Image = pytest.importorskip("PIL.Image", reason="reading the plots back needs pillow")

from trainer.plots import _interpolation_matrix, plot_predictions, plot_training_curves  # noqa: E402

BATCH, JOINTS, CROP_HEIGHT, CROP_WIDTH, MAP_HEIGHT, MAP_WIDTH = 3, 17, 256, 192, 64, 48


def _write_log(path, epochs: int = 4, steps_per_epoch: int = 25) -> None:
    rng = np.random.default_rng(0)
    lines = ['{"kind": "config", "model": "hrnet_w32"}']
    step = 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            step += 1
            loss = 1e-3 * np.exp(-step / 50) + 1e-4 * rng.uniform(1.0, 2.0)
            lines.append(json.dumps({"kind": "train", "epoch": epoch, "step": step, "loss": loss,
                                     "lr": 1e-3 if epoch < 3 else 1e-4, "samples_per_s": 250.0}))
        metrics = {"AP": 0.1 + 0.15 * epoch, "AP50": 0.3 + 0.15 * epoch, "AR": 0.5}
        lines.append(json.dumps({"kind": "val", "epoch": epoch, "step": step, **metrics}))
    path.write_text("\n".join(lines) + "\n")


def _read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def _inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    keypoints = torch.rand(batch, JOINTS, 2, generator=generator) * torch.tensor([CROP_WIDTH - 1, CROP_HEIGHT - 1])
    visibility = torch.randint(0, 3, (batch, JOINTS, 1), generator=generator).float()
    return {
        "images": torch.randn(batch, 3, CROP_HEIGHT, CROP_WIDTH, generator=generator),
        "heatmaps": torch.rand(batch, JOINTS, MAP_HEIGHT, MAP_WIDTH, generator=generator),
        "keypoints": keypoints,
        "scores": torch.rand(batch, JOINTS, generator=generator),
        "target": torch.cat([keypoints + 3.0, visibility], dim=-1),
    }


def test_training_curves_png_has_two_panels_and_content(tmp_path):
    log = tmp_path / "train.jsonl"
    _write_log(log)
    out = plot_training_curves(log, tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png" and out.is_file()
    pixels = _read_png(out)
    height, width = pixels.shape[:2]
    assert width > 1.5 * height  # two panels side by side
    assert pixels.var() > 0


def test_training_curves_invalid_json_names_file_and_line(tmp_path):
    log = tmp_path / "train.jsonl"
    _write_log(log, epochs=1, steps_per_epoch=2)
    lines = log.read_text().splitlines()
    lines.insert(2, '{"kind": "train", "step": 3, "loss": ')
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{log}, line 3")):
        plot_training_curves(log, tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def test_training_curves_without_train_records(tmp_path):
    log = tmp_path / "val_only.jsonl"
    log.write_text(json.dumps({"kind": "val", "epoch": 0, "step": 10, "AP": 0.5}) + "\n")
    with pytest.raises(ValueError, match="no train records"):
        plot_training_curves(log, tmp_path / "curves.png")


def test_predictions_one_row_per_sample(tmp_path):
    three = _inputs(BATCH)
    out = plot_predictions(**three, out_path=tmp_path / "three.png")
    assert out == tmp_path / "three.png"
    pixels = _read_png(out)
    assert pixels.var() > 0
    # numpy inputs, without ground truth, are drawn too
    one = {name: value[:1].numpy() for name, value in _inputs(1, seed=1).items() if name != "target"}
    height_one = _read_png(plot_predictions(**one, out_path=tmp_path / "one.png")).shape[0]
    height_two = _read_png(plot_predictions(**three, out_path=tmp_path / "two.png", max_samples=2)).shape[0]
    height_three = pixels.shape[0]
    row = height_two - height_one
    assert row > 0 and height_three - height_one == 2 * row


@pytest.mark.parametrize(
    "name, shape",
    [
        ("images", (BATCH, 1, CROP_HEIGHT, CROP_WIDTH)),
        ("heatmaps", (BATCH + 1, JOINTS, MAP_HEIGHT, MAP_WIDTH)),
        ("keypoints", (BATCH, JOINTS, 3)),
        ("scores", (BATCH, JOINTS - 1)),
        ("target", (BATCH, JOINTS, 2)),
    ],
)
def test_predictions_wrong_shape_names_argument_and_shape(tmp_path, name, shape):
    inputs = _inputs(BATCH)
    inputs[name] = torch.zeros(shape)
    spelled = "(" + ", ".join(str(size) for size in shape) + ")"
    with pytest.raises(ValueError, match=rf"^{name} must have shape .*got {re.escape(spelled)}$"):
        plot_predictions(**inputs, out_path=tmp_path / "predictions.png")


def test_predictions_skeleton_outside_joints(tmp_path):
    inputs = _inputs(1)
    with pytest.raises(ValueError, match="skeleton"):
        plot_predictions(**inputs, out_path=tmp_path / "predictions.png", skeleton=((1, JOINTS + 1),))


def test_heatmap_upsampling_puts_heatmap_pixel_at_stride_multiple():
    # As with MSRAHeatmap, heatmap pixel i lies on crop pixel i * stride (here 4).
    matrix = _interpolation_matrix(MAP_WIDTH, CROP_WIDTH)
    assert matrix.shape == (CROP_WIDTH, MAP_WIDTH)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    for source in (0, 10, MAP_WIDTH - 1):
        peak = np.zeros(MAP_WIDTH)
        peak[source] = 1.0
        assert np.argmax(matrix @ peak) == 4 * source
