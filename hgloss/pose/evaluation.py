"""Pose evaluation: COCO keypoint AP with HRNet's rescoring and OKS-NMS, MPII PCKh, and the heatmap
accuracy that HRNet reports during training.

COCO: ``coco_results`` turns top-down predictions (one per detected person box) into COCO results
the way HRNet does, rescoring each instance by its confident keypoints and removing duplicates by
OKS-NMS, and ``evaluate_coco`` scores them with pycocotools' COCOeval.

MPII: ``pckh`` with head sizes from ``head_sizes_from_boxes`` and ``load_mpii_head_boxes``.

Training accuracy: ``heatmap_pck``, hgloss's normalisation by default or HRNet's ``accuracy`` exactly.
Where hgloss follows HRNet and where it departs, with the tests that check it: ``docs/pose-conventions.md``.

Arrays may be numpy arrays, torch tensors or nested sequences; every function checks the shapes
of its inputs and raises ValueError naming the argument and the shape it got.
"""

import contextlib
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .checks import checked_array, checked_number
from .transforms import PIXEL_STD

__all__ = [
    "COCO_SIGMAS",
    "COCO_STAT_NAMES",
    "coco_results",
    "evaluate_coco",
    "head_sizes_from_boxes",
    "heatmap_pck",
    "load_mpii_head_boxes",
    "oks",
    "oks_nms",
    "pckh",
    "rescore",
]

# Per-keypoint OKS sigmas of the 17 COCO keypoints, in the COCO keypoint order (as in pycocotools).
COCO_SIGMAS = (
    np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89])
    / 10.0
)
# It is every function's default argument, so it must not be changed in place.
COCO_SIGMAS.setflags(write=False)

# Names of the ten numbers in COCOeval.stats for iouType="keypoints", in that order.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")

# MPII's head size is this fraction of the head box diagonal.
_MPII_HEAD_SIZE_FACTOR = 0.6

def _checked_sigmas(sigmas: Any, sizes: dict[str, int]) -> np.ndarray:
    array = checked_array("sigmas", sigmas, ("K",), sizes)
    if not np.all(np.isfinite(array) & (array > 0)):
        raise ValueError(f"sigmas must be finite and > 0, got {array.tolist()}")
    return array


def _oks_to_candidates(
    reference: np.ndarray, candidates: np.ndarray, areas: np.ndarray, sigmas: np.ndarray
) -> np.ndarray:
    """OKS of each candidate against the reference over all K joints.

    reference (K, 3), candidates (M, K, 3), areas (M,), sigmas (K,) -> (M,). Only the x and y
    columns are used.
    """
    if sigmas.size == 0:
        return np.zeros(len(candidates))
    variances = (2 * sigmas) ** 2
    squared_distances = ((candidates[..., :2] - reference[:, :2]) ** 2).sum(axis=-1)
    # np.spacing(1) keeps zero-area instances finite, as in HRNet and pycocotools.
    exponents = squared_distances / variances / (areas[:, None] + np.spacing(1)) / 2
    return np.exp(-exponents).mean(axis=1)


def oks(keypoints_a: Any, keypoints_b: Any, area: float, sigmas: Any = COCO_SIGMAS) -> float:
    """Object keypoint similarity of candidate b against reference a, over all joints.

    ``mean_k exp(-d_k^2 / (2 * area * (2 * sigma_k)^2))`` with ``d_k`` the distance between the
    k-th joints: HRNet's ``oks_iou`` without a visibility threshold, so the third column (visibility
    or score) of both is ignored and every joint counts.

    Args:
        keypoints_a: (K, 3) reference keypoints [x, y, visibility or score].
        keypoints_b: (K, 3) candidate keypoints, same layout.
        area: the object scale, in squared pixels (HRNet uses the mean area of the two instances).
        sigmas: (K,) per-joint OKS sigmas.

    Returns:
        The OKS in [0, 1]; 0.0 when K is 0.
    """
    sizes: dict[str, int] = {}
    reference = checked_array("keypoints_a", keypoints_a, ("K", 3), sizes)
    candidate = checked_array("keypoints_b", keypoints_b, ("K", 3), sizes)
    sigma_array = _checked_sigmas(sigmas, sizes)
    area_value = checked_number("area", area, minimum=0.0)
    return float(_oks_to_candidates(reference, candidate[None], np.array([area_value]), sigma_array)[0])


