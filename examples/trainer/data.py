"""The trainer's data: the split (records and what evaluation needs), the codec, the datasets,
the batch as a named structure, and the loaders."""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from hgloss.pose import codecs, datasets, evaluation
from hgloss.pose.synthetic import write_synthetic_coco
from hgloss.pose.transforms import COCO_FLIP_PAIRS, MPII_FLIP_PAIRS

from .config import TrainConfig
from .distributed import barrier, rank


@dataclass(frozen=True)
class DataSplit:
    """The persons of a run and what evaluating on them needs."""

    train: list[datasets.PersonRecord]
    val: list[datasets.PersonRecord]
    train_report: datasets.LoadReport
    val_report: datasets.LoadReport
    annotation_file: str | None  # COCO keypoint annotations of val (COCO AP); None for MPII
    flip_pairs: tuple[tuple[int, int], ...]
    upper_body: tuple[int, ...]
    head_sizes: np.ndarray | None  # MPII head sizes per image (PCKh), when the head boxes are given

    @property
    def num_joints(self) -> int:
        return len(self.train[0].joints)


def load_split(config: TrainConfig) -> DataSplit:
    """The configured dataset's train and val persons; the synthetic set is generated into
    data_root (or <out>/data) on first use."""
    if config.dataset == "synthetic":
        root = Path(config.data_root or Path(config.out) / "data")
        marker = root / f"complete-{config.synthetic_seed}-{config.synthetic_train}-{config.synthetic_val}"
        if rank() == 0 and not marker.exists():
            write_synthetic_coco(root, {"train": config.synthetic_train, "val": config.synthetic_val},
                                 seed=config.synthetic_seed)
            marker.touch()
        barrier()
        train_images, train_annotations = root / "train", root / "annotations" / "person_keypoints_train.json"
        val_images, val_annotations = root / "val", root / "annotations" / "person_keypoints_val.json"
    else:
        train_images, train_annotations = config.train_images, config.train_annotations
        val_images, val_annotations = config.val_images, config.val_annotations
    if config.dataset == "mpii":
        train, train_report = datasets.mpii_records(str(train_annotations), str(train_images))
        val, val_report = datasets.mpii_records(str(val_annotations), str(val_images))
        head_sizes = None
        if config.mpii_head_boxes:
            head_sizes = evaluation.head_sizes_from_boxes(evaluation.load_mpii_head_boxes(config.mpii_head_boxes))
        return DataSplit(train, val, train_report, val_report, None, MPII_FLIP_PAIRS, datasets.MPII_UPPER_BODY,
                         head_sizes)
    input_size = tuple(config.input_size)
    train, train_report = datasets.coco_records(str(train_annotations), str(train_images), input_size)
    val, val_report = datasets.coco_records(str(val_annotations), str(val_images), input_size,
                                            detections=config.val_detections or None)
    return DataSplit(train, val, train_report, val_report, str(val_annotations), COCO_FLIP_PAIRS,
                     datasets.COCO_UPPER_BODY, None)


def build_codec(config: TrainConfig):
    """The configured codec; it owns the crop geometry of the datasets, decoding and flip test."""
    codec_class = codecs.UDPHeatmap if config.codec == "udp" else codecs.MSRAHeatmap
    return codec_class(tuple(config.input_size), tuple(config.heatmap_size), config.sigma)


def build_datasets(config: TrainConfig, split: DataSplit, codec) -> tuple[datasets.TopDownDataset, datasets.TopDownDataset]:
    """(train set, augmented when configured; val set, never augmented), both with keypoint targets
    when the loss paints the heatmaps (config.targets_in_loss), else with heatmaps."""
    augmentation = datasets.Augmentation() if config.augment else None
    targets = "keypoints" if config.targets_in_loss else "heatmaps"
    train = datasets.TopDownDataset(split.train, codec, augmentation, split.flip_pairs, split.upper_body,
                                    config.cache_images, targets)
    val = datasets.TopDownDataset(split.val, codec, None, split.flip_pairs, split.upper_body, config.cache_images,
                                  targets)
    return train, val


@dataclass
class Batch:
    """A collated batch of TopDownDataset samples: with heatmap targets (target, target_weight) or
    with keypoint targets (keypoints, keypoint_weight), as the dataset's `targets` says."""

    image: torch.Tensor  # (B, 3, h, w) normalised crops
    index: torch.Tensor  # (B,) sample indices: the keys of replay distillation
    replayed: torch.Tensor  # (B,) bool
    center: torch.Tensor  # (B, 2) box centres, image pixels
    scale: torch.Tensor  # (B, 2) box sizes / PIXEL_STD
    image_id: torch.Tensor
    score: torch.Tensor  # box scores
    area: torch.Tensor
    joints: torch.Tensor  # (B, K, 3) ground truth in image pixels
    target: torch.Tensor | None = None  # (B, K, H, W) heatmaps
    target_weight: torch.Tensor | None = None  # (B, K)
    keypoints: torch.Tensor | None = None  # (B, K, 2) float64, heatmap pixels
    keypoint_weight: torch.Tensor | None = None  # (B, K)

    @property
    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the loss compares the heatmaps with: (keypoints, keypoint_weight) or (target, target_weight)."""
        if self.keypoints is not None:
            return self.keypoints, self.keypoint_weight
        return self.target, self.target_weight

    def to(self, device: torch.device) -> "Batch":
        """The batch with the tensors the model and the loss read moved to `device`; the
        bookkeeping stays where it is."""
        moved = {name: getattr(self, name).to(device, non_blocking=True)
                 for name in ("image", "target", "target_weight", "keypoints", "keypoint_weight")
                 if getattr(self, name) is not None}
        return replace(self, **moved)


def collate(samples: list[dict]) -> Batch:
    return Batch(**torch.utils.data.default_collate(samples))


def build_loaders(config: TrainConfig, train_set, val_set, batch_sampler, world: int):
    """(train loader over `batch_sampler`, val loader, sharded under DDP)."""
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=batch_sampler, num_workers=config.workers, collate_fn=collate,
        persistent_workers=config.workers > 0,
    )
    val_sampler = torch.utils.data.distributed.DistributedSampler(val_set, shuffle=False) if world > 1 else None
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=config.batch_size, sampler=val_sampler, num_workers=config.workers, collate_fn=collate,
    )
    return train_loader, val_loader
