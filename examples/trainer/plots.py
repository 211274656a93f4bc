"""Figures of a pose training run: its loss and metric curves, and predictions on person crops.

``plot_training_curves`` draws a JSON-lines training log (training loss and learning rate against
the step, validation metrics against the epoch); ``plot_predictions`` draws a batch of crops with
the predicted skeleton, the ground truth and the predicted heatmaps.

Figures are drawn with matplotlib's Agg renderer through ``matplotlib.figure.Figure`` and
``FigureCanvasAgg`` directly, so pyplot's global state and the caller's choice of backend are left
alone, and the plots work without a display.
"""

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from hgloss.pose.checks import checked_array
from hgloss.pose.datasets import IMAGENET_MEAN, IMAGENET_STD
from hgloss.pose.synthetic import SKELETON

__all__ = ["VALIDATION_METRICS", "plot_predictions", "plot_training_curves"]

# The validation metrics plotted, in this order, when a log has them.
VALIDATION_METRICS = ("AP", "AP50", "PCKh@0.5", "pck")

_DPI = 100
# The moving average of the training loss spans this fraction of the logged iterations.
_SMOOTHING_FRACTION = 0.05
# Colours of the person's left side, right side and the joints on neither side (the nose).
_LEFT_COLOUR = "tab:orange"
_RIGHT_COLOUR = "tab:blue"
_CENTRE_COLOUR = "tab:green"
_TARGET_COLOUR = "white"
# The crop under the heatmap overlay is shown at this brightness, so that the colour map stands out.
_DIMMED_BRIGHTNESS = 0.4
_OVERLAY_ALPHA = 0.6
# Inches of figure height per sample row in plot_predictions.
_ROW_HEIGHT = 3.0

PathLike = str | os.PathLike[str]


def _save(figure: Figure, out_path: PathLike) -> Path:
    """Render `figure` to a PNG at `out_path` (creating its folder) and release the figure."""
    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        FigureCanvasAgg(figure)
        figure.savefig(out_path, dpi=_DPI)
    finally:
        # A Figure refers to itself through its artists, so only the cyclic garbage collector would
        # free it; clearing drops the image arrays now.
        figure.clear()
    return out_path


# ---------------------------------------------------------------------------------------------------------------------
# Training curves


def _number(record: dict[str, Any], key: str, where: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key!r} must be a number, got {value!r}")
    return float(value)