def oks_nms(instances: Sequence[Mapping[str, Any]], threshold: float = 0.9, sigmas: Any = COCO_SIGMAS) -> list[int]:
    """HRNet's greedy OKS non-maximum suppression over the instances of one image.

    Takes instances in HRNet's order, ``np.argsort(scores)[::-1]`` (decreasing score; numpy's
    default sort is not stable, and among tied scores this order usually puts the later instance
    first), keeps each one that is not suppressed, and suppresses the remaining instances whose OKS
    to it is above ``threshold``. The OKS of a pair uses the mean of their areas.

    Args:
        instances: dicts with "keypoints" (K, 3), "score" (float) and "area" (float).
        threshold: OKS above which a lower-scored instance is dropped.
        sigmas: (K,) per-joint OKS sigmas.

    Returns:
        Indices into ``instances`` of the kept ones, in the order they were kept.
    """
    threshold = checked_number("threshold", threshold)
    sizes: dict[str, int] = {}
    keypoints, scores, areas = [], [], []
    for index, instance in enumerate(instances):
        name = f"instances[{index}]"
        if not isinstance(instance, Mapping) or not {"keypoints", "score", "area"} <= instance.keys():
            raise ValueError(f"{name} must be a dict with 'keypoints', 'score' and 'area', got {instance!r}")
        keypoints.append(checked_array(f"{name}['keypoints']", instance["keypoints"], ("K", 3), sizes))
        scores.append(checked_number(f"{name}['score']", instance["score"]))
        areas.append(checked_number(f"{name}['area']", instance["area"], minimum=0.0))
    if not instances:
        return []
    sigma_array = _checked_sigmas(sigmas, sizes)
    keypoint_array, score_array, area_array = np.stack(keypoints), np.array(scores), np.array(areas)

    order = np.argsort(score_array)[::-1]
    kept: list[int] = []
    while order.size > 0:
        best, rest = order[0], order[1:]
        kept.append(int(best))
        overlaps = _oks_to_candidates(
            keypoint_array[best], keypoint_array[rest], (area_array[best] + area_array[rest]) / 2, sigma_array
        )
        order = rest[overlaps <= threshold]
    return kept


def rescore(keypoint_scores: Any, box_score: float, threshold: float = 0.2) -> float:
    """HRNet's instance score: the mean of the keypoint scores above ``threshold`` (0 when none
    is), times the score of the person box.

    Args:
        keypoint_scores: (K,) confidence of each predicted keypoint.
        box_score: the person detector's score for the box the keypoints were predicted in.
        threshold: keypoint scores at or below it are left out of the mean.
    """
    scores = checked_array("keypoint_scores", keypoint_scores, ("K",), {})
    box_score = checked_number("box_score", box_score)
    threshold = checked_number("threshold", threshold)
    confident = scores[scores > threshold]
    return (float(confident.mean()) if confident.size else 0.0) * box_score


def coco_results(
    image_ids: Any,
    keypoints: Any,
    box_scores: Any,
    areas: Any,
    nms_threshold: float | None = 0.9,
    rescore_threshold: float = 0.2,
    sigmas: Any = COCO_SIGMAS,
) -> list[dict[str, Any]]:
    """COCO keypoint results from top-down predictions, post-processed as HRNet does.

    Each instance is rescored with ``rescore``; then, per image, ``oks_nms`` removes duplicates
    (skipped when ``nms_threshold`` is None).

    Args:
        image_ids: (N,) integer COCO image id of each instance.
        keypoints: (N, K, 3) [x, y, keypoint score] in image pixels.
        box_scores: (N,) person detector score of each instance's box.
        areas: (N,) area of each instance, in squared pixels (HRNet uses the box area).
        nms_threshold: OKS threshold of the NMS, or None for no NMS.
        rescore_threshold: keypoint score threshold of ``rescore``.
        sigmas: (K,) per-joint OKS sigmas for the NMS; unused without NMS.

    Returns:
        Dicts {"image_id": int, "category_id": 1, "keypoints": 3K floats [x1, y1, s1, x2, ...],
        "score": float}, ready for json or ``evaluate_coco``. Images come in the order they first
        appear in ``image_ids``; within an image, instances come in NMS kept order (decreasing
        score), or in input order without NMS.
    """
    sizes: dict[str, int] = {}
    id_array = checked_array("image_ids", image_ids, ("N",), sizes, dtype=None)
    if id_array.size and not (np.issubdtype(id_array.dtype, np.integer) or _is_integral(id_array)):
        raise ValueError(f"image_ids must be integers, got {id_array.dtype} values {id_array[:5].tolist()}...")
    keypoint_array = checked_array("keypoints", keypoints, ("N", "K", 3), sizes)
    box_score_array = checked_array("box_scores", box_scores, ("N",), sizes)
    area_array = checked_array("areas", areas, ("N",), sizes)
    rescore_threshold = checked_number("rescore_threshold", rescore_threshold)
    if nms_threshold is not None:
        nms_threshold = checked_number("nms_threshold", nms_threshold)
        sigma_array = _checked_sigmas(sigmas, sizes)

    indices_by_image: dict[int, list[int]] = {}
    for index, image_id in enumerate(id_array.tolist()):
        indices_by_image.setdefault(int(image_id), []).append(index)

    results = []
    for image_id, indices in indices_by_image.items():
        instances = [
            {
                "keypoints": keypoint_array[index],
                "score": rescore(keypoint_array[index, :, 2], box_score_array[index], rescore_threshold),
                "area": area_array[index],
            }
            for index in indices
        ]
        kept = range(len(instances)) if nms_threshold is None else oks_nms(instances, nms_threshold, sigma_array)
        for position in kept:
            results.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "keypoints": keypoint_array[indices[position]].ravel().tolist(),
                    "score": instances[position]["score"],
                }
            )
    return results


