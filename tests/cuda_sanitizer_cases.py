"""Runs the CUDA backend once on each kind of launch it has, forward and backward, so that
compute-sanitizer can watch every kernel: the vectorised, strided and tiled loss kernels in each
dtype and stencil, one-pixel-wide and empty planes, targets from keypoints (separable factors),
pixel weights in each form they broadcast from, the final reduction and the gradient scaling.

    compute-sanitizer --tool memcheck python tests/cuda_sanitizer_cases.py
    compute-sanitizer --tool racecheck python tests/cuda_sanitizer_cases.py

Small shapes: the sanitizer slows kernels down a hundredfold. Exits non-zero if a result is not
finite (an uninitialised read would usually show as one).
"""

import itertools
import sys

import torch

import hgloss
from hgloss import targets

SHAPES = {
    "whole-plane": (2, 5, 64, 48),
    "odd-whole-plane": (2, 3, 13, 7),
    "tiled": (1, 2, 300, 200),
    "row": (2, 3, 1, 3000),
    "column": (2, 3, 3000, 1),
    "pixel": (3, 2, 1, 1),
    "empty": (0, 17, 64, 48),
}
LAYOUTS = ("contiguous", "transposed", "misaligned")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (form, pred dtype, pixel weight dtype): every pred dtype, so every pixel-weighted kernel, and M
# in a dtype other than pred's
PIXEL_WEIGHT_CASES = (
    ("full", torch.float32, torch.float32),
    ("per-sample", torch.bfloat16, torch.float16),
    ("per-joint-column", torch.float64, torch.float32),
    ("plane", torch.float16, torch.float64),
)


def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return values.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "misaligned":
        shifted = torch.empty(values.numel() + 1, dtype=values.dtype, device=values.device)[1:]
        return shifted.view(values.shape).copy_(values)
    return values


def run_case(shape, dtype, layout, stencil, teacher, reduction, target_dtype=None) -> bool:
    pred = laid_out(torch.rand(shape, device="cuda", dtype=dtype), layout).requires_grad_(True)
    target = laid_out(torch.rand(shape, device="cuda", dtype=target_dtype or dtype), layout)
    extra = {}
    if teacher:
        extra = {"teacher": torch.rand(shape, device="cuda", dtype=dtype), "alpha": torch.rand(shape[0], device="cuda")}
    weight = torch.rand(shape[:2], device="cuda")
    loss = hgloss.heatmap_gradient_loss(
        pred, target, weight, stencil=stencil, reduction=reduction, backend="cuda", **extra
    )
    upstream = torch.randn_like(loss) if reduction == "none" else torch.tensor(0.5, device="cuda")
    loss.backward(upstream)
    torch.cuda.synchronize()
    return bool(torch.isfinite(loss).all() and torch.isfinite(pred.grad).all())


def run_keypoint_case(shape, dtype, layout, stencil, teacher, encoding) -> bool:
    """The loss on a target evaluated from keypoints (inside, on the border, outside and
    invisible), through the same kernels' separable path."""
    batch, joints, height, width = shape
    pred = laid_out(torch.rand(shape, device="cuda", dtype=dtype), layout).requires_grad_(True)
    size = torch.tensor([width, height], dtype=torch.float64, device="cuda")
    keypoints = torch.rand(batch, joints, 2, device="cuda", dtype=torch.float64) * (size + 8) - 4
    weights = (torch.rand(batch, joints, device="cuda") > 0.2).float()
    extra = {}
    if teacher:
        extra = {"teacher": torch.rand(shape, device="cuda", dtype=dtype), "alpha": torch.rand(batch, device="cuda")}
    loss = hgloss.keypoint_heatmap_loss(
        pred, keypoints, weights, sigma=1.5, encoding=encoding, stencil=stencil, backend="cuda", **extra
    )
    loss.backward()
    torch.cuda.synchronize()
    return bool(torch.isfinite(loss).all() and torch.isfinite(pred.grad).all())


def pixel_weight(shape, form, dtype, layout="contiguous") -> torch.Tensor:
    """A pixel weight that broadcasts to `shape`: (B, K, H, W), (B, 1, H, W), (1, K, 1, W) or (H, W)."""
    batch, joints, height, width = shape
    size = {
        "full": (batch, joints, height, width),
        "per-sample": (batch, 1, height, width),
        "per-joint-column": (1, joints, 1, width),
        "plane": (height, width),
    }[form]
    weight = torch.rand(size, device="cuda", dtype=dtype)
    return laid_out(weight, layout) if weight.dim() == 4 else weight


