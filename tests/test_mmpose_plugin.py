"""hgloss.mmpose: hgloss's losses in mmpose 1.x's MODELS registry, built from config dicts and
called through the real HeatmapHead.loss path; their values against mmpose's own losses.

mmpose 1.3.2 is installed without its heavy dependencies (requirements-dev.txt and the Makefile
say how): mmcv-lite, mmcv's pure-Python part, stands in for mmcv. One part of mmpose cannot load
then: mmpose/models/heads/transformer_heads (EDPoseHead), which imports mmcv.ops, mmcv's compiled
operators (not on PyPI for this torch). `import mmpose.models` (and so MODELS.build, which imports
it first) fails on that import alone, so when mmcv.ops cannot load, the `mmpose_models` fixture
puts an empty stand-in for that one package in sys.modules before importing mmpose.models.
Every other part of mmpose, HeatmapHead and its loss path included, is mmpose's own code. With a
full mmcv installed, no stand-in is used.
"""

import importlib.util
import os
import sys
import types

import pytest
import torch

import hgloss
from hgloss import compat

from conftest import ROOT, heatmaps, run_python

EXAMPLE = os.path.join(ROOT, "examples", "mmpose", "td-hm_hrnet-w32_hgloss_coco-256x192.py")
NAMES = {
    "HGLossHeatmapGradientLoss": hgloss.HeatmapGradientLoss,
    "HGLossKeypointMSELoss": compat.KeypointMSELoss,
    "HGLossKeypointOHKMMSELoss": compat.KeypointOHKMMSELoss,
    "HGLossKeypointHeatmapLoss": hgloss.KeypointHeatmapLoss,
}


def test_import_without_mmpose_says_what_to_install():
    result = run_python(
        """
        import sys
        sys.modules["mmpose"] = None  # as if mmpose were not installed
        try:
            import hgloss.mmpose
        except ImportError as error:
            print("ImportError:", error)
        """
    )
    assert "ImportError: hgloss.mmpose registers hgloss's losses with mmpose 1.x" in result.stdout
    assert "needs mmpose>=1.0 with mmengine and mmcv" in result.stdout
    assert "mim install" in result.stdout


def test_import_hgloss_does_not_import_mmpose():
    result = run_python(
        "import sys, hgloss; "
        "print(sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] in ('mmpose', 'mmengine', 'mmcv') or m == 'hgloss.mmpose'))"
    )
    assert result.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def registry():
    registry_module = pytest.importorskip("mmpose.registry", reason="mmpose 1.x is not installed")
    import hgloss.mmpose  # noqa: F401  (registers)

    return registry_module.MODELS


def _mmcv_ops_load() -> bool:
    if importlib.util.find_spec("mmcv._ext") is None:
        return False
    try:
        import mmcv.ops  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


@pytest.fixture(scope="module")
def mmpose_models(registry):
    """mmpose.models imported (its heads and losses registered), with the stand-in for
    transformer_heads described at the top of this file when mmcv.ops cannot load."""
    if "mmpose.models" not in sys.modules and not _mmcv_ops_load():
        import mmpose

        name = "mmpose.models.heads.transformer_heads"
        stand_in = types.ModuleType(name, "stand-in: EDPoseHead needs mmcv.ops, mmcv's compiled operators")
        stand_in.__path__ = [os.path.join(os.path.dirname(mmpose.__file__), "models", "heads", "transformer_heads")]

        class EDPoseHead:  # what heads/__init__.py imports from the package
            def __init__(self, *args, **kwargs):
                raise ImportError("EDPoseHead needs mmcv.ops (mmcv's compiled operators)")

        stand_in.EDPoseHead = EDPoseHead
        sys.modules[name] = stand_in
    import mmpose.models

    return mmpose.models


def test_registry_holds_the_names_after_import(registry):
    for name, cls in NAMES.items():
        assert registry.module_dict[name] is cls
    # mmpose's own names are untouched
    assert all(not name.startswith("HGLoss") or name in NAMES for name in registry.module_dict)


def test_keypoint_loss_builds_from_a_config_dict(mmpose_models, registry):
    """A head passing keypoints gets the loss from its config as from any other."""
    criterion = registry.build(dict(type="HGLossKeypointHeatmapLoss", sigma=1.5, encoding="udp", grad_weight=0.2))
    pred = torch.rand(2, 3, 8, 6, dtype=torch.float64)
    keypoints = torch.rand(2, 3, 2, dtype=torch.float64) * 6
    weights = torch.ones(2, 3, dtype=torch.float64)
    expected = hgloss.keypoint_heatmap_loss(pred, keypoints, weights, sigma=1.5, encoding="udp", grad_weight=0.2)
    assert torch.equal(criterion(pred, keypoints, weights), expected)


def test_mmpose_own_losses_are_not_shadowed(mmpose_models, registry):
    from mmpose.models.losses import heatmap_loss

    assert registry.get("KeypointMSELoss") is heatmap_loss.KeypointMSELoss
    assert registry.get("KeypointOHKMMSELoss") is heatmap_loss.KeypointOHKMMSELoss
    for name, cls in NAMES.items():
        assert registry.get(name) is cls