def _is_integral(array: np.ndarray) -> bool:
    try:
        as_float = array.astype(np.float64)
    except (TypeError, ValueError):
        return False
    return bool(np.all(np.isfinite(as_float) & (as_float == np.round(as_float))))


def _checked_result(index: int, result: Any) -> dict[str, Any]:
    """A validated copy of one result with only the fields COCOeval needs: loadRes adds fields to
    the dicts it gets, and it would take a result with a "bbox" field for a box result."""
    name = f"results[{index}]"
    required = {"image_id", "category_id", "keypoints", "score"}
    if not isinstance(result, Mapping) or not required <= result.keys():
        raise ValueError(
            f"{name} must be a dict with 'image_id', 'category_id', 'keypoints' and 'score', got {result!r}"
        )
    for field in ("image_id", "category_id"):
        if isinstance(result[field], bool) or not isinstance(result[field], Integral):
            raise ValueError(f"{name}['{field}'] must be an int, got {result[field]!r}")
    keypoints = checked_array(f"{name}['keypoints']", result["keypoints"], ("3K",), {})
    if keypoints.size == 0 or keypoints.size % 3:
        raise ValueError(f"{name}['keypoints'] must hold 3K numbers [x1, y1, s1, ...], got shape {keypoints.shape}")
    return {
        "image_id": int(result["image_id"]),
        "category_id": int(result["category_id"]),
        "keypoints": keypoints.tolist(),
        "score": checked_number(f"{name}['score']", result["score"]),
    }


def evaluate_coco(
    results: Sequence[Mapping[str, Any]], ground_truth: "str | os.PathLike[str] | COCO"
) -> dict[str, float]:
    """COCO keypoint AP and AR of ``results`` with pycocotools' COCOeval, without its printing.

    Args:
        results: COCO keypoint results, as made by ``coco_results``.
        ground_truth: the path of a COCO keypoint annotation file, or a loaded pycocotools COCO.

    Returns:
        {name: value} for the names in ``COCO_STAT_NAMES`` ("AP", "AP50", ..., "ARl"): COCOeval's
        ``stats``, where -1 means the ground truth has no person of that size. All zeros when
        ``results`` is empty.

    Raises:
        ValueError: a result is malformed, or names an image id that is not in the ground truth.
    """
    checked = [_checked_result(index, result) for index, result in enumerate(results)]
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(ground_truth, COCO):
            coco = ground_truth
        elif isinstance(ground_truth, (str, os.PathLike)):
            coco = COCO(os.fspath(ground_truth))
        else:
            raise ValueError(f"ground_truth must be a path or a pycocotools COCO, got {type(ground_truth).__name__}")
    unknown = sorted({result["image_id"] for result in checked} - set(coco.getImgIds()))
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise ValueError(f"results name image ids that are not in the ground truth: {shown}")
    if not checked:
        return dict.fromkeys(COCO_STAT_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        detections = coco.loadRes(checked)
        evaluator = COCOeval(coco, detections, iouType="keypoints")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(COCO_STAT_NAMES, evaluator.stats)}


