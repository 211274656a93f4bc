"""Times the two ways a fused backward can apply an upstream gradient g that is not 1: scale the
dL/dD saved by the forward in place (what hgloss does: one read and one write of the gradient),
or recompute it with one more forward pass (reads P, G and S again and writes the gradient).
With g == 1, the usual `loss.backward()`, the scaling kernel reads one factor and returns.

    python benchmarks/bench_backward.py --device cuda --batch 64,1024
"""

import argparse

import torch

import hgloss  # noqa: F401  (registers the hgloss operators)

try:
    from . import _timing as timing
except ImportError:  # run as a script
    import _timing as timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", default="64,1024", help="batch sizes, comma-separated [64,1024]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    op, scale_ = torch.ops.hgloss.heatmap_loss, torch.ops.hgloss.scale_gradient_

    print("| device | B | dtype | forward with gradient (ms) | scale by g=0.5 (ms) | scale by g=1 (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch in (int(b) for b in args.batch.split(",")):
        shape = (batch, 17, 64, 48)
        pred, target, teacher = (torch.rand(shape, device=device, dtype=dtype) for _ in range(3))
        alpha = torch.full((batch,), 0.5, device=device)

        def forward():
            return op(pred, target, teacher, alpha, None, 1.0, 1.0, "forward", "mean", True)

        grad = forward()[2]
        half, one = torch.tensor(0.5, device=device), torch.tensor(1.0, device=device)
        # Repeated halving shrinks the values by 2^-repeats at most: far from float32's denormals.
        steps = (lambda _: forward(), lambda _: scale_(grad, half), lambda _: scale_(grad, one))
        medians = []
        for step in steps:
            timing.time_ms(lambda i: None, step, 5, device)  # warm-up
            medians.append(timing.summarize(timing.time_ms(lambda i: None, step, args.repeats, device))[0])
        print(f"| {device.type} | {batch} | {args.dtype} | " + " | ".join(f"{m:.4f}" for m in medians) + " |")


if __name__ == "__main__":
    main()
