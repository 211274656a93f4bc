"""Benchmark of per-pixel weights in the fused backends: mmpose's KeypointMSELoss with a mask.

mmpose 1.x's KeypointMSELoss multiplies the squared error by a mask M, the product of the
target_weights ((B, K) per keypoint or (B, K, H, W) per pixel) and a `mask` broadcastable to
(B, K, H, W). hgloss.compat.KeypointMSELoss passes the per-plane factors as target_weight and
the per-pixel ones as pixel_weight, which the fused backends read in place (any strides, an
expanded (B, 1, H, W) mask included). This measures that loss, forward+backward (pred requires
grad), float32, K=17, 64x48, for each batch size and weight setting:

  mask    a (B, 1, H, W) 0/1 mask and no target_weights, as mmpose's bottom-up heads pass it
          (AssociativeEmbeddingHead: keypoint_loss(pred, gt_heatmaps, None, gt_masks))
  pixel   (B, K, H, W) pixel-wise target_weights, no mask
  plane   (B, K) 0/1 target_weights only: the control, no per-pixel factor

with these providers of the same number:

  mmpose      mmpose's formula as its users run it, restated in PyTorch:
              loss_weight * mean((output - target) ** 2 * m), m the weights and mask broadcast
              to (B, K, H, W) (mmpose's _get_mask)
  compile     torch.compile of that same function
  reference   hgloss.compat.KeypointMSELoss(backend="reference"): what hgloss computed for a
              per-pixel weight before the fused backends read it
  <backend>   hgloss.compat.KeypointMSELoss(backend=<backend>), one per fused backend of
              hgloss.available_backends() that runs on the device ("cpu" on CPU tensors;
              "cuda" and "triton" on CUDA tensors where built)

At --grad-weight 0 (default, mmpose's loss) all of them compute the same loss. A positive
--grad-weight adds hgloss's gradient term; mmpose and compile have none and are skipped (the
table says so).

Before timing, every provider's loss and dL/dpred are checked against every other provider's
(2e-5 relative, twice the accuracy docs/spec.md promises against float64). The providers of a
setting are timed in turns, one call each per round, so a slow spell of a shared machine falls
on all of them alike. Speed-ups are ratios of medians measured in the same run. "% copy BW" (fused
providers only) counts the bytes a fused call cannot avoid: P, G and M (and the (B, K) weights)
read once, dL/dP written, over the bandwidth of a large copy on the same device.

It prints a markdown table and writes bench_pixel_weight.csv, pixel_weight.md and (with
matplotlib) pixel_weight.png to --out (default benchmarks/results/<device-tag>/pixel_weight).
Progress goes to stderr.

Examples::

    python benchmarks/bench_pixel_weight.py                          # B=32,64; mask, pixel, plane
    python benchmarks/bench_pixel_weight.py --weights mask --batch 64 --repeats 50
    python benchmarks/bench_pixel_weight.py --grad-weight 1           # with the gradient term
    python benchmarks/bench_pixel_weight.py --device cuda --out /tmp/bench

Each compile provider compiles first (tens of seconds per setting on a 2-core CPU).
"""

import argparse
import csv
import itertools
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

import hgloss
from hgloss import compat

try:
    from . import _timing as timing
except ImportError:  # run as a script: its folder, benchmarks/, is on sys.path
    import _timing as timing

JOINTS, HEIGHT, WIDTH = 17, 64, 48
LOSS_WEIGHT = 1.0
RTOL = 2e-5
WEIGHTS = ("mask", "pixel", "plane")
BASELINES = ("mmpose", "compile", "reference")
FUSED = ("cpu", "cuda", "triton")
NO_GRADIENT_TERM = ("mmpose", "compile")


@dataclass
class Row:
    batch: int
    weights: str
    provider: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    unavoidable_bytes: int = 0
    copy_bandwidth: float = 0.0
    status: str = ""  # why the provider was not timed; empty when it was
    speedup_vs_mmpose: float | None = None
    speedup_vs_compile: float | None = None

    @property
    def fused(self) -> bool:
        return self.provider in FUSED

    @property
    def pct_copy_bw(self) -> float | None:
        if not self.fused or self.median_ms is None:
            return None
        return 100 * self.unavoidable_bytes / (self.median_ms / 1e3) / self.copy_bandwidth


# ------------------------------------------------------------------------------------------------
# Inputs and providers