def run_pixel_weight_case(shape, dtype, layout, stencil, form, weight_dtype) -> bool:
    """The loss with a pixel weight: kernels of their own, strided, reading M at the tiles' rings."""
    pred = laid_out(torch.rand(shape, device="cuda", dtype=dtype), layout).requires_grad_(True)
    target = laid_out(torch.rand(shape, device="cuda", dtype=dtype), layout)
    teacher = torch.rand(shape, device="cuda", dtype=dtype)
    loss = hgloss.heatmap_gradient_loss(
        pred, target, torch.rand(shape[:2], device="cuda"), teacher=teacher, alpha=torch.rand(shape[0], device="cuda"),
        stencil=stencil, backend="cuda", pixel_weight=pixel_weight(shape, form, weight_dtype, layout),
    )
    loss.backward()
    torch.cuda.synchronize()
    return bool(torch.isfinite(loss).all() and torch.isfinite(pred.grad).all())


def run_separable_pixel_weight_case(shape, dtype, stencil) -> bool:
    """A pixel weight with a target from keypoints: the operator itself, which takes both (the
    public keypoint loss passes no pixel weight)."""
    batch, joints, height, width = shape
    size = torch.tensor([width, height], dtype=torch.float64, device="cuda")
    keypoints = torch.rand(batch, joints, 2, device="cuda", dtype=torch.float64) * (size + 8) - 4
    rows, cols, _ = targets.gaussian_factors(keypoints, None, height, width, 1.5, "msra")
    pred = torch.rand(shape, device="cuda", dtype=dtype)
    loss, _, grad = torch.ops.hgloss.heatmap_loss(
        pred, None, None, None, None, 1.0, 1.0, stencil, "mean", True, rows, cols,
        pixel_weight(shape, "per-sample", torch.float32),
    )
    torch.cuda.synchronize()
    return bool(torch.isfinite(loss).all() and torch.isfinite(grad).all())


def main() -> int:
    cases = failures = 0
    for (name, shape), stencil in itertools.product(SHAPES.items(), ("forward", "central", "sobel")):
        for dtype, layout in itertools.product(DTYPES, LAYOUTS):
            if name != "whole-plane" and (dtype, layout) != (torch.float32, "contiguous"):
                continue  # every dtype and layout on the whole-plane path; float32 elsewhere
            for teacher, reduction in ((True, "mean"), (False, "none")):
                cases += 1
                if not run_case(shape, dtype, layout, stencil, teacher, reduction):
                    failures += 1
                    print(f"non-finite result: {name} {dtype} {layout} {stencil} teacher={teacher} {reduction}")
        cases += 1
        if not run_case(shape, torch.bfloat16, "contiguous", stencil, True, "sum", target_dtype=torch.float32):
            failures += 1
            print(f"non-finite result: {name} mixed bfloat16/float32 {stencil}")
    for (name, shape), stencil in itertools.product(SHAPES.items(), ("forward", "central", "sobel")):
        for dtype, layout, teacher, encoding in (
            (torch.float32, "contiguous", True, "msra"),
            (torch.float32, "transposed", False, "udp"),
            (torch.bfloat16, "contiguous", True, "udp"),
            (torch.float64, "misaligned", False, "msra"),
        ):
            if name != "whole-plane" and dtype != torch.float32:
                continue
            cases += 1
            if not run_keypoint_case(shape, dtype, layout, stencil, teacher, encoding):
                failures += 1
                print(f"non-finite result: keypoints {name} {dtype} {layout} {stencil} teacher={teacher} {encoding}")
    for (name, shape), stencil in itertools.product(SHAPES.items(), ("forward", "central", "sobel")):
        for form, dtype, weight_dtype in PIXEL_WEIGHT_CASES:
            if name != "whole-plane" and form != "full":
                continue  # every form and dtype on whole planes; float32 elsewhere
            layout = "transposed" if form == "full" else "contiguous"
            cases += 1
            if not run_pixel_weight_case(shape, dtype, layout, stencil, form, weight_dtype):
                failures += 1
                print(f"non-finite result: pixel weight {name} {dtype} {layout} {stencil} {form} {weight_dtype}")
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            if name != "whole-plane" and dtype != torch.float32:
                continue
            cases += 1
            if not run_separable_pixel_weight_case(shape, dtype, stencil):
                failures += 1
                print(f"non-finite result: keypoints with a pixel weight {name} {dtype} {stencil}")
    print(f"{cases} cases, {failures} with non-finite results")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
