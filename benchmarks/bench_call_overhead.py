"""Per-call host cost of the loss: a fused forward+backward on an input so small that the kernels
cost next to nothing, so what is timed is the Python front end (validation, backend choice,
alpha's tensor), the operator call and the autograd node.

Compared side by side in one run, one thread, alternating between providers so that drift hits
them alike:

  mse_loss    F.mse_loss(pred, target) forward+backward, the least a loss call costs
  <backend>   hgloss.heatmap_gradient_loss with teacher, per-sample weight and alpha=0.5

It prints the median and p20-p80 in microseconds of each and its ratio to mse_loss.

    python benchmarks/bench_call_overhead.py                 # 2x17x8x6, every fused CPU backend
    python benchmarks/bench_call_overhead.py --shape 2,17,8,6 --calls 2000 --rounds 15
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import hgloss


def per_call_us(step, calls: int) -> float:
    begin = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - begin) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2,17,8,6", help="B,K,H,W of the input [2,17,8,6]")
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed round [2000]")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per provider [15]")
    parser.add_argument("--backends", help="fused backends to time (default: every one for CPU tensors)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    shape = tuple(int(size) for size in args.shape.split(","))
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(shape, generator=generator).requires_grad_()
    target, teacher = torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)
    weight = torch.rand(shape[0], shape[1], 1, generator=generator)
    backends = (
        args.backends.split(",")
        if args.backends
        else [name for name in hgloss.available_backends() if name not in ("reference", "triton", "cuda")]
    )

    def mse_step():
        F.mse_loss(pred, target).backward()
        pred.grad = None

    def hgloss_step(backend):
        def step():
            hgloss.heatmap_gradient_loss(pred, target, weight, teacher=teacher, alpha=0.5, backend=backend).backward()
            pred.grad = None

        return step

    providers = {"mse_loss": mse_step, **{name: hgloss_step(name) for name in backends}}
    samples = {name: [] for name in providers}
    for step in providers.values():  # warm-up: first-call costs (extension load, caches)
        per_call_us(step, max(args.calls // 10, 10))
    for _ in range(args.rounds):
        for name, step in providers.items():
            samples[name].append(per_call_us(step, args.calls))

    baseline = statistics.median(samples["mse_loss"])
    print(f"input {tuple(shape)}, teacher and weight, one thread, forward+backward per call")
    print(f"torch {torch.__version__}, hgloss {hgloss.__version__}, {args.rounds} rounds x {args.calls} calls")
    print("| provider | median us/call | p20-p80 | vs mse_loss |")
    print("| --- | --- | --- | --- |")
    for name, values in samples.items():
        deciles = statistics.quantiles(values, n=10)
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {deciles[1]:.1f}-{deciles[7]:.1f} | {median / baseline:.2f}x |")


if __name__ == "__main__":
    main()
