"""hgloss.compat and hgloss.HeatmapGradientLoss against literal re-statements of the anchors'
losses: HRNet's JointsMSELoss and JointsOHKMMSELoss (lib/core/loss.py) and mmpose 1.x's
KeypointMSELoss (mmpose/models/losses/heatmap_loss.py)."""

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


class MMPoseKeypointMSELoss(nn.Module):
    """mmpose 1.x's KeypointMSELoss, as published."""

    def __init__(self, use_target_weight=False, skip_empty_channel=False, loss_weight=1.0):
        super().__init__()
        self.use_target_weight = use_target_weight
        self.skip_empty_channel = skip_empty_channel
        self.loss_weight = loss_weight

    def forward(self, output, target, target_weights=None, mask=None):
        _mask = self._get_mask(target, target_weights, mask)
        if _mask is None:
            loss = F.mse_loss(output, target)
        else:
            _loss = F.mse_loss(output, target, reduction="none")
            loss = (_loss * _mask).mean()
        return loss * self.loss_weight

    def _get_mask(self, target, target_weights, mask):
        if mask is not None:
            assert mask.ndim == target.ndim and all(
                d_m == d_t or d_m == 1 for d_m, d_t in zip(mask.shape, target.shape)
            )
        if target_weights is not None and self.use_target_weight:
            ndim_pad = target.ndim - target_weights.ndim
            _mask = target_weights.view(target_weights.shape + (1,) * ndim_pad)
            mask = _mask if mask is None else mask * _mask
        if self.skip_empty_channel:
            _mask = (target != 0).flatten(2).any(dim=2)
            ndim_pad = target.ndim - _mask.ndim
            _mask = _mask.view(_mask.shape + (1,) * ndim_pad)
            mask = _mask if mask is None else mask * _mask
        return mask


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
def test_ohkm_matches_hrnet(backend, use_target_weight, generator):
    output, target, weight = batch(generator)
    criterion = hgloss.HeatmapGradientLoss(
        mse_weight=0.5, grad_weight=0.0, use_target_weight=use_target_weight, ohkm_topk=8, backend=backend
    )
    ours = criterion(output, target, weight.square())
    theirs = HRNetJointsOHKMMSELoss(use_target_weight, topk=8)(output, target, weight)
    assert_same_loss_and_grad(ours, theirs, output, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_target_weight", [True, False])
@pytest.mark.parametrize("skip_empty_channel", [True, False])
@pytest.mark.parametrize("loss_weight", [1.0, 2.5])
def test_keypoint_mse_loss_matches_mmpose(backend, use_target_weight, skip_empty_channel, loss_weight, generator):
    output, target, weight = batch(generator)
    weight = weight.squeeze(-1)  # mmpose passes (B, K)
    with torch.no_grad():
        target[1, 5] = 0  # an empty channel
        target[2, 0] = 0
    kwargs = dict(use_target_weight=use_target_weight, skip_empty_channel=skip_empty_channel, loss_weight=loss_weight)
    ours = hgloss.compat.KeypointMSELoss(**kwargs, backend=backend)(output, target, weight)
    theirs = MMPoseKeypointMSELoss(**kwargs)(output, target, weight)
    assert_same_loss_and_grad(ours, theirs, output, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keypoint_mse_loss_accepts_a_per_plane_mask(backend, generator):
    output, target, weight = batch(generator)
    mask = (torch.rand(4, 17, 1, 1, generator=generator) > 0.3).double()
    ours = hgloss.compat.KeypointMSELoss(use_target_weight=True, backend=backend)(output, target, weight.squeeze(-1), mask)
    theirs = MMPoseKeypointMSELoss(use_target_weight=True)(output, target, weight.squeeze(-1), mask)
    assert_same_loss_and_grad(ours, theirs, output, 1e-12)


def test_keypoint_mse_loss_refuses_a_per_pixel_mask(generator):
    output, target, _ = batch(generator)
    with pytest.raises(ValueError, match="per-pixel masks are not supported"):
        hgloss.compat.KeypointMSELoss()(output, target, mask=torch.ones_like(target))


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
