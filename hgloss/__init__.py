"""hgloss: fused heatmap losses for pose estimation.

The heatmap MSE with a heatmap-gradient constraint and self-distillation soft targets, computed in
one fused pass with a hand-written backward. The contract (formula, API, errors, accuracy) is
docs/spec.md.
"""

from . import compat, distill
from .functional import available_backends, heatmap_gradient_loss, keypoint_heatmap_loss
from .modules import HeatmapGradientLoss, KeypointHeatmapLoss

__version__ = "0.1.0"

__all__ = [
    "HeatmapGradientLoss", "KeypointHeatmapLoss", "available_backends", "compat", "distill", "heatmap_gradient_loss",
    "keypoint_heatmap_loss", "__version__",
]