def pckh(
    predictions: Any,
    ground_truth: Any,
    visible: Any,
    head_sizes: Any,
    thresholds: Sequence[float] = (0.5, 0.1),
) -> dict[str, float | np.ndarray]:
    """MPII PCKh: the fraction of visible joints predicted within ``threshold * head size`` of the
    ground truth (a distance equal to the bound counts as correct).

    Args:
        predictions: (N, K, 2) predicted [x, y] in image pixels.
        ground_truth: (N, K, 2) ground-truth [x, y].
        visible: (N, K) whether each ground-truth joint is visible; only visible joints count.
        head_sizes: (N,) head size of each person, > 0 (see ``head_sizes_from_boxes``).
        thresholds: fractions of the head size to score at.

    Returns:
        For each threshold t, with name f"PCKh@{t:g}" (e.g. "PCKh@0.5"):
        ``name`` -> the mean of the per-joint rates over the joints with at least one visible
        instance (NaN when no joint is visible), and ``name + "_per_joint"`` -> (K,) the rate of
        each joint, NaN for a joint that is never visible. Rates are fractions in [0, 1].
    """
    sizes: dict[str, int] = {}
    predicted = checked_array("predictions", predictions, ("N", "K", 2), sizes)
    target = checked_array("ground_truth", ground_truth, ("N", "K", 2), sizes)
    visible_mask = checked_array("visible", visible, ("N", "K"), sizes, dtype=bool)
    heads = checked_array("head_sizes", head_sizes, ("N",), sizes)
    if not np.all(np.isfinite(heads) & (heads > 0)):
        raise ValueError(f"head_sizes must be finite and > 0, got min {heads.min()}")
    threshold_values = [checked_number(f"thresholds[{i}]", t, positive=True) for i, t in enumerate(thresholds)]

    # A NaN prediction has a NaN distance, which fails every comparison: it counts as wrong.
    distances = np.linalg.norm(predicted - target, axis=-1)
    visible_counts = visible_mask.sum(axis=0)
    ever_visible = visible_counts > 0
    scores: dict[str, float | np.ndarray] = {}
    for threshold in threshold_values:
        correct = (distances <= threshold * heads[:, None]) & visible_mask
        per_joint = np.full(visible_counts.shape, np.nan)
        per_joint[ever_visible] = correct.sum(axis=0)[ever_visible] / visible_counts[ever_visible]
        name = f"PCKh@{threshold:g}"
        scores[name] = float(per_joint[ever_visible].mean()) if ever_visible.any() else math.nan
        scores[f"{name}_per_joint"] = per_joint
    return scores