def _read_log(log_path: Path) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The train and val records of a JSON-lines log, in file order, with their numbers as floats.

    Blank lines and records of other kinds are skipped; malformed lines raise ValueError naming the
    file and the line number.
    """
    train: list[dict[str, float]] = []
    val: list[dict[str, float]] = []
    with open(log_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{log_path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON: {error.msg}") from None
            if not isinstance(record, dict) or "kind" not in record:
                raise ValueError(f"{where} must be a JSON object with a 'kind' key, got {line.strip()[:80]!r}")
            if record["kind"] == "train":
                entry = {"step": _number(record, "step", where), "loss": _number(record, "loss", where)}
                if record.get("lr") is not None:
                    entry["lr"] = _number(record, "lr", where)
                train.append(entry)
            elif record["kind"] == "val":
                entry = {"epoch": _number(record, "epoch", where)}
                for metric in VALIDATION_METRICS:
                    if record.get(metric) is None:
                        continue
                    value = _number(record, metric, where)
                    if not 0.0 <= value <= 1.0 and math.isfinite(value):
                        raise ValueError(f"{where}: {metric!r} = {value} is outside [0, 1]; metrics are fractions")
                    entry[metric] = value
                val.append(entry)
    return train, val


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """(n,) centred mean of `values` (n,) over `window` points, over fewer points near the ends."""
    half = window // 2
    sums = np.concatenate([[0.0], np.cumsum(values)])
    index = np.arange(len(values))
    low = np.maximum(index - half, 0)
    high = np.minimum(index + half + 1, len(values))
    return (sums[high] - sums[low]) / (high - low)


def plot_training_curves(log_path: PathLike, out_path: PathLike) -> Path:
    """Plot a JSON-lines training log to a PNG with two panels side by side.

    Each line of the log is a JSON object with a "kind" key:

    - ``{"kind": "train", "epoch", "step", "loss", "lr", "samples_per_s"}``, one per logged
      iteration, "step" counting iterations over the whole run;
    - ``{"kind": "val", "epoch", "step", ...metrics}``, one per evaluation, the metrics being
      fractions in [0, 1].

    Records of other kinds and blank lines are skipped. Left panel: the training loss against the
    step, raw values faint and their moving average over about 5% of the iterations bold, on a
    log axis (linear when a loss is <= 0), with the learning rate as a step plot on a second y
    axis. Right panel: each metric of ``VALIDATION_METRICS`` present in the log against the epoch,
    on a y axis from 0 to 1.

    Args:
        log_path: the JSON-lines log.
        out_path: the PNG to write; its folder is created if needed.

    Returns:
        out_path, as a Path.

    Raises:
        ValueError: a line that is not a JSON object with a "kind" key, a train record without a
            numeric "step" and "loss", a val record without a numeric "epoch", a metric outside
            [0, 1] (each naming the file and the line number), or a log without train records.
    """
    log_path = Path(log_path)
    train, val = _read_log(log_path)
    if not train:
        raise ValueError(f"{log_path} has no train records (lines with \"kind\": \"train\")")

    figure = Figure(figsize=(13.0, 4.8), layout="constrained")
    figure.suptitle(f"Training log {log_path.name}")
    loss_axes, metric_axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": (1.4, 1.0)})

    steps = np.array([entry["step"] for entry in train])
    losses = np.array([entry["loss"] for entry in train])
    finite = np.isfinite(losses)
    window = max(1, round(_SMOOTHING_FRACTION * int(finite.sum())))
    loss_axes.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    if finite.any():
        smoothed = _moving_average(losses[finite], window)
        loss_axes.plot(steps[finite], smoothed, color="tab:blue", linewidth=2.2,
                       label=f"loss, moving average of {window}")
    if np.all(losses[finite] > 0):
        loss_axes.set_yscale("log")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss")
    loss_axes.grid(True, which="major", alpha=0.3)
    handles, labels = loss_axes.get_legend_handles_labels()

    with_lr = [entry for entry in train if "lr" in entry]
    if with_lr:
        lr_axes = loss_axes.twinx()
        loss_axes.set_title("Training loss and learning rate")
        lr_axes.step([entry["step"] for entry in with_lr], [entry["lr"] for entry in with_lr], where="post",
                     color="tab:red", linewidth=1.2, label="learning rate")
        lr_axes.set_ylabel("learning rate", color="tab:red")
        lr_axes.tick_params(axis="y", colors="tab:red")
        lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        lr_handles, lr_labels = lr_axes.get_legend_handles_labels()
        handles, labels = handles + lr_handles, labels + lr_labels
        legend_axes = lr_axes  # the axes drawn last, so that no line crosses the legend
    else:
        legend_axes = loss_axes
        loss_axes.set_title("Training loss")
    legend_axes.legend(handles, labels, loc="upper right", framealpha=0.9)

    metric_axes.set_title("Validation")
    metric_axes.set_xlabel("epoch")
    metric_axes.set_ylabel("metric")
    metric_axes.set_ylim(0.0, 1.0)
    metric_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    metric_axes.grid(True, alpha=0.3)
    present = [metric for metric in VALIDATION_METRICS if any(metric in entry for entry in val)]
    for metric in present:
        points = [(entry["epoch"], entry[metric]) for entry in val if metric in entry]
        epochs, values = zip(*points)
        metric_axes.plot(epochs, values, marker="o", label=metric)
    if present:
        metric_axes.legend(loc="lower right")
    else:
        metric_axes.text(0.5, 0.5, "no validation metrics in the log", transform=metric_axes.transAxes,
                         ha="center", va="center", color="gray")
    return _save(figure, out_path)


# ---------------------------------------------------------------------------------------------------------------------
# Predictions


def _joint_colours(joints: int, flip_pairs: Sequence[tuple[int, int]] | None) -> list[str]:
    """(K,) the colour of each joint's side."""
    if flip_pairs is None:
        # COCO's order: the nose, then left and right alternately (left_eye = 1, right_eye = 2, ...).
        return [_CENTRE_COLOUR if joint == 0 else _LEFT_COLOUR if joint % 2 else _RIGHT_COLOUR
                for joint in range(joints)]
    pairs = np.asarray(flip_pairs).reshape(-1, 2)
    if pairs.size and (pairs.min() < 0 or pairs.max() >= joints):
        raise ValueError(f"flip_pairs must be 0-based joint indices in [0, {joints}), got {pairs.tolist()}")
    colours = [_CENTRE_COLOUR] * joints
    for left, right in pairs:
        colours[int(left)], colours[int(right)] = _LEFT_COLOUR, _RIGHT_COLOUR
    return colours