@pytest.mark.parametrize(
    "config,expected",
    [
        (dict(type="HGLossHeatmapGradientLoss", grad_weight=0.5, stencil="sobel"),
         dict(grad_weight=0.5, stencil="sobel", use_target_weight=True)),
        (dict(type="HGLossKeypointMSELoss", use_target_weight=True, skip_empty_channel=True, loss_weight=2.0),
         dict(skip_empty_channel=True, loss_weight=2.0, grad_weight=0.0)),
        (dict(type="HGLossKeypointOHKMMSELoss", use_target_weight=True, topk=4, grad_weight=1.0),
         dict(topk=4, grad_weight=1.0, loss_weight=1.0)),
    ],
    ids=lambda value: value["type"] if "type" in value else "",
)
def test_build_from_config_dict(mmpose_models, registry, config, expected):
    loss = registry.build(config)
    assert type(loss) is NAMES[config["type"]]
    for attribute, value in expected.items():
        assert getattr(loss, attribute) == value


def test_build_checks_settings(mmpose_models, registry):
    with pytest.raises(ValueError, match="unknown stencil"):
        registry.build(dict(type="HGLossHeatmapGradientLoss", stencil="laplace"))


def test_example_config_is_mmposes_hrnet_config_with_our_loss(registry):
    from mmengine.config import Config

    cfg = Config.fromfile(EXAMPLE)  # runs custom_imports: imports hgloss.mmpose
    assert cfg.custom_imports == dict(imports=["hgloss.mmpose"], allow_failed_imports=False)
    assert cfg.model.head.loss.type == "HGLossHeatmapGradientLoss"
    import mmpose

    original = os.path.join(
        os.path.dirname(mmpose.__file__), ".mim", "configs", "body_2d_keypoint", "topdown_heatmap", "coco",
        "td-hm_hrnet-w32_8xb64-210e_coco-256x192.py",
    )
    if not os.path.exists(original):
        pytest.skip("this mmpose install has no .mim/configs to compare with")
    theirs, ours = Config.fromfile(original).to_dict(), cfg.to_dict()
    assert set(ours) - set(theirs) == {"custom_imports", "work_dir"}
    assert set(theirs) <= set(ours)
    assert [key for key in theirs if theirs[key] != ours[key]] == ["model"]
    ours["model"]["head"].pop("loss"), theirs["model"]["head"].pop("loss")
    assert ours["model"] == theirs["model"]


def _samples(batch, joints, height, width, generator):
    """PoseDataSamples as mmpose's data pipeline packs them for HeatmapHead.loss."""
    from mmengine.structures import InstanceData, PixelData
    from mmpose.structures import PoseDataSample

    samples = []
    for index in range(batch):
        sample = PoseDataSample()
        target = heatmaps((1, joints, height, width), torch.float32, generator=generator)[0]
        if index == 0:
            target[2] = 0  # an empty channel
        sample.gt_fields = PixelData(heatmaps=target)
        weights = torch.rand(1, joints, generator=generator)
        weights[0, 3] = 0  # an invisible keypoint
        sample.gt_instance_labels = InstanceData(keypoint_weights=weights)
        samples.append(sample)
    return samples


def _head_loss(registry, head_config, loss_config, feats, samples, state=None):
    """loss_kpt from HeatmapHead.loss (mmpose's own loss path) and the gradient of the head's
    final layer, for a head built from a config dict."""
    head = registry.build(dict(head_config, loss=loss_config))
    if state is not None:
        head.load_state_dict(state)
    losses = head.loss(feats, samples, train_cfg=dict(compute_acc=True))
    assert set(losses) == {"loss_kpt", "acc_pose"}
    (grad,) = torch.autograd.grad(losses["loss_kpt"], [head.final_layer.weight])
    return losses["loss_kpt"], grad, head


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (dict(type="HGLossHeatmapGradientLoss", grad_weight=0.0), dict(type="KeypointMSELoss", use_target_weight=True)),
        (dict(type="HGLossKeypointMSELoss"), dict(type="KeypointMSELoss")),
        (dict(type="HGLossKeypointMSELoss", use_target_weight=True, skip_empty_channel=True, loss_weight=3.0),
         dict(type="KeypointMSELoss", use_target_weight=True, skip_empty_channel=True, loss_weight=3.0)),
        (dict(type="HGLossKeypointOHKMMSELoss", use_target_weight=True, topk=8),
         dict(type="KeypointOHKMMSELoss", use_target_weight=True, topk=8)),
        (dict(type="HGLossKeypointOHKMMSELoss", topk=4, loss_weight=2.0),
         dict(type="KeypointOHKMMSELoss", topk=4, loss_weight=2.0)),
    ],
    ids=["gradient-loss", "mse-defaults", "mse-options", "ohkm-weighted", "ohkm-unweighted"],
)
def test_heatmap_head_loss_path_equals_mmpose_at_grad_weight_0(mmpose_models, registry, ours, theirs):
    """The example config's head, built from its config dict, computes the loss through
    HeatmapHead.loss; at grad_weight=0 it equals the head with mmpose's own loss."""
    from mmengine.config import Config

    generator = torch.Generator().manual_seed(0)
    head_config = Config.fromfile(EXAMPLE).model.head.to_dict()
    head_config.pop("loss")
    feats = (torch.randn(4, head_config["in_channels"], 64, 48, generator=generator),)
    samples = _samples(4, head_config["out_channels"], 64, 48, generator)
    torch.manual_seed(0)
    their_loss, their_grad, head = _head_loss(registry, head_config, theirs, feats, samples)
    our_loss, our_grad, _ = _head_loss(registry, head_config, ours, feats, samples, head.state_dict())
    assert our_loss.dtype == torch.float32
    assert torch.allclose(our_loss, their_loss, rtol=1e-5, atol=0), (our_loss, their_loss)
    assert torch.allclose(our_grad, their_grad, rtol=1e-4, atol=1e-6 * their_grad.abs().max().item())


