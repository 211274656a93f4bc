"""hgloss.compat and hgloss.HeatmapGradientLoss against literal re-statements of the anchors'
losses: HRNet's JointsMSELoss and JointsOHKMMSELoss (lib/core/loss.py) and mmpose 1.3.2's
KeypointMSELoss and KeypointOHKMMSELoss (mmpose/models/losses/heatmap_loss.py).
tests/test_mmpose_plugin.py also compares with mmpose's own classes where mmpose is installed."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hgloss
from hgloss.backends import reference

from conftest import fused_backend_params, heatmaps

BACKENDS = fused_backend_params() + ["reference"]


class HRNetJointsMSELoss(nn.Module):
    """HRNet's JointsMSELoss, as published."""

    def __init__(self, use_target_weight):
        super().__init__()
        self.criterion = nn.MSELoss(reduction="mean")
        self.use_target_weight = use_target_weight

    def forward(self, output, target, target_weight):
        batch_size, num_joints = output.size(0), output.size(1)
        heatmaps_pred = output.reshape((batch_size, num_joints, -1)).split(1, 1)
        heatmaps_gt = target.reshape((batch_size, num_joints, -1)).split(1, 1)
        loss = 0
        for idx in range(num_joints):
            heatmap_pred = heatmaps_pred[idx].squeeze()
            heatmap_gt = heatmaps_gt[idx].squeeze()
            if self.use_target_weight:
                loss += 0.5 * self.criterion(
                    heatmap_pred.mul(target_weight[:, idx]), heatmap_gt.mul(target_weight[:, idx])
                )
            else:
                loss += 0.5 * self.criterion(heatmap_pred, heatmap_gt)
        return loss / num_joints


class HRNetJointsOHKMMSELoss(nn.Module):
    """HRNet's JointsOHKMMSELoss, as published."""

    def __init__(self, use_target_weight, topk=8):
        super().__init__()
        self.criterion = nn.MSELoss(reduction="none")
        self.use_target_weight = use_target_weight
        self.topk = topk

    def ohkm(self, loss):
        ohkm_loss = 0.0
        for i in range(loss.size()[0]):
            sub_loss = loss[i]
            _, topk_idx = torch.topk(sub_loss, k=self.topk, dim=0, sorted=False)
            ohkm_loss += torch.sum(torch.gather(sub_loss, 0, topk_idx)) / self.topk
        return ohkm_loss / loss.size()[0]

    def forward(self, output, target, target_weight):
        batch_size, num_joints = output.size(0), output.size(1)
        heatmaps_pred = output.reshape((batch_size, num_joints, -1)).split(1, 1)
        heatmaps_gt = target.reshape((batch_size, num_joints, -1)).split(1, 1)
        loss = []
        for idx in range(num_joints):
            heatmap_pred = heatmaps_pred[idx].squeeze()
            heatmap_gt = heatmaps_gt[idx].squeeze()
            if self.use_target_weight:
                loss.append(0.5 * self.criterion(
                    heatmap_pred.mul(target_weight[:, idx]), heatmap_gt.mul(target_weight[:, idx])
                ))
            else:
                loss.append(0.5 * self.criterion(heatmap_pred, heatmap_gt))
        loss = torch.cat([l.mean(dim=1).unsqueeze(dim=1) for l in loss], dim=1)
        return self.ohkm(loss)


def mmpose_keypoint_mse_loss(output, target, target_weights=None, mask=None, *, skip_empty_channel=False,
                             loss_weight=1.0):
    """mmpose 1.3.2's KeypointMSELoss (models/losses/heatmap_loss.py), restated: the mask is the
    product of the given mask, the target weights whenever passed ((B, K) -> (B, K, 1, 1), or
    (B, K, H, W) as they are; use_target_weight is never read) and, with skip_empty_channel, the
    channels whose target is not all zero; the loss is the mean over (B, K, H, W) of
    mask * (output - target)^2, or F.mse_loss without any mask, times loss_weight."""
    factors = [] if mask is None else [mask]
    if target_weights is not None:
        factors.append(target_weights.view(target_weights.shape + (1,) * (4 - target_weights.dim())))
    if skip_empty_channel:
        factors.append((target != 0).flatten(2).any(dim=2)[..., None, None])
    if not factors:
        return F.mse_loss(output, target) * loss_weight
    full_mask = factors[0]
    for factor in factors[1:]:
        full_mask = full_mask * factor
    return (F.mse_loss(output, target, reduction="none") * full_mask).mean() * loss_weight