def make_inputs(batch: int, weights: str, device: torch.device, generator: torch.Generator) -> dict:
    """One batch: pred (requires grad) and target heatmaps, and the setting's weights and mask."""
    shape = (batch, JOINTS, HEIGHT, WIDTH)
    inputs = {
        "pred": torch.rand(shape, generator=generator).to(device).requires_grad_(),
        "target": torch.rand(shape, generator=generator).to(device),
        "target_weights": None,
        "mask": None,
    }
    if weights == "mask":
        # Mostly ones, zeros where a bottom-up codec masks out crowds and unannotated people.
        inputs["mask"] = (torch.rand(batch, 1, HEIGHT, WIDTH, generator=generator) > 0.2).float().to(device)
    elif weights == "pixel":
        inputs["target_weights"] = torch.rand(shape, generator=generator).to(device)
    else:
        inputs["target_weights"] = (torch.rand(batch, JOINTS, generator=generator) > 0.2).float().to(device)
    return inputs


def mmpose_keypoint_mse(output, target, target_weights, mask):
    """mmpose 1.x KeypointMSELoss.forward with its _get_mask (skip_empty_channel off), restated."""
    if target_weights is not None:
        weights = target_weights.view(target_weights.shape + (1,) * (target.dim() - target_weights.dim()))
        mask = weights if mask is None else mask * weights
    if mask is None:
        loss = F.mse_loss(output, target)
    else:
        loss = (F.mse_loss(output, target, reduction="none") * mask).mean()
    return loss * LOSS_WEIGHT


def loss_function(provider: str, grad_weight: float):
    """The provider's loss of an input dict. For compile, a fresh compiled function with static
    shapes, as a training loop with a fixed batch shape gets it."""
    if provider in NO_GRADIENT_TERM:
        function = mmpose_keypoint_mse
        if provider == "compile":
            torch._dynamo.reset()  # one cache entry per setting: no recompile limit
            function = torch.compile(mmpose_keypoint_mse, dynamic=False)
    else:
        function = compat.KeypointMSELoss(loss_weight=LOSS_WEIGHT, grad_weight=grad_weight, backend=provider)
    return lambda x: function(x["pred"], x["target"], x["target_weights"], x["mask"])


def fused_backends(device: torch.device) -> list[str]:
    """The fused backends available here that compute on `device`'s tensors."""
    return [name for name in hgloss.available_backends()
            if name in FUSED and (name in ("cuda", "triton")) == (device.type == "cuda")]


def unavoidable_bytes(inputs: dict) -> int:
    """P and G read, dL/dP written, and the weights and mask read once, as stored."""
    pred = inputs["pred"]
    total = 3 * pred.numel() * pred.element_size()
    for name in ("target_weights", "mask"):
        if inputs[name] is not None:
            total += inputs[name].numel() * inputs[name].element_size()
    return total


def loss_and_gradient(function, inputs: dict) -> tuple[float, torch.Tensor]:
    inputs["pred"].grad = None
    loss = function(inputs)
    loss.backward()
    gradient = inputs["pred"].grad.detach().clone()
    inputs["pred"].grad = None
    return loss.item(), gradient


def check_agreement(label: str, results: dict[str, tuple[float, torch.Tensor]]) -> float:
    """Every pair of providers within RTOL on the loss and dL/dpred; returns the largest difference."""
    worst = 0.0
    for (name_a, (loss_a, grad_a)), (name_b, (loss_b, grad_b)) in itertools.combinations(results.items(), 2):
        loss_error = abs(loss_a - loss_b) / max(abs(loss_a), abs(loss_b), 1e-30)
        grad_error = ((grad_a.double() - grad_b.double()).norm() / grad_a.double().norm().clamp_min(1e-30)).item()
        if loss_error > RTOL or grad_error > RTOL:
            raise AssertionError(
                f"{label}: {name_a} and {name_b} differ: loss {loss_a:.8g} vs {loss_b:.8g} "
                f"(relative {loss_error:.2e}), dL/dpred relative {grad_error:.2e} (limit {RTOL:g})"
            )
        worst = max(worst, loss_error, grad_error)
    return worst


# ------------------------------------------------------------------------------------------------
# Measurement