def test_heatmap_head_loss_path_with_the_gradient_term(mmpose_models, registry):
    """The example's loss (grad_weight=0.1) through HeatmapHead.loss equals
    hgloss.heatmap_gradient_loss on the head's own output and the packed targets and weights."""
    from mmengine.config import Config

    generator = torch.Generator().manual_seed(1)
    head_config = Config.fromfile(EXAMPLE).model.head.to_dict()
    feats = (torch.randn(3, head_config["in_channels"], 64, 48, generator=generator),)
    samples = _samples(3, head_config["out_channels"], 64, 48, generator)
    head = registry.build(head_config)
    assert isinstance(head.loss_module, hgloss.HeatmapGradientLoss) and head.loss_module.grad_weight == 0.1
    loss = head.loss(feats, samples)["loss_kpt"]
    pred = head.forward(feats)
    target = torch.stack([sample.gt_fields.heatmaps for sample in samples])
    weights = torch.cat([sample.gt_instance_labels.keypoint_weights for sample in samples])
    expected = hgloss.heatmap_gradient_loss(pred, target, weights, grad_weight=0.1)
    assert torch.allclose(loss, expected, rtol=1e-6)
    loss.backward()
    assert head.final_layer.weight.grad is not None


def _mmpose_case(generator, shape=(3, 5, 8, 6)):
    output = heatmaps(shape, generator=generator).requires_grad_(True)
    target = heatmaps(shape, generator=generator)
    with torch.no_grad():
        target[0, 1] = 0
        target[2, 4] = 0
    return output, target


@pytest.mark.parametrize("use_target_weight", [False, True])
@pytest.mark.parametrize("skip_empty_channel", [False, True])
@pytest.mark.parametrize("weights", [None, "keypoint", "pixel"])
@pytest.mark.parametrize("mask", [None, "full", "per_sample"])
def test_keypoint_mse_loss_equals_mmposes_own(mmpose_models, use_target_weight, skip_empty_channel, weights, mask):
    from mmpose.models.losses.heatmap_loss import KeypointMSELoss

    generator = torch.Generator().manual_seed(2)
    output, target = _mmpose_case(generator)
    batch, joints, height, width = output.shape
    weight_tensor = {
        None: None,
        "keypoint": torch.rand(batch, joints, generator=generator, dtype=torch.float64),
        "pixel": torch.rand(batch, joints, height, width, generator=generator, dtype=torch.float64),
    }[weights]
    mask_tensor = {
        None: None,
        "full": (torch.rand(batch, joints, height, width, generator=generator) > 0.3).double(),
        "per_sample": (torch.rand(batch, 1, height, width, generator=generator) > 0.3).double(),
    }[mask]
    kwargs = dict(use_target_weight=use_target_weight, skip_empty_channel=skip_empty_channel, loss_weight=1.5)
    ours = compat.KeypointMSELoss(**kwargs)(output, target, weight_tensor, mask_tensor)
    theirs = KeypointMSELoss(**kwargs)(output, target, weight_tensor, mask_tensor)
    (our_grad,) = torch.autograd.grad(ours, output)
    (their_grad,) = torch.autograd.grad(theirs, output)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=0)
    assert torch.allclose(our_grad, their_grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("use_target_weight", [False, True])
@pytest.mark.parametrize("topk", [1, 3, 5])
def test_keypoint_ohkm_mse_loss_equals_mmposes_own(mmpose_models, use_target_weight, topk):
    from mmpose.models.losses.heatmap_loss import KeypointOHKMMSELoss

    generator = torch.Generator().manual_seed(3)
    output, target = _mmpose_case(generator)
    weights = torch.rand(output.shape[:2], generator=generator, dtype=torch.float64)
    kwargs = dict(use_target_weight=use_target_weight, topk=topk, loss_weight=0.5)
    ours = compat.KeypointOHKMMSELoss(**kwargs)(output, target, weights)
    theirs = KeypointOHKMMSELoss(**kwargs)(output, target, weights)
    (our_grad,) = torch.autograd.grad(ours, output)
    (their_grad,) = torch.autograd.grad(theirs, output)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=0)
    assert torch.allclose(our_grad, their_grad, rtol=1e-10, atol=1e-15)