def mmpose_keypoint_ohkm_mse_loss(output, target, target_weights, *, use_target_weight=False, topk=8,
                                  loss_weight=1.0):
    """mmpose 1.3.2's KeypointOHKMMSELoss, restated: per keypoint the mean over (H, W) of
    (output * w - target * w)^2 (w the (B, K) weight with use_target_weight, else 1), per sample
    the mean of the topk largest, the mean over the batch, times loss_weight."""
    if use_target_weight:
        w = target_weights[:, :, None, None]
        losses = F.mse_loss(output * w, target * w, reduction="none").mean(dim=(2, 3))
    else:
        losses = F.mse_loss(output, target, reduction="none").mean(dim=(2, 3))
    per_sample = torch.stack([losses[b].topk(topk).values.sum() / topk for b in range(losses.shape[0])])
    return per_sample.mean() * loss_weight


def batch(generator, shape=(4, 17, 16, 12), dtype=torch.float64):
    output = heatmaps(shape, dtype, generator=generator).requires_grad_(True)
    target = heatmaps(shape, dtype, generator=generator)
    weight = torch.rand(shape[0], shape[1], 1, generator=generator, dtype=torch.float64).to(dtype)
    weight[0, 3] = 0  # an invisible joint
    return output, target, weight


def assert_same_loss_and_grad(ours, theirs, output, tolerance):
    (grad,) = torch.autograd.grad(ours, output)
    (ref_grad,) = torch.autograd.grad(theirs, output)
    assert torch.allclose(ours.double(), theirs.double(), rtol=tolerance, atol=0), (ours, theirs)
    assert torch.allclose(grad.double(), ref_grad.double(), rtol=tolerance, atol=tolerance * ref_grad.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_target_weight", [True, False])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_joints_mse_loss_matches_hrnet(backend, use_target_weight, dtype, tolerance, generator):
    output, target, weight = batch(generator, dtype=dtype)
    ours = hgloss.compat.JointsMSELoss(use_target_weight, backend=backend)(output, target, weight)
    theirs = HRNetJointsMSELoss(use_target_weight)(output, target, weight)
    assert_same_loss_and_grad(ours, theirs, output, tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_target_weight", [True, False])
def test_module_ohkm_is_hrnets_with_half_mse_weight_and_squared_weights(backend, use_target_weight, generator):
    """HeatmapGradientLoss(ohkm_topk=8) is HRNet's JointsOHKMMSELoss only with mse_weight=0.5
    and the weights squared; compat.JointsOHKMMSELoss does that itself."""
    output, target, weight = batch(generator)
    criterion = hgloss.HeatmapGradientLoss(
        mse_weight=0.5, grad_weight=0.0, use_target_weight=use_target_weight, ohkm_topk=8, backend=backend
    )
    ours = criterion(output, target, weight.square())
    theirs = HRNetJointsOHKMMSELoss(use_target_weight, topk=8)(output, target, weight)
    assert_same_loss_and_grad(ours, theirs, output, 1e-12)


def assert_same_grads(ours, theirs, tensors, tolerance):
    ours_grads = torch.autograd.grad(ours, tensors)
    theirs_grads = torch.autograd.grad(theirs, tensors)
    for mine, ref in zip(ours_grads, theirs_grads):
        assert torch.allclose(mine, ref, rtol=tolerance, atol=tolerance * ref.abs().max().item())


def mmpose_case(generator, target_requires_grad=False):
    output, target, _ = batch(generator)
    with torch.no_grad():
        target[1, 5] = 0  # empty channels
        target[2, 0] = 0
    return output, target.requires_grad_(target_requires_grad)


def mmpose_weights(kind, shape, generator):
    batch_size, joints, height, width = shape
    if kind is None:
        return None
    if kind == "keypoint":
        weights = torch.rand(batch_size, joints, generator=generator, dtype=torch.float64)
        weights[0, 3] = 0  # an invisible keypoint
        return weights
    return torch.rand(batch_size, joints, height, width, generator=generator, dtype=torch.float64)


def mmpose_mask(kind, shape, generator):
    batch_size, joints, height, width = shape
    sizes = {
        None: None, "plane": (batch_size, joints, 1, 1), "sample": (batch_size, 1, 1, 1), "full": shape,
        "per_sample": (batch_size, 1, height, width),
    }
    if sizes[kind] is None:
        return None
    return (torch.rand(sizes[kind], generator=generator) > 0.3).double()


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("use_target_weight", [True, False])
@pytest.mark.parametrize("skip_empty_channel", [True, False])
@pytest.mark.parametrize("weights", [None, "keypoint", "pixel"])
@pytest.mark.parametrize("mask", [None, "plane", "sample", "full", "per_sample"])
def test_keypoint_mse_loss_matches_mmpose(backend, use_target_weight, skip_empty_channel, weights, mask, generator):
    """Every option of mmpose 1.x's KeypointMSELoss; loss_weight and a target that requires
    grad vary with the case, and every backend computes every form."""
    output, target = mmpose_case(generator, target_requires_grad=weights == "keypoint")
    target_weights = mmpose_weights(weights, output.shape, generator)
    mask_tensor = mmpose_mask(mask, output.shape, generator)
    loss_weight = 2.5 if skip_empty_channel else 1.0
    criterion = hgloss.compat.KeypointMSELoss(
        use_target_weight=use_target_weight, skip_empty_channel=skip_empty_channel, loss_weight=loss_weight,
        backend=backend,
    )
    ours = criterion(output, target, target_weights, mask_tensor)
    theirs = mmpose_keypoint_mse_loss(
        output, target, target_weights, mask_tensor, skip_empty_channel=skip_empty_channel, loss_weight=loss_weight
    )
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=0), (ours, theirs)
    assert_same_grads(ours, theirs, (output, target) if target.requires_grad else (output,), 1e-12)


def test_keypoint_mse_loss_applies_weights_whatever_use_target_weight_says(generator):
    """mmpose 1.x never reads use_target_weight: passed weights always count."""
    output, target = mmpose_case(generator)
    weights = mmpose_weights("keypoint", output.shape, generator)
    off = hgloss.compat.KeypointMSELoss(use_target_weight=False)(output, target, weights)
    on = hgloss.compat.KeypointMSELoss(use_target_weight=True)(output, target, weights)
    assert torch.equal(off, on)
    assert not torch.allclose(off, hgloss.compat.KeypointMSELoss()(output, target))


def test_keypoint_mse_loss_mask_and_weights_may_be_bool_or_require_grad(generator):
    output, target = mmpose_case(generator)
    weights = mmpose_weights("keypoint", output.shape, generator).requires_grad_(True)
    mask = torch.rand(output.shape[0], 1, *output.shape[2:], generator=generator) > 0.5
    ours = hgloss.compat.KeypointMSELoss(skip_empty_channel=True)(output, target, weights, mask)
    theirs = mmpose_keypoint_mse_loss(output, target, weights, mask, skip_empty_channel=True)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=0)
    assert_same_grads(ours, theirs, (output, weights), 1e-12)