def measure(args, device: torch.device, bandwidth: float) -> list[Row]:
    """Each setting's providers timed in turns, one call each per round, so that a slow spell of
    a shared machine falls on all of them alike rather than on whichever ran then."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for batch, weights in itertools.product(args.batch, args.weights):
        label = f"B={batch} {weights}"
        sets = [make_inputs(batch, weights, device, generator) for _ in range(args.buffer_sets)]
        skipped, functions, results = {}, {}, {}
        for provider in args.providers:
            if provider in NO_GRADIENT_TERM and args.grad_weight > 0:
                skipped[provider] = "skipped: no gradient term"
                continue
            function = loss_function(provider, args.grad_weight)
            try:
                results[provider] = loss_and_gradient(function, sets[0])  # also compiles, for compile
            except Exception as error:  # torch.compile can fail on a machine (no C++ compiler, ...)
                if provider != "compile":
                    raise
                first_line = (str(error).strip().splitlines() or [""])[0][:120]
                skipped[provider] = f"failed: {type(error).__name__}: {first_line}"
                continue
            functions[provider] = function
        worst = check_agreement(label, results)
        print(f"[pixel_weight] {label}: {', '.join(functions)} agree within {worst:.1e}"
              + "".join(f"; {name} {reason}" for name, reason in skipped.items()), file=sys.stderr, flush=True)

        def prepare(i):
            inputs = sets[i % len(sets)]
            inputs["pred"].grad = None
            return inputs

        steps = {
            provider: (lambda inputs, f=function: f(inputs).backward()) for provider, function in functions.items()
        }
        samples = timing.time_in_turns(steps, prepare, args.warmup, args.repeats, device)
        for provider in args.providers:
            row = Row(batch, weights, provider, unavoidable_bytes=unavoidable_bytes(sets[0]), copy_bandwidth=bandwidth)
            if provider in samples:
                row.median_ms, row.p20_ms, row.p80_ms = timing.summarize(samples[provider])
            else:
                row.status = skipped[provider]
            rows.append(row)
        for inputs in sets:
            inputs["pred"].grad = None
    add_speedups(rows)
    return rows


def add_speedups(rows: list[Row]) -> None:
    """Speed-ups vs mmpose and vs compile, from the medians of the same setting."""
    medians = {(row.batch, row.weights, row.provider): row.median_ms for row in rows if row.median_ms is not None}
    for row in rows:
        if row.median_ms is None:
            continue
        for base in NO_GRADIENT_TERM:
            base_ms = medians.get((row.batch, row.weights, base))
            if base_ms is not None and row.provider != base:
                setattr(row, f"speedup_vs_{base}", base_ms / row.median_ms)


# ------------------------------------------------------------------------------------------------
# Output


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(rows: list[Row]) -> str:
    lines = [
        "| batch | weights | provider | median ms | p20-p80 ms | vs mmpose | vs compile | % copy BW |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.median_ms is None:
            lines.append(f"| {row.batch} | {row.weights} | {row.provider} | {row.status} | - | - | - | - |")
            continue
        pct = row.pct_copy_bw
        lines.append(
            f"| {row.batch} | {row.weights} | {row.provider} | {row.median_ms:.3f} | "
            f"{row.p20_ms:.3f}-{row.p80_ms:.3f} | {_ratio(row.speedup_vs_mmpose)} | "
            f"{_ratio(row.speedup_vs_compile)} | {'-' if pct is None else f'{pct:.1f}%'} |"
        )
    return "\n".join(lines)


def write_csv(path: Path, rows: list[Row], grad_weight: float, info: dict[str, str]) -> None:
    fields = ["batch", "weights", "provider", "grad_weight", "median_ms", "p20_ms", "p80_ms", "speedup_vs_mmpose",
              "speedup_vs_compile", "unavoidable_bytes", "pct_copy_bw", "status", *info]

    def number(value):
        return "" if value is None else f"{value:.6g}"

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({
                "batch": row.batch, "weights": row.weights, "provider": row.provider, "grad_weight": f"{grad_weight:g}",
                "median_ms": number(row.median_ms), "p20_ms": number(row.p20_ms), "p80_ms": number(row.p80_ms),
                "speedup_vs_mmpose": number(row.speedup_vs_mmpose),
                "speedup_vs_compile": number(row.speedup_vs_compile),
                "unavoidable_bytes": row.unavoidable_bytes, "pct_copy_bw": number(row.pct_copy_bw),
                "status": row.status, **info,
            })


def plot(path: Path, rows: list[Row]) -> bool:
    """Bars of each provider's speed-up vs mmpose per setting (vs reference when mmpose was not
    timed, i.e. with the gradient term); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timed = [row for row in rows if row.median_ms is not None]
    base = "mmpose" if any(row.provider == "mmpose" for row in timed) else "reference"
    medians = {(row.batch, row.weights, row.provider): row.median_ms for row in timed}
    settings = list(dict.fromkeys((row.batch, row.weights) for row in rows))
    providers = [name for name in dict.fromkeys(row.provider for row in timed) if name != base]
    figure, axes = plt.subplots(figsize=(max(7.0, 1.4 * len(settings)), 4.2))
    width = 0.8 / max(len(providers), 1)
    for index, provider in enumerate(providers):
        values = []
        for batch, weights in settings:
            mine, theirs = medians.get((batch, weights, provider)), medians.get((batch, weights, base))
            values.append(theirs / mine if mine and theirs else 0.0)
        axes.bar([n + index * width for n in range(len(settings))], values, width, label=provider)
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xticks([n + width * (len(providers) - 1) / 2 for n in range(len(settings))])
    axes.set_xticklabels([f"B={batch}\n{weights}" for batch, weights in settings])
    axes.set_ylabel(f"speed-up vs {base} (median ratio)")
    axes.set_yscale("log")
    axes.set_title(f"KeypointMSELoss forward+backward, K={JOINTS}, {HEIGHT}x{WIDTH}, float32")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark per-pixel weights (mmpose's KeypointMSELoss with a mask or pixel-wise weights) "
        "in hgloss's fused backends against mmpose's formula, torch.compile and the reference backend.",
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--batch", default="32,64", help="batch sizes [32,64]")
    parser.add_argument("--weights", default=",".join(WEIGHTS), help=f"weight settings [{','.join(WEIGHTS)}]")
    parser.add_argument("--providers", help="default: mmpose, compile, reference and every fused backend of the device")
    parser.add_argument("--grad-weight", type=float, default=0.0,
                        help="hgloss's gradient term; above 0 mmpose and compile are skipped [0]")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per provider and setting [30]")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before them [5]")
    parser.add_argument("--buffer-sets", type=int, default=3, help="input sets to rotate [3]")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device-tag>/pixel_weight)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.batch = timing.parse_list(args.batch, int)
    except ValueError as error:
        raise SystemExit(f"bench_pixel_weight.py: error: {error}") from None
    args.weights = timing.parse_list(args.weights)
    unknown = [name for name in args.weights if name not in WEIGHTS]
    if unknown:
        raise SystemExit(f"bench_pixel_weight.py: error: unknown weights {unknown}; expected {list(WEIGHTS)}")
    if not args.grad_weight >= 0 or args.repeats < 1 or args.warmup < 0 or args.buffer_sets < 1:
        raise SystemExit("bench_pixel_weight.py: error: --grad-weight >= 0, --repeats >= 1, --warmup >= 0 "
                         "and --buffer-sets >= 1 needed")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fused = fused_backends(device)
    known = [*BASELINES, *fused]
    args.providers = timing.parse_list(args.providers) if args.providers else known
    unknown = [name for name in args.providers if name not in known]
    if unknown:
        raise SystemExit(f"bench_pixel_weight.py: error: providers {unknown} not available on {device.type}; "
                         f"expected some of {known}")
    out = args.out or Path(__file__).resolve().parent / "results" / timing.device_tag(device) / "pixel_weight"
    out.mkdir(parents=True, exist_ok=True)

    bandwidth = timing.copy_bandwidth(device)
    rows = measure(args, device, bandwidth)
    info = timing.machine_record(device, bandwidth)
    write_csv(out / "bench_pixel_weight.csv", rows, args.grad_weight, info)
    command = timing.command_line(argv)
    term = ("grad_weight 0 (mmpose's loss)" if args.grad_weight == 0 else
            f"grad_weight {args.grad_weight:g} (mmpose and compile have no gradient term: skipped)")
    summary = [
        f"# Per-pixel weights (mmpose KeypointMSELoss): {info['device_name']}",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {info['torch_version']}, "
        f"hgloss {info['hgloss_version']}, {info['torch_threads']} threads, "
        f"copy bandwidth {info['copy_gbps']} GB/s. Command: `{command}`",
        "",
        f"Loss forward+backward, K={JOINTS}, {HEIGHT}x{WIDTH}, float32, loss_weight {LOSS_WEIGHT:g}, {term}; "
        f"{args.repeats} timed runs after {args.warmup}, providers in turns. Weights: mask = (B, 1, H, W) 0/1 mask, "
        "pixel = (B, K, H, W) target_weights, plane = (B, K) target_weights (no per-pixel factor). "
        "\"vs mmpose\", \"vs compile\": their median over this row's; \"% copy BW\": P, G, weights and mask read "
        "and dL/dP written once, over the copy bandwidth (fused providers).",
        "",
        table(rows),
    ]
    text = "\n".join(summary) + "\n"
    (out / "pixel_weight.md").write_text(text)
    plotted = plot(out / "pixel_weight.png", rows)
    print(text)
    print(f"wrote {out}/bench_pixel_weight.csv, pixel_weight.md" + (", pixel_weight.png" if plotted else ""))


if __name__ == "__main__":
    main()
