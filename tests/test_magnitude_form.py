"""The gradient-magnitude form of the gradient term (docs/spec.md section 1), computed by the
reference backend: against formulas written out per stencil, its gradients, and its errors."""

import pytest
import torch

import hgloss


def written_out_magnitude(x: torch.Tensor, stencil: str) -> torch.Tensor:
    """|grad X| on the positions where both gradient maps are valid, stencil by stencil."""
    if stencil == "forward":
        gx = x[..., :-1, 1:] - x[..., :-1, :-1]
        gy = x[..., 1:, :-1] - x[..., :-1, :-1]
    elif stencil == "central":
        gx = (x[..., 1:-1, 2:] - x[..., 1:-1, :-2]) / 2
        gy = (x[..., 2:, 1:-1] - x[..., :-2, 1:-1]) / 2
    else:
        right, left = x[..., :, 2:], x[..., :, :-2]
        gx = (right[..., :-2, :] + 2 * right[..., 1:-1, :] + right[..., 2:, :]
              - left[..., :-2, :] - 2 * left[..., 1:-1, :] - left[..., 2:, :]) / 8
        down, up = x[..., 2:, :], x[..., :-2, :]
        gy = (down[..., :, :-2] + 2 * down[..., :, 1:-1] + down[..., :, 2:]
              - up[..., :, :-2] - 2 * up[..., :, 1:-1] - up[..., :, 2:]) / 8
    return torch.sqrt(gx**2 + gy**2 + torch.finfo(x.dtype).tiny)


def written_out_loss(pred, target, weight, teacher, alpha, grad_weight, stencil):
    soft = target if teacher is None else (1 - alpha) * target + alpha * teacher
    value = (pred - soft).pow(2).mean(dim=(-2, -1))
    gap = written_out_magnitude(pred, stencil) - written_out_magnitude(soft, stencil)
    gradient = gap.pow(2).mean(dim=(-2, -1)) if gap.numel() else torch.zeros_like(value)
    return (weight * (value + grad_weight * gradient)).mean()


@pytest.mark.parametrize("stencil", ["forward", "central", "sobel"])
@pytest.mark.parametrize("with_teacher", [False, True])
def test_matches_the_written_out_formula(stencil, with_teacher):
    generator = torch.Generator().manual_seed(0)
    pred, target, teacher = (torch.rand(2, 3, 7, 5, dtype=torch.float64, generator=generator) for _ in range(3))
    weight = torch.rand(2, 3, dtype=torch.float64, generator=generator)
    teacher = teacher if with_teacher else None
    loss = hgloss.heatmap_gradient_loss(pred, target, weight, teacher=teacher, alpha=0.3, grad_weight=2.5,
                                        stencil=stencil, gradient_form="magnitude")
    expected = written_out_loss(pred, target, weight, teacher, 0.3, 2.5, stencil)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    components = hgloss.heatmap_gradient_loss(pred, target, weight, teacher=teacher, alpha=0.3, grad_weight=2.5,
                                              stencil=stencil)
    assert not torch.isclose(loss, components), "the magnitude form must differ from the component-wise one"


@pytest.mark.parametrize("stencil", ["forward", "central", "sobel"])
def test_gradients_for_every_input(stencil):
    generator = torch.Generator().manual_seed(1)
    pred, target, teacher = (torch.rand(2, 2, 5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
                             for _ in range(3))
    weight = torch.rand(2, 2, 1, dtype=torch.float64, generator=generator, requires_grad=True)

    def loss(pred, target, teacher, weight):
        return hgloss.heatmap_gradient_loss(pred, target, weight, teacher=teacher, alpha=0.4, stencil=stencil,
                                            gradient_form="magnitude", reduction="none")

    assert torch.autograd.gradcheck(loss, (pred, target, teacher, weight))


def test_planes_without_a_common_position_have_no_gradient_term():
    pred, target = torch.rand(2, 3, 1, 6, dtype=torch.float64), torch.rand(2, 3, 1, 6, dtype=torch.float64)
    magnitude = hgloss.heatmap_gradient_loss(pred, target, grad_weight=5.0, gradient_form="magnitude",
                                             reduction="none")
    torch.testing.assert_close(magnitude, (pred - target).pow(2).mean(dim=(-2, -1)))


def test_auto_computes_it_on_the_reference_backend_whatever_the_environment(monkeypatch):
    monkeypatch.setenv("HGLOSS_BACKEND", "cpu")
    pred, target = torch.rand(2, 3, 6, 5), torch.rand(2, 3, 6, 5)
    loss = hgloss.heatmap_gradient_loss(pred, target, gradient_form="magnitude")
    expected = hgloss.heatmap_gradient_loss(pred, target, gradient_form="magnitude", backend="reference")
    assert torch.equal(loss, expected)


def test_errors():
    pred = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"unknown gradient_form 'norm'; expected one of \['components', 'magnitude'\]"):
        hgloss.heatmap_gradient_loss(pred, pred, gradient_form="norm")
    with pytest.raises(ValueError, match="gradient_form='magnitude' is computed by the reference backend only, not by 'cpu'"):
        hgloss.heatmap_gradient_loss(pred, pred, gradient_form="magnitude", backend="cpu")
    with pytest.raises(ValueError, match="not by 'triton'"):
        hgloss.HeatmapGradientLoss(gradient_form="magnitude", backend="triton")
    module = hgloss.HeatmapGradientLoss(gradient_form="magnitude")
    assert "gradient_form='magnitude'" in repr(module)
    torch.testing.assert_close(module(pred, pred * 0.5), hgloss.heatmap_gradient_loss(pred, pred * 0.5,
                                                                                      gradient_form="magnitude"))