def head_sizes_from_boxes(head_boxes: Any) -> np.ndarray:
    """MPII head sizes: 0.6 times the diagonal of each head box.

    Args:
        head_boxes: (N, 4) head boxes [x1, y1, x2, y2].

    Returns:
        (N,) head sizes in pixels.
    """
    boxes = checked_array("head_boxes", head_boxes, ("N", 4), {})
    return _MPII_HEAD_SIZE_FACTOR * np.hypot(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def load_mpii_head_boxes(path: "str | os.PathLike[str]") -> np.ndarray:
    """MPII head boxes from a json file or from HRNet's ``gt_valid.mat``.

    Args:
        path: a json file holding a list of [x1, y1, x2, y2], or a ``.mat`` file with the key
            "headboxes_src" of shape (2, 2, N) (corner, [x, y], person), read with scipy.

    Returns:
        (N, 4) head boxes [x1, y1, x2, y2].

    Raises:
        ImportError: a .mat file is given and scipy is not installed.
        ValueError: the file does not hold boxes of that layout.
    """
    path = os.fspath(path)
    if str(path).lower().endswith(".mat"):
        try:
            from scipy.io import loadmat
        except ImportError as error:
            raise ImportError(
                f"reading MPII head boxes from {path!r} needs scipy (pip install scipy); or convert the boxes to a "
                "json file holding a list of [x1, y1, x2, y2]"
            ) from error
        contents = loadmat(path)
        if "headboxes_src" not in contents:
            raise ValueError(f"{path!r} has no 'headboxes_src' entry")
        corners = checked_array(f"'headboxes_src' in {path!r}", contents["headboxes_src"], (2, 2, "N"), {})
        # corners[0] is (x1, y1) and corners[1] is (x2, y2), each (2, N).
        return np.concatenate([corners[0].T, corners[1].T], axis=1)
    with open(path, encoding="utf-8") as file:
        boxes = json.load(file)
    return checked_array(f"the head boxes in {path!r}", boxes, ("N", 4), {})


def _peak_rows_cols(heatmaps: np.ndarray) -> np.ndarray:
    """(N, K, H, W) -> (N, K, 2) [row, column] of each heatmap's maximum (the first one on ties)."""
    batch, joints = heatmaps.shape[:2]
    height, width = heatmaps.shape[2:]
    flat_peaks = heatmaps.reshape(batch, joints, height * width).argmax(axis=-1)
    return np.stack([flat_peaks // width, flat_peaks % width], axis=-1)


def _hrnet_max_preds(heatmaps: np.ndarray) -> np.ndarray:
    """HRNet's ``get_max_preds``: (N, K, H, W) -> (N, K, 2) [x, y] of each heatmap's maximum (the first
    one on ties), (0, 0) where the maximum is <= 0."""
    batch, joints = heatmaps.shape[:2]
    peaks = _peak_rows_cols(heatmaps)[..., ::-1].astype(np.float64)
    positive = heatmaps.reshape(batch, joints, -1).max(axis=-1) > 0
    return np.where(positive[..., None], peaks, 0.0)


_HEATMAP_PCK_CONVENTIONS = ("hgloss", "hrnet")


def heatmap_pck(
    predicted: Any, target: Any, threshold: float = 0.5, convention: str = "hgloss"
) -> tuple[np.ndarray, float, int]:
    """PCK between the peaks (argmax) of predicted and target heatmaps: the accuracy HRNet reports
    during training, by hgloss's normalisation or HRNet's.

    A joint of a sample is correct when its normalised peak distance is below ``threshold``.

    - ``convention="hgloss"`` (ours, the default): row offsets are divided by H / 10 and column
      offsets by W / 10, each axis by its own size; a joint of a sample counts where its target
      heatmap's maximum is > 0.
    - ``convention="hrnet"``: HRNet's ``accuracy(output, target, hm_type='gaussian', thr=threshold)``
      exactly. Both peaks come from ``get_max_preds``, which puts a peak whose maximum is <= 0 at
      (0, 0); HRNet's norm ``[H, W] / 10`` is applied to ``(x, y)``, so x (column) offsets are divided
      by H / 10 and y (row) offsets by W / 10, swapped unless the maps are square; and a joint of a
      sample counts only where its target peak has x > 1 and y > 1, so targets in the first two rows
      or columns are never counted.

    Args:
        predicted: (N, K, H, W) predicted heatmaps, numpy or torch.
        target: (N, K, H, W) target heatmaps.
        threshold: normalised distance below which a joint is correct.
        convention: "hgloss" or "hrnet".

    Returns:
        (per_joint, mean, counted): per_joint (K,) the fraction correct of each joint's counted
        samples, -1 for a joint with none; mean the mean of per_joint over the joints with counted
        samples (0.0 when none has); counted the number of such joints (HRNet's ``cnt``).
    """
    if convention not in _HEATMAP_PCK_CONVENTIONS:
        raise ValueError(f"convention must be 'hgloss' or 'hrnet', got {convention!r}")
    sizes: dict[str, int] = {}
    predicted_maps = checked_array("predicted", predicted, ("N", "K", "H", "W"), sizes)
    target_maps = checked_array("target", target, ("N", "K", "H", "W"), sizes)
    threshold = checked_number("threshold", threshold)
    batch, joints, height, width = predicted_maps.shape
    if height == 0 or width == 0:
        raise ValueError(f"predicted must have H, W >= 1, got shape {predicted_maps.shape}")

    normaliser = np.array([height, width]) / 10
    if convention == "hrnet":
        predicted_xy, target_xy = _hrnet_max_preds(predicted_maps), _hrnet_max_preds(target_maps)
        distances = np.linalg.norm(predicted_xy / normaliser - target_xy / normaliser, axis=-1)
        counted = (target_xy[..., 0] > 1) & (target_xy[..., 1] > 1)
    else:
        offsets = (_peak_rows_cols(predicted_maps) - _peak_rows_cols(target_maps)) / normaliser
        distances = np.linalg.norm(offsets, axis=-1)
        counted = target_maps.reshape(batch, joints, height * width).max(axis=-1) > 0
    correct = (distances < threshold) & counted
    counts = counted.sum(axis=0)
    has_counted = counts > 0
    per_joint = np.full(joints, -1.0)
    per_joint[has_counted] = correct.sum(axis=0)[has_counted] / counts[has_counted]
    num_counted = int(has_counted.sum())
    mean = float(per_joint[has_counted].mean()) if num_counted else 0.0
    return per_joint, mean, num_counted


def gaussian_fit(heatmaps: Any, sigmas: Sequence[float] = tuple(np.geomspace(0.4, 6.0, 24)),
                 offsets: Sequence[float] = tuple(np.arange(-1.5, 1.51, 0.125))) -> dict[str, np.ndarray]:
    """The best-fitting isotropic Gaussian a * exp(-((x - x0)^2 + (y - y0)^2) / (2 s^2)) of every
    (..., H, W) heatmap, by least squares over a grid: the centre within 1.5 pixels of the
    plane's maximum in steps of 1/8 pixel, s over `sigmas`, the amplitude a solved exactly.

    Returns (...)-shaped arrays: "residual", the fraction of the plane's energy sum P^2 that the
    Gaussian leaves unexplained (0 for a Gaussian, 1 for a plane with nothing Gaussian in it);
    "sigma", the fitted s in heatmap pixels; "peak", the plane's maximum.
    """
    planes = torch.as_tensor(np.asarray(heatmaps), dtype=torch.float64)
    if planes.ndim < 2 or planes.shape[-1] == 0 or planes.shape[-2] == 0:
        raise ValueError(f"heatmaps must have shape (..., H, W) with H, W >= 1, got shape {tuple(planes.shape)}")
    lead = planes.shape[:-2]
    height, width = planes.shape[-2:]
    planes = planes.reshape(-1, height, width)
    flat_peak = planes.flatten(1).argmax(dim=1)
    peak_row, peak_col = (flat_peak // width).double(), (flat_peak % width).double()
    shifts = torch.tensor(offsets, dtype=torch.float64)
    centre_x = peak_col[:, None] + shifts  # (N, C) candidate centres
    centre_y = peak_row[:, None] + shifts
    xs = torch.arange(width, dtype=torch.float64)
    ys = torch.arange(height, dtype=torch.float64)
    energy = planes.pow(2).sum(dim=(1, 2))
    best = torch.full_like(energy, math.inf)
    best_sigma = torch.zeros_like(energy)
    for sigma in sigmas:
        # The Gaussian is separable: g = gx(x) gy(y), so <P, g> = gy^T P gx for every centre pair.
        gx = torch.exp(-((xs[None, :, None] - centre_x[:, None, :]) ** 2) / (2 * sigma**2))  # (N, W, C)
        gy = torch.exp(-((ys[None, :, None] - centre_y[:, None, :]) ** 2) / (2 * sigma**2))  # (N, H, C)
        projection = torch.einsum("nhw,nwa,nhb->nba", planes, gx, gy)  # (N, C_y, C_x)
        norm = gy.pow(2).sum(dim=1)[:, :, None] * gx.pow(2).sum(dim=1)[:, None, :]
        # With the best amplitude a = <P, g> / <g, g>, the squared error is |P|^2 - <P, g>^2 / <g, g>.
        error = (energy[:, None, None] - projection.pow(2) / norm).flatten(1).min(dim=1).values
        better = error < best
        best = torch.where(better, error, best)
        best_sigma = torch.where(better, torch.full_like(best_sigma, sigma), best_sigma)
    residual = torch.where(energy > 0, best.clamp(min=0) / energy.clamp(min=1e-300), torch.ones_like(energy))
    return {
        "residual": residual.reshape(lead).numpy(),
        "sigma": best_sigma.reshape(lead).numpy(),
        "peak": planes.flatten(1).max(dim=1).values.reshape(lead).numpy(),
    }


def localisation_error(predicted: Any, truth: Any, scales: Any, heatmap_width: int) -> np.ndarray:
    """Distances between predicted and true keypoints (N, K, 2), in image pixels, converted to
    heatmap pixels of crops of the given (N, 2) box scales (box size / PIXEL_STD): the decoding
    error as the network sees it, comparable across person sizes."""
    predicted, truth = np.asarray(predicted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    if predicted.shape != truth.shape or predicted.ndim != 3 or predicted.shape[2] != 2:
        raise ValueError(f"predicted and truth must both have shape (N, K, 2), got {predicted.shape} and {truth.shape}")
    pixels_per_heatmap_pixel = scales[:, 0] * PIXEL_STD / heatmap_width
    return np.linalg.norm(predicted - truth, axis=2) / pixels_per_heatmap_pixel[:, None]