@pytest.mark.parametrize(
    "argument,shape,message",
    [
        ("target_weights", (4, 17, 1), "target_weights shape (4, 17, 1) is neither (B, K) = (4, 17) nor (B, K, H, W)"),
        ("target_weights", (4, 16), "target_weights shape (4, 16) is neither"),
        ("target_weights", (4, 17, 16, 1), "target_weights shape (4, 17, 16, 1) is neither"),
        ("mask", (4, 17, 16), "mask shape (4, 17, 16) does not broadcast to target shape (4, 17, 16, 12)"),
        ("mask", (4, 2, 16, 12), "mask shape (4, 2, 16, 12) does not broadcast to target shape"),
    ],
)
def test_keypoint_mse_loss_names_a_bad_weight_or_mask(argument, shape, message, generator):
    output, target = mmpose_case(generator)
    with pytest.raises(ValueError, match=re.escape(message)):
        hgloss.compat.KeypointMSELoss()(output, target, **{argument: torch.ones(shape, dtype=torch.float64)})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_target_weight", [True, False])
@pytest.mark.parametrize("topk", [8, 1, 17])
def test_joints_ohkm_mse_loss_matches_hrnet(backend, use_target_weight, topk, generator):
    output, target, weight = batch(generator)
    target.requires_grad_(True)
    ours = hgloss.compat.JointsOHKMMSELoss(use_target_weight, topk=topk, backend=backend)(output, target, weight)
    theirs = HRNetJointsOHKMMSELoss(use_target_weight, topk=topk)(output, target, weight)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=0), (ours, theirs)
    assert_same_grads(ours, theirs, (output, target), 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_target_weight", [True, False])
@pytest.mark.parametrize("topk,loss_weight", [(8, 1.0), (3, 0.25), (17, 2.0)])
def test_keypoint_ohkm_mse_loss_matches_mmpose(backend, use_target_weight, topk, loss_weight, generator):
    output, target, weight = batch(generator)
    target.requires_grad_(True)
    weights = weight.squeeze(-1)  # mmpose passes (B, K)
    kwargs = dict(use_target_weight=use_target_weight, topk=topk, loss_weight=loss_weight)
    ours = hgloss.compat.KeypointOHKMMSELoss(**kwargs, backend=backend)(output, target, weights)
    theirs = mmpose_keypoint_ohkm_mse_loss(output, target, weights, **kwargs)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=0), (ours, theirs)
    assert_same_grads(ours, theirs, (output, target), 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ohkm_gradient_term_follows_each_anchors_scaling(backend, generator):
    output, target, weight = batch(generator)
    terms_v = reference.plane_terms(output, target, None, None, 1.0, 0.0, "sobel")
    terms_r = reference.plane_terms(output, target, None, None, 0.0, 1.0, "sobel")
    w2 = weight.squeeze(-1).square()

    def hardest(planes, k):
        return planes.topk(k, dim=1).values.mean(dim=1).mean()

    hrnet = hgloss.compat.JointsOHKMMSELoss(True, topk=5, grad_weight=2.0, stencil="sobel", backend=backend)
    assert torch.allclose(hrnet(output, target, weight), hardest(0.5 * w2 * (terms_v + 2.0 * terms_r), 5), rtol=1e-12)
    mmpose = hgloss.compat.KeypointOHKMMSELoss(True, topk=5, loss_weight=3.0, grad_weight=2.0, stencil="sobel",
                                               backend=backend)
    expected = 3.0 * hardest(w2 * (terms_v + 2.0 * terms_r), 5)
    assert torch.allclose(mmpose(output, target, weight.squeeze(-1)), expected, rtol=1e-12)


def test_ohkm_compat_rejects_bad_settings(generator):
    output, target, weight = batch(generator)
    for cls in (hgloss.compat.JointsOHKMMSELoss, hgloss.compat.KeypointOHKMMSELoss):
        with pytest.raises(ValueError, match="topk must be a positive int, got 0"):
            cls(use_target_weight=True, topk=0)
        with pytest.raises(ValueError, match="topk=18 exceeds the number of keypoints K=17"):
            cls(use_target_weight=True, topk=18)(output, target, weight)
        with pytest.raises(ValueError, match="needs target_weight"):
            cls(use_target_weight=True)(output, target)
    with pytest.raises(ValueError, match="loss_weight must be finite and >= 0"):
        hgloss.compat.KeypointOHKMMSELoss(loss_weight=-1.0)


@pytest.mark.parametrize("use_target_weight", [True, False])
def test_mmpose_0x_mappings_in_the_readme(use_target_weight, generator):
    """mmpose 0.x's JointsMSELoss (loss_weight * mean(w^2 D^2), no 0.5) and JointsOHKMMSELoss
    (mmpose.models.losses.mse_loss), restated, against the hgloss classes the README maps them
    to; 0.x passes (B, K, 1) weights."""
    output, target, weight = batch(generator)
    w = weight[..., None] if use_target_weight else torch.ones_like(weight)[..., None]
    squared_errors = F.mse_loss(output * w, target * w, reduction="none").mean(dim=(2, 3))  # (B, K)
    theirs_mse = squared_errors.mean() * 2.5
    ours_mse = hgloss.HeatmapGradientLoss(mse_weight=2.5, grad_weight=0, use_target_weight=use_target_weight)(
        output, target, weight**2
    )
    assert torch.allclose(ours_mse, theirs_mse, rtol=1e-12, atol=0)
    theirs_ohkm = squared_errors.topk(6, dim=1).values.mean(dim=1).mean() * 0.5
    ours_ohkm = hgloss.compat.KeypointOHKMMSELoss(use_target_weight, topk=6, loss_weight=0.5)(output, target, weight)
    assert torch.allclose(ours_ohkm, theirs_ohkm, rtol=1e-12, atol=0)
    assert_same_grads(ours_ohkm, theirs_ohkm, (output,), 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compat_gradient_term_follows_each_anchors_scaling(backend, generator):
    output, target, weight = batch(generator)
    terms_v = reference.plane_terms(output, target, None, None, 1.0, 0.0, "central")
    terms_r = reference.plane_terms(output, target, None, None, 0.0, 1.0, "central")
    w = weight.squeeze(-1)
    hrnet = hgloss.compat.JointsMSELoss(True, grad_weight=3.0, stencil="central", backend=backend)(output, target, weight)
    assert torch.allclose(hrnet, (0.5 * w.square() * (terms_v + 3.0 * terms_r)).mean(), rtol=1e-12)
    mmpose = hgloss.compat.KeypointMSELoss(True, loss_weight=2.0, grad_weight=3.0, stencil="central", backend=backend)
    assert torch.allclose(mmpose(output, target, w), (2.0 * w * (terms_v + 3.0 * terms_r)).mean(), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_matches_function(backend, reduction, generator):
    output, target, weight = batch(generator)
    teacher = heatmaps(output.shape, generator=generator)
    criterion = hgloss.HeatmapGradientLoss(grad_weight=2.0, stencil="sobel", reduction=reduction, backend=backend)
    expected = hgloss.heatmap_gradient_loss(
        output, target, weight, teacher=teacher, alpha=0.25, grad_weight=2.0, stencil="sobel",
        reduction=reduction, backend=backend,
    )
    assert torch.equal(criterion(output, target, weight, teacher, 0.25), expected)
    unweighted = hgloss.HeatmapGradientLoss(use_target_weight=False, reduction=reduction, backend=backend)
    assert torch.equal(unweighted(output, target, weight), unweighted(output, target))


def test_module_rejects_bad_settings(generator):
    with pytest.raises(ValueError, match="ohkm_topk must be a positive int"):
        hgloss.HeatmapGradientLoss(ohkm_topk=0)
    with pytest.raises(ValueError, match="unknown reduction"):
        hgloss.HeatmapGradientLoss(reduction="batchmean")
    output, target, weight = batch(generator)
    with pytest.raises(ValueError, match="ohkm_topk=18 exceeds the number of keypoints K=17"):
        hgloss.HeatmapGradientLoss(ohkm_topk=18)(output, target, weight)
    with pytest.raises(ValueError, match="needs target_weight"):
        hgloss.compat.JointsMSELoss(use_target_weight=True)(output, target)
