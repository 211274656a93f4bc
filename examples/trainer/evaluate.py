"""Validation: COCO AP (or MPII PCKh), heatmap PCK, and how the predicted heatmaps look."""

import numpy as np
import torch
from torch import nn

from hgloss.pose import codecs, evaluation

from .config import TrainConfig
from .data import Batch, DataSplit
from .distributed import gather_lists, rank


def headline_metric(metrics: dict[str, float]) -> tuple[str, float]:
    """The metric that ranks checkpoints: COCO AP, else MPII PCKh@0.5, else heatmap PCK."""
    for name in ("AP", "PCKh@0.5", "pck"):
        if name in metrics:
            return name, metrics[name]
    raise ValueError(f"no headline metric among {sorted(metrics)}")


def target_pck(output: torch.Tensor, batch: Batch, codec) -> tuple[np.ndarray, float, int]:
    """evaluation.heatmap_pck of the (B, K, H, W) heatmaps `output` against the batch's targets.
    Keypoint targets give the same as the codec's heatmaps would, without painting them: the PCK
    reads only the target heatmaps' peaks and which are painted (codec.heatmap_peaks), so maps
    of a single 1 at those peaks stand in for them."""
    output = output.detach().float().cpu()
    if batch.keypoints is None:
        return evaluation.heatmap_pck(output, batch.target.cpu())
    peaks, painted = codec.heatmap_peaks(batch.keypoints.cpu().numpy(), batch.keypoint_weight.cpu().numpy())
    peak_maps = np.zeros(output.shape, dtype=np.float32)
    samples, joints = np.nonzero(painted)
    peak_maps[samples, joints, peaks[samples, joints, 1], peaks[samples, joints, 0]] = 1.0
    return evaluation.heatmap_pck(output, peak_maps)


@torch.no_grad()
def evaluate(model: nn.Module, loader, config: TrainConfig, device: torch.device, split: DataSplit,
             codec) -> tuple[dict[str, float], dict]:
    """Metrics on the validation loader, and the first batch's crops and predictions for the plots.

    The metrics: "pck" (HRNet's PCK on heatmaps); COCO's AP, AP50, ... with an annotation file, or
    MPII's PCKh with head sizes; and the heatmap-shape metrics of `heatmap_shape_metrics`.
    """
    model.eval()
    parts = {name: [] for name in ("image_ids", "keypoints", "box_scores", "areas", "joints", "scales", "shapes",
                                   "pck_hits", "pck_counts")}
    first_batch = None
    for batch in loader:
        images = batch.image.to(device)
        output = model(images).float()
        if config.flip_test:
            flipped = model(torch.flip(images, dims=[3])).float()
            output = (output + codecs.flip_back(flipped, split.flip_pairs, shift=codec.flip_shift)) / 2
        output = output.cpu()
        coords, scores = codecs.decode(output, refine=config.decode, kernel=config.decode_kernel)
        in_image = codec.heatmap_to_image(coords, batch.center.numpy(), batch.scale.numpy())
        parts["image_ids"] += batch.image_id.tolist()
        parts["keypoints"].append(np.concatenate([in_image, scores[..., None]], axis=2))
        parts["box_scores"] += batch.score.tolist()
        parts["areas"] += batch.area.tolist()
        parts["joints"].append(batch.joints.numpy())
        parts["scales"].append(batch.scale.numpy())
        parts["shapes"].append(evaluation.gaussian_fit(output.double().numpy()))
        _, target_weight = batch.targets
        if target_weight.sum() > 0:
            _, mean, counted = target_pck(output, batch, codec)
            parts["pck_hits"].append(mean * counted)
            parts["pck_counts"].append(counted)
        if first_batch is None:
            stride = config.input_size[0] / config.heatmap_size[0]
            first_batch = {"images": batch.image, "heatmaps": output, "keypoints": coords * stride, "scores": scores}
    parts = gather_lists(parts)
    pck_count = sum(parts["pck_counts"])
    metrics: dict[str, float] = {"pck": sum(parts["pck_hits"]) / pck_count if pck_count else float("nan")}
    if rank() == 0 and parts["keypoints"]:
        keypoints, joints = np.concatenate(parts["keypoints"]), np.concatenate(parts["joints"])
        metrics.update(heatmap_shape_metrics(keypoints, joints, np.concatenate(parts["scales"]), parts["shapes"],
                                             config.heatmap_size[0]))
        if split.annotation_file is not None:
            results = evaluation.coco_results(np.asarray(parts["image_ids"]), keypoints,
                                              np.asarray(parts["box_scores"]), np.asarray(parts["areas"]))
            metrics.update(evaluation.evaluate_coco(results, split.annotation_file))
        elif split.head_sizes is not None:
            pckh = evaluation.pckh(keypoints[..., :2], joints[..., :2], joints[..., 2] > 0,
                                   split.head_sizes[np.asarray(parts["image_ids"])])
            metrics.update({key: float(value) for key, value in pckh.items() if np.ndim(value) == 0})
    model.train()
    return metrics, first_batch


def heatmap_shape_metrics(keypoints: np.ndarray, truth: np.ndarray, scales: np.ndarray, shapes: list[dict],
                          heatmap_width: int) -> dict[str, float]:
    """How the predicted heatmaps of the labelled joints look, averaged over those joints: their
    residual against the best-fitting isotropic Gaussian ("gaussian_residual"), its sigma
    ("fitted_sigma"), the peak value ("peak"), and the localisation error in heatmap pixels."""
    labelled = truth[..., 2] > 0
    if not labelled.any():
        return {}
    fits = {key: np.concatenate([shape[key] for shape in shapes]) for key in ("residual", "sigma", "peak")}
    errors = evaluation.localisation_error(keypoints[..., :2], truth[..., :2], scales, heatmap_width)
    return {"gaussian_residual": float(fits["residual"][labelled].mean()),
            "fitted_sigma": float(fits["sigma"][labelled].mean()),
            "peak": float(fits["peak"][labelled].mean()),
            "localisation_error": float(errors[labelled].mean())}
