"""hgloss in one minute: the loss on realistic heatmaps with every available backend.

Builds a COCO-sized batch (17 keypoints, 64x48 heatmaps) of MSRA Gaussian targets, predictions
that miss them by a pixel or two, and a teacher (the same network's earlier, blurrier guess),
then prints, for every backend, the loss, the time of one forward+backward, and the speed-up over
the reference backend, which is the loss written in plain eager PyTorch.

    python examples/demo.py [--batch 32] [--repeats 20]
"""

import argparse
import statistics
import time

import torch

import hgloss
from hgloss.functional import resolve_backend


def gaussian_heatmaps(keypoints: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """MSRA-style targets: a unit-peak Gaussian at each (x, y) keypoint, cut at 3 sigma."""
    ys = torch.arange(height, dtype=torch.float32).view(1, 1, height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, 1, width)
    x = keypoints[..., 0, None, None]
    y = keypoints[..., 1, None, None]
    squared_distance = (xs - x) ** 2 + (ys - y) ** 2
    heatmap = torch.exp(-squared_distance / (2 * sigma**2))
    return heatmap * (squared_distance <= (3 * sigma) ** 2)


def make_batch(batch: int, joints: int = 17, height: int = 64, width: int = 48, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keypoints = torch.rand(batch, joints, 2, generator=generator) * torch.tensor([width - 1.0, height - 1.0])
    visible = (torch.rand(batch, joints, 1, generator=generator) > 0.15).float()
    target = gaussian_heatmaps(keypoints, height, width, sigma=2.0)
    miss = torch.randn(batch, joints, 2, generator=generator) * 1.5
    pred = gaussian_heatmaps(keypoints + miss, height, width, sigma=2.4) * 0.8
    pred = pred + 0.02 * torch.randn(pred.shape, generator=generator)
    teacher = gaussian_heatmaps(keypoints + 0.5 * miss, height, width, sigma=3.0) * 0.7
    return pred, target, visible, teacher


def time_forward_backward(pred, target, weight, teacher, backend: str, repeats: int):
    """Loss value and median milliseconds of one forward+backward."""
    leaf = pred.clone().requires_grad_(True)

    def step():
        loss = hgloss.heatmap_gradient_loss(
            leaf, target, weight, teacher=teacher, alpha=0.5, grad_weight=1.0, backend=backend
        )
        loss.backward()
        leaf.grad = None
        return loss

    loss = step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
    return loss.item(), statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    pred, target, visible, teacher = make_batch(args.batch)
    print(f"hgloss {hgloss.__version__}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"batch: {tuple(pred.shape)} float32 heatmaps, {int(visible.sum())} of {visible.numel()} joints visible")
    print("loss: MSE + heatmap-gradient term (forward differences), teacher blended with alpha=0.5\n")

    backends = hgloss.available_backends()
    results = {name: time_forward_backward(pred, target, visible, teacher, name, args.repeats) for name in backends}
    eager_ms = results["reference"][1]
    print(f"{'backend':<12}{'loss':>14}{'fwd+bwd ms':>14}{'vs eager':>10}")
    for name, (loss, ms) in results.items():
        print(f"{name:<12}{loss:>14.8f}{ms:>14.3f}{eager_ms / ms:>9.1f}x")
    print("(reference: the same loss in plain eager PyTorch, the readable oracle)")
    print(f"\nbackend='auto' uses {resolve_backend('auto', pred.device)!r} for CPU tensors")

    hrnet = hgloss.compat.JointsMSELoss(use_target_weight=True)(pred, target, visible)
    print(f"HRNet JointsMSELoss drop-in (grad_weight=0): {hrnet.item():.8f}")


if __name__ == "__main__":
    main()