def _interpolation_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) weights of linear interpolation that put source pixel ``i`` at target pixel
    ``i * target / source``, as the MSRA heatmap codec places heatmap pixels on the crop."""
    positions = np.clip(np.arange(target) * source / target, 0, source - 1)
    low = np.floor(positions).astype(np.int64)
    high = np.minimum(low + 1, source - 1)
    fraction = positions - low
    matrix = np.zeros((target, source))
    rows = np.arange(target)
    np.add.at(matrix, (rows, low), 1.0 - fraction)
    np.add.at(matrix, (rows, high), fraction)
    return matrix


def plot_predictions(
    images: Any,
    heatmaps: Any,
    keypoints: Any,
    scores: Any,
    out_path: PathLike,
    *,
    target: Any = None,
    skeleton: Sequence[tuple[int, int]] = SKELETON,
    flip_pairs: Sequence[tuple[int, int]] | None = None,
    max_samples: int = 8,
    score_threshold: float = 0.2,
) -> Path:
    """Plot predicted keypoints and heatmaps on their crops to a PNG, one row per sample.

    Left column: the crop with the predicted joints scoring above `score_threshold` and the limbs of
    `skeleton` between two such joints, the person's left side in orange, the right side in blue and
    the joints on neither side (the nose) in green; with `target`, the labelled ground-truth joints
    as small hollow white circles. Right column: the crop dimmed, under the maximum over joints of
    the heatmaps, upsampled to the crop (heatmap pixel ``i`` at crop pixel ``i * crop / heatmap
    size``, as with codecs.MSRAHeatmap), as a colour map on one scale for all rows, with its colour
    bar beside the first row. Arrays may be numpy arrays or torch tensors.

    Args:
        images: (N, 3, H, W) crops normalised with the ImageNet mean and std (datasets.IMAGENET_MEAN,
            IMAGENET_STD).
        heatmaps: (N, K, h, w) predicted heatmaps.
        keypoints: (N, K, 2) predicted (x, y) in crop pixels (integer = pixel centre).
        scores: (N, K) predicted confidences.
        out_path: the PNG to write; its folder is created if needed.
        target: optional (N, K, 3) ground truth (x, y, visibility) in crop pixels; joints with
            visibility > 0 are drawn.
        skeleton: limbs as 1-based joint pairs, COCO's by default.
        flip_pairs: 0-based (left, right) joint pairs that choose the colours; None for COCO's order
            (0 the nose, odd indices left, even indices right).
        max_samples: at most this many samples (the first ones) are drawn.
        score_threshold: joints scoring at most this are not drawn.

    Returns:
        out_path, as a Path.

    Raises:
        ValueError: an argument of the wrong shape (naming it and its shape), no samples,
            max_samples < 1, or skeleton or flip_pairs indices outside the K joints.
    """
    sizes: dict[str, int] = {}
    images = checked_array("images", images, ("N", 3, "H", "W"), sizes)
    heatmaps = checked_array("heatmaps", heatmaps, ("N", "K", "h", "w"), sizes)
    keypoints = checked_array("keypoints", keypoints, ("N", "K", 2), sizes)
    scores = checked_array("scores", scores, ("N", "K"), sizes)
    if target is not None:
        target = checked_array("target", target, ("N", "K", 3), sizes)
    if sizes["N"] == 0:
        raise ValueError("images must hold at least one sample, got shape (0, ...)")
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples must be an int >= 1, got {max_samples!r}")
    joints, height, width = sizes["K"], sizes["H"], sizes["W"]
    limbs = np.asarray(skeleton, dtype=np.int64).reshape(-1, 2) - 1
    if limbs.size and (limbs.min() < 0 or limbs.max() >= joints):
        raise ValueError(f"skeleton must be 1-based joint pairs in [1, {joints}], got {(limbs + 1).tolist()}")
    colours = _joint_colours(joints, flip_pairs)

    rows = min(sizes["N"], max_samples)
    mean = np.asarray(IMAGENET_MEAN).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD).reshape(3, 1, 1)
    crops = np.clip(images[:rows] * std + mean, 0.0, 1.0).transpose(0, 2, 3, 1)
    to_rows = _interpolation_matrix(sizes["h"], height)
    to_columns = _interpolation_matrix(sizes["w"], width)
    overlays = [to_rows @ heatmaps[n].max(axis=0) @ to_columns.T for n in range(rows)]
    low = min(0.0, min(float(np.nanmin(overlay)) for overlay in overlays))
    high = max(float(np.nanmax(overlay)) for overlay in overlays)
    if not high > low:  # a constant map still needs a non-empty colour scale
        high = low + 1.0

    panel_width = _ROW_HEIGHT * width / height
    figure = Figure(figsize=(2 * panel_width + 1.6, _ROW_HEIGHT * rows + 0.8), layout="constrained")
    # A third, narrow column holds the colour bar, so that the first row's panels keep the others' size.
    grid = figure.add_gridspec(rows, 3, width_ratios=(1.0, 1.0, 0.06))
    for n in range(rows):
        skeleton_axes, heatmap_axes = figure.add_subplot(grid[n, 0]), figure.add_subplot(grid[n, 1])
        skeleton_axes.imshow(crops[n])
        confident = (scores[n] > score_threshold) & np.all(np.isfinite(keypoints[n]), axis=1)
        for first, second in limbs:
            if confident[first] and confident[second]:
                limb_colour = colours[first] if colours[first] == colours[second] else _CENTRE_COLOUR
                skeleton_axes.plot(keypoints[n, [first, second], 0], keypoints[n, [first, second], 1],
                                   color=limb_colour, linewidth=2.0, solid_capstyle="round")
        shown = np.flatnonzero(confident)
        skeleton_axes.scatter(keypoints[n, shown, 0], keypoints[n, shown, 1], s=22, zorder=3,
                              c=[colours[joint] for joint in shown], edgecolors="black", linewidths=0.6)
        if target is not None:
            labelled = target[n, :, 2] > 0
            skeleton_axes.scatter(target[n, labelled, 0], target[n, labelled, 1], s=30, zorder=4,
                                  facecolors="none", edgecolors=_TARGET_COLOUR, linewidths=1.2)
        heatmap_axes.imshow(crops[n] * _DIMMED_BRIGHTNESS)
        overlay = heatmap_axes.imshow(overlays[n], cmap="inferno", alpha=_OVERLAY_ALPHA, vmin=low, vmax=high)
        if n == 0:
            figure.colorbar(overlay, cax=figure.add_subplot(grid[0, 2]), label="max over joints")
            skeleton_axes.set_title("predicted skeleton")
            heatmap_axes.set_title("predicted heatmaps")
        for panel in (skeleton_axes, heatmap_axes):
            # The crops' own frame, so that points off the crop do not stretch the panel.
            panel.set_xlim(-0.5, width - 0.5)
            panel.set_ylim(height - 0.5, -0.5)
            panel.set_xticks([])
            panel.set_yticks([])
        skeleton_axes.set_ylabel(f"sample {n}")

    legend = [
        Line2D([], [], color=_LEFT_COLOUR, marker="o", label="left side"),
        Line2D([], [], color=_RIGHT_COLOUR, marker="o", label="right side"),
        Line2D([], [], color=_CENTRE_COLOUR, marker="o", label="centre"),
    ]
    if target is not None:
        legend.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="none",
                             markeredgecolor="black", label="ground truth"))
    figure.legend(handles=legend, loc="outside upper center", ncols=len(legend), fontsize="small")
    return _save(figure, out_path)
