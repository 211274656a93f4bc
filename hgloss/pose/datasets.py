"""Top-down pose datasets: one person crop per sample, with heatmap targets or the keypoints they come from.

`coco_records` reads COCO keypoint annotations through pycocotools (training and validation from
ground-truth boxes, or validation from a detection results file); `mpii_records` reads MPII in
HRNet's json layout. Both return `PersonRecord`s and a `LoadReport` that counts what was left out
on purpose (crowd annotations, persons with no labelled joint, boxes of no area, low-scoring
detections). Bad data raises a clear error naming the file and the record: a missing image, an
unreadable or inconsistent annotation file, a wrong number of keypoints.

`TopDownDataset` crops and augments as HRNet does (random scale, rotation, flip with joint
swapping, half-body). All randomness of a sample comes from its `aug_seed`, so that
`dataset[(index, aug_seed, replayed)]` returns the same crop every time: this is how replay
self-distillation (hgloss.distill.ReplayBatchSampler) shows a sample again exactly as before.
"""

import contextlib
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .transforms import (
    COCO_FLIP_PAIRS,
    PIXEL_STD,
    affine_points,
    box_to_center_scale,
    flip_points,
    warp_image,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COCO_UPPER_BODY = tuple(range(11))  # face, shoulders, elbows, wrists
MPII_UPPER_BODY = (7, 8, 9, 10, 11, 12, 13, 14, 15)  # thorax, neck, head and arms


@dataclass
class PersonRecord:
    """One person to crop: where, and (for training and evaluation) the labelled joints."""

    image_path: str
    image_id: int
    center: np.ndarray  # (2,) box centre in image pixels
    scale: np.ndarray  # (2,) box size / PIXEL_STD, padded
    joints: np.ndarray  # (K, 3): x, y, visibility (0 unlabelled, 1 labelled); zeros for detections
    score: float = 1.0  # detection score, 1 for ground-truth boxes
    area: float = 0.0  # box area in image pixels, for OKS-NMS
    source: str = ""  # the record's origin, for error messages: file and annotation id


@dataclass
class LoadReport:
    """What a loader read and what it left out on purpose, by reason."""

    records: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def __str__(self) -> str:
        left_out = ", ".join(f"{count} {reason}" for reason, count in sorted(self.dropped.items())) or "nothing"
        return f"{self.records} persons; left out: {left_out}"


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Calls write(temporary) and renames the temporary file to `path`: a reader, in this process
    or another writing the same file at the same time, sees the old file or the whole new one.
    The temporary file is named after this process; an interrupted write (an exception, Ctrl-C)
    removes it and leaves `path` as it was."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _read_json(path: str, what: str):
    """The parsed file, or an error naming it: `what` says which file it is meant to be."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid json: {error}") from None


def _numbers(source: str, name: str, value, count: int | None = None, positive: bool = False) -> np.ndarray:
    """`value` (a number, or a list of `count` numbers when count is given) as finite float64
    numbers, or a ValueError naming the record, the field and the bad entry. json reads NaN and
    Infinity, and a quoted "256", without complaint."""
    items = value if isinstance(value, list) else [value]
    if count is not None and len(items) != count:
        raise ValueError(f"{source}: {name} must be {count} finite numbers, got {value!r}")
    for index, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item) or (
            positive and item <= 0
        ):
            entry = f"{name}[{index}]" if isinstance(value, list) else name
            raise ValueError(f"{source}: {entry} must be a finite number{' > 0' if positive else ''}, got {item!r}")
    return np.asarray(items, dtype=np.float64)


def _field(source: str, record, name: str, kind: type | tuple[type, ...]):
    """record[name] when the record is a dict holding a value of `kind`; else a ValueError
    naming the record and the field."""
    if not isinstance(record, dict) or name not in record:
        raise ValueError(f"{source} lacks {name!r}")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise ValueError(f"{source}: {name} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def _check_coco_records(annotation_file: str, data: dict) -> None:
    """Every image and annotation field the loaders read, checked with the record named, so that
    a bad file gives one clear error instead of a KeyError deep in pycocotools or numpy."""
    image_ids = set()
    for number, image in enumerate(data["images"]):
        source = f"{annotation_file}, image {number}"
        image_ids.add(_field(source, image, "id", int))
        source = f"{annotation_file}, image {image['id']}"
        _field(source, image, "file_name", str)
        for name in ("width", "height"):
            _numbers(source, name, _field(source, image, name, (int, float)), positive=True)
    for number, annotation in enumerate(data["annotations"]):
        named = isinstance(annotation, dict) and isinstance(annotation.get("id"), int)
        source = f"{annotation_file}, annotation {annotation['id'] if named else f'number {number}'}"
        _field(source, annotation, "id", int)
        _field(source, annotation, "image_id", int)
        _numbers(source, "bbox", _field(source, annotation, "bbox", list), count=4)
        _numbers(source, "keypoints", _field(source, annotation, "keypoints", list))
        if annotation["image_id"] not in image_ids:
            raise ValueError(f"{source} refers to image {annotation['image_id']}, which the file does not list")


def _load_coco(annotation_file: str):
    """A pycocotools COCO object, with unreadable files and bad records reported by name."""
    from pycocotools.coco import COCO

    data = _read_json(annotation_file, "annotation file")
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
        raise ValueError(f"{annotation_file} is not a COCO annotation file (needs images, annotations, categories)")
    _check_coco_records(annotation_file, data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _image_path(image_dir: str, file_name: str, source: str) -> str:
    path = os.path.join(image_dir, file_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path} (needed by {source})")
    return path


def coco_records(
    annotation_file: str,
    image_dir: str,
    input_size: tuple[int, int] = (192, 256),
    detections: str | None = None,
    min_detection_score: float = 0.0,
    num_joints: int = 17,
) -> tuple[list[PersonRecord], LoadReport]:
    """The persons of a COCO keypoints file: one record per ground-truth person with at least one
    labelled joint (boxes cleaned as HRNet does), or, with `detections`, one per person detection
    of a COCO results file scoring at least `min_detection_score`. `input_size` is the crop's
    (width, height); the box is widened or heightened to its aspect ratio and padded 1.25x."""
    coco = _load_coco(annotation_file)
    aspect_ratio = input_size[0] / input_size[1]
    report = LoadReport()
    records = []
    if detections is not None:
        results = _read_json(detections, "detection file")
        for number, detection in enumerate(results):
            source = f"{detections}, detection {number}"
            _field(source, detection, "image_id", int)
            _field(source, detection, "category_id", int)
            _numbers(source, "bbox", _field(source, detection, "bbox", list), count=4)
            _numbers(source, "score", _field(source, detection, "score", (int, float)))
            if detection["category_id"] != 1:
                report.drop("detections of another category")
                continue
            if detection["score"] < min_detection_score:
                report.drop("detections under the score threshold")
                continue
            if detection["image_id"] not in coco.imgs:
                raise ValueError(f"{source} refers to image {detection['image_id']}, which {annotation_file} lacks")
            image = coco.imgs[detection["image_id"]]
            center, scale = box_to_center_scale(detection["bbox"], aspect_ratio)
            records.append(PersonRecord(
                _image_path(image_dir, image["file_name"], source), image["id"], center, scale,
                np.zeros((num_joints, 3), dtype=np.float32), float(detection["score"]),
                float(detection["bbox"][2] * detection["bbox"][3]), source,
            ))  # fmt: skip
        report.records = len(records)
        return records, report

    for image_id in sorted(coco.imgs):
        image = coco.imgs[image_id]
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)):
            source = f"{annotation_file}, annotation {annotation.get('id')}"
            keypoints = annotation.get("keypoints")
            if keypoints is None or len(keypoints) != 3 * num_joints:
                count = None if keypoints is None else len(keypoints)
                raise ValueError(f"{source} has {count} keypoint values, expected {3 * num_joints}")
            if annotation.get("iscrowd", 0):
                report.drop("crowd annotations")
                continue
            joints = np.asarray(keypoints, dtype=np.float32).reshape(num_joints, 3)
            if joints[:, 2].min() < 0:
                raise ValueError(f"{source} has a negative visibility: {joints[:, 2].tolist()}")
            if joints[:, 2].max() <= 0:
                report.drop("persons with no labelled joint")
                continue
            x, y, w, h = annotation["bbox"]
            x1, y1 = max(0.0, x), max(0.0, y)
            x2 = min(image["width"] - 1.0, x1 + max(0.0, w - 1))
            y2 = min(image["height"] - 1.0, y1 + max(0.0, h - 1))
            if annotation.get("area", 1.0) <= 0 or x2 < x1 or y2 < y1:
                report.drop("boxes of no area")
                continue
            center, scale = box_to_center_scale([x1, y1, x2 - x1, y2 - y1], aspect_ratio)
            joints[:, 2] = np.minimum(joints[:, 2], 1.0)
            records.append(PersonRecord(
                _image_path(image_dir, image["file_name"], source), image_id, center, scale, joints, 1.0,
                float(annotation.get("area", w * h)), source,
            ))  # fmt: skip
    report.records = len(records)
    return records, report


def mpii_records(annotation_file: str, image_dir: str, num_joints: int = 16) -> tuple[list[PersonRecord], LoadReport]:
    """The persons of an MPII annotation file in HRNet's json layout (image, center, scale,
    joints, joints_vis; MATLAB's 1-based pixels). As in HRNet, the centre moves down by 15 scale
    units and the scale is padded 1.25x; the box is square."""
    items = _read_json(annotation_file, "annotation file")
    if not isinstance(items, list):
        raise ValueError(f"{annotation_file} is not an MPII annotation list")
    records = []
    for number, item in enumerate(items):
        source = f"{annotation_file}, record {number}"
        _field(source, item, "image", str)
        center = _numbers(source, "center", _field(source, item, "center", list), count=2).astype(np.float32)
        scale = np.full(2, _numbers(source, "scale", _field(source, item, "scale", (int, float)), positive=True)[0],
                        dtype=np.float32)
        joints = np.asarray(item.get("joints", np.zeros((num_joints, 2))), dtype=np.float32)
        visible = np.asarray(item.get("joints_vis", np.zeros(num_joints)), dtype=np.float32)
        if joints.shape != (num_joints, 2) or visible.shape != (num_joints,):
            raise ValueError(
                f"{source} has joints {joints.shape} and joints_vis {visible.shape}, expected ({num_joints}, 2) "
                f"and ({num_joints},)"
            )
        if not (np.all(np.isfinite(joints)) and np.all(np.isfinite(visible))):
            raise ValueError(f"{source}: joints and joints_vis must be finite numbers")
        if visible.min(initial=0.0) < 0:
            raise ValueError(f"{source} has a negative joints_vis: {visible.tolist()}")
        if center[0] != -1:
            center[1] += 15 * scale[1]
            scale *= 1.25
        center -= 1
        labelled = np.concatenate([joints - 1, np.minimum(visible, 1)[:, None]], axis=1)
        records.append(PersonRecord(
            _image_path(image_dir, item["image"], source), number, center, scale, labelled.astype(np.float32),
            1.0, float((scale[0] * PIXEL_STD) ** 2), source,
        ))  # fmt: skip
    return records, LoadReport(records=len(records))


@dataclass
class Augmentation:
    """HRNet's training augmentation; `None` fields switch a part off."""

    scale_factor: float | None = 0.35
    rotation_factor: float | None = 45.0
    rotation_probability: float = 0.6
    flip: bool = True
    half_body_probability: float | None = 0.3
    half_body_min_joints: int = 8


TARGET_FORMS = ("heatmaps", "keypoints")


class TopDownDataset(torch.utils.data.Dataset):
    """Person crops with their targets: heatmaps, or the keypoints a loss paints them from.

    `dataset[index]` or `dataset[(index, aug_seed, replayed)]` returns a dict: "image" (3, h, w)
    float32, normalised with the ImageNet mean and std; the targets (see `targets`); "index",
    "replayed"; and, for evaluation, "center", "scale", "image_id", "score", "area" and "joints"
    (K, 3) in image pixels. Without an aug_seed (plain indices), the sample is not augmented.

    Args:
        records: the persons, from coco_records or mpii_records.
        codec: e.g. codecs.MSRAHeatmap; its input_size is the crop's (width, height), its
            crop_transform cuts the crop, and it encodes the joints into the targets.
        augmentation: None for evaluation crops.
        flip_pairs, upper_body: the skeleton's left/right pairs and upper-body joints.
        cache_images: keep every decoded image in memory after its first read (in each loader
            worker), for small sets read every epoch; a 256x256 image takes 192 KiB.
        targets: "heatmaps": "target" (K, H, W) float32 and "target_weight" (K,) float32 from
            `codec.encode`. "keypoints": "keypoints" (K, 2) float64 in heatmap pixels and
            "keypoint_weight" (K,) float32 from `codec.encode_keypoints`, for
            hgloss.keypoint_heatmap_loss, which paints the same heatmaps inside the loss; no
            heatmap is painted here, which spares the loader workers most of their time.
    """

    def __init__(self, records: list[PersonRecord], codec, augmentation: Augmentation | None = None,
                 flip_pairs=COCO_FLIP_PAIRS, upper_body=COCO_UPPER_BODY, cache_images: bool = False,
                 targets: str = "heatmaps") -> None:
        if targets not in TARGET_FORMS:
            raise ValueError(f"targets must be one of {list(TARGET_FORMS)}, got {targets!r}")
        self.records = records
        self.codec = codec
        self.targets = targets
        self.input_size = codec.input_size
        self.augmentation = augmentation
        self.flip_pairs = flip_pairs
        self.upper_body = set(upper_body)
        self._cache: dict[str, np.ndarray] | None = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.records)

    def _read_image(self, record: PersonRecord) -> np.ndarray:
        """The record's image as (H, W, 3) uint8 RGB; read-only when it comes from the cache."""
        if self._cache is not None and record.image_path in self._cache:
            return self._cache[record.image_path]
        try:
            with Image.open(record.image_path) as opened:
                image = np.asarray(opened.convert("RGB"))
        except (OSError, ValueError) as error:
            raise OSError(f"cannot read image {record.image_path} (needed by {record.source}): {error}") from None
        if self._cache is not None:
            image.flags.writeable = False
            self._cache[record.image_path] = image
        return image

    def _half_body(self, joints: np.ndarray, rng: np.random.Generator):
        """HRNet's half-body crop: the box of the upper or the lower body's labelled joints."""
        labelled = np.nonzero(joints[:, 2] > 0)[0]
        upper = [j for j in labelled if j in self.upper_body]
        lower = [j for j in labelled if j not in self.upper_body]
        chosen = upper if (rng.random() < 0.5 and len(upper) > 2) or len(lower) <= 2 else lower
        if len(chosen) < 2:
            return None
        points = joints[chosen, :2]
        low, high = points.min(axis=0), points.max(axis=0)
        center, scale = box_to_center_scale([low[0], low[1], high[0] - low[0], high[1] - low[1]],
                                            self.input_size[0] / self.input_size[1], padding=1.5)
        return center, scale

    def __getitem__(self, item):
        index, aug_seed, replayed = item if isinstance(item, tuple) else (item, None, False)
        record = self.records[int(index)]
        image = self._read_image(record)
        joints = record.joints.copy()
        center, scale, rotation = record.center.copy(), record.scale.copy(), 0.0
        config = self.augmentation
        if config is not None and aug_seed is not None:
            # Every draw happens whether or not it is used, so that a seed always means the same crop.
            rng = np.random.default_rng(int(aug_seed))
            half_body_draw, scale_draw, rotation_draw, rotation_gate, flip_gate = rng.random(), *rng.standard_normal(2), *rng.random(2)
            if (config.half_body_probability is not None and half_body_draw < config.half_body_probability
                    and (joints[:, 2] > 0).sum() > config.half_body_min_joints):
                half = self._half_body(joints, rng)
                if half is not None:
                    center, scale = half
            if config.scale_factor is not None:
                factor = config.scale_factor
                scale = scale * np.clip(scale_draw * factor + 1, 1 - factor, 1 + factor)
            if config.rotation_factor is not None and rotation_gate <= config.rotation_probability:
                rotation = float(np.clip(rotation_draw * config.rotation_factor, -2 * config.rotation_factor,
                                         2 * config.rotation_factor))
            if config.flip and flip_gate <= 0.5:
                image = image[:, ::-1]
                width = image.shape[1]
                joints = flip_points(joints, width, self.flip_pairs)
                center = center.copy()
                center[0] = width - center[0] - 1
        matrix = self.codec.crop_transform(center, scale, rotation)
        crop = warp_image(np.ascontiguousarray(image), matrix, self.input_size)
        crop_joints = affine_points(joints[:, :2], matrix)
        if self.targets == "heatmaps":
            heatmaps, weights = self.codec.encode(crop_joints, joints[:, 2])
            targets = {"target": torch.from_numpy(np.asarray(heatmaps, dtype=np.float32)),
                       "target_weight": torch.from_numpy(np.asarray(weights, dtype=np.float32))}
        else:
            keypoints, weights = self.codec.encode_keypoints(crop_joints, joints[:, 2])
            targets = {"keypoints": torch.from_numpy(keypoints), "keypoint_weight": torch.from_numpy(weights)}
        pixels = torch.from_numpy(crop.astype(np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return {
            "image": (pixels - mean) / std,
            **targets,
            "index": int(index),
            "replayed": bool(replayed),
            "center": torch.from_numpy(record.center.astype(np.float32)),
            "scale": torch.from_numpy(record.scale.astype(np.float32)),
            "image_id": record.image_id,
            "score": record.score,
            "area": record.area,
            "joints": torch.from_numpy(record.joints.astype(np.float32)),
        }
