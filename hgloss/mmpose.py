"""hgloss's losses in mmpose 1.x's model registry.

Importing this module registers, in ``mmpose.registry.MODELS``:

| name | class | call (mmpose's HeatmapHead: ``loss_module(pred, gt, keypoint_weights)``) |
| --- | --- | --- |
| ``HGLossHeatmapGradientLoss`` | ``hgloss.HeatmapGradientLoss`` | ``(pred, target, target_weight=None, ...)`` |
| ``HGLossKeypointMSELoss`` | ``hgloss.compat.KeypointMSELoss`` | ``(output, target, target_weights=None, mask=None)`` |
| ``HGLossKeypointOHKMMSELoss`` | ``hgloss.compat.KeypointOHKMMSELoss`` | ``(output, target, target_weights)`` |
| ``HGLossKeypointHeatmapLoss`` | ``hgloss.KeypointHeatmapLoss`` | ``(pred, keypoints, keypoint_weights=None, ...)`` |

``HGLossKeypointHeatmapLoss`` takes (B, K, 2) keypoints in heatmap pixels instead of heatmaps, so
it serves a head whose ``loss`` passes keypoints (mmpose's own ``HeatmapHead`` passes the
codec's heatmaps); the data pipeline then needs no heatmap encoding.

The names carry the ``HGLoss`` prefix so that none shadows a loss of mmpose's own. In an mmpose
config::

    custom_imports = dict(imports=['hgloss.mmpose'], allow_failed_imports=False)
    model = dict(head=dict(loss=dict(type='HGLossHeatmapGradientLoss', grad_weight=0.1)))

(examples/mmpose/ has a complete one.) ``import hgloss`` never imports this module.
"""

try:
    from mmpose.registry import MODELS
except ImportError as error:  # mmpose missing, or mmpose 0.x (no mmpose.registry)
    raise ImportError(
        "hgloss.mmpose registers hgloss's losses with mmpose 1.x and needs mmpose>=1.0 with mmengine and mmcv "
        "(e.g. `pip install -U openmim && mim install mmengine 'mmcv>=2.0.1' 'mmpose>=1.1.0'`); "
        f"importing mmpose.registry failed: {error}"
    ) from error

from .compat import KeypointMSELoss, KeypointOHKMMSELoss
from .modules import HeatmapGradientLoss, KeypointHeatmapLoss

REGISTERED = {
    "HGLossHeatmapGradientLoss": HeatmapGradientLoss,
    "HGLossKeypointHeatmapLoss": KeypointHeatmapLoss,
    "HGLossKeypointMSELoss": KeypointMSELoss,
    "HGLossKeypointOHKMMSELoss": KeypointOHKMMSELoss,
}

for _name, _loss in REGISTERED.items():
    # force: a second registration (importlib.reload, a config imported twice) replaces ours.
    MODELS.register_module(name=_name, module=_loss, force=True)

__all__ = ["MODELS", "REGISTERED"]
