"""Benchmark of a whole training step of a top-down pose model with each heatmap loss.

One step is what a trainer does per batch: zero the gradients, run the model, compute the loss,
backward, Adam step. The loss comes in three variants:

  mse          mmpose's KeypointMSELoss with target weights, mean(w * D^2)
  hg           the heatmap gradient loss, mse_weight = grad_weight = 1, forward stencil
  hg+teacher   the same with a teacher, the stored earlier predictions of replay
               self-distillation (float16, alpha 0.5), which cost no extra forward pass

and each variant is computed by these providers:

  eager        as users write it: mmpose's KeypointMSELoss code for mse; for hg, the gradient maps
               of pred and target taken separately and F.mse_loss (bench_loss.py's eager loss)
  reference    hgloss with backend="reference"
  compile      torch.compile of the reference loss (the loss only; the model stays eager)
  <backend>    every fused hgloss backend that runs on the device

Each provider trains its own copy of the same initial model on the same batches. Providers are
timed in interleaved rounds, so drifts of a shared machine spread over all of them. Besides the
step, the loss's own forward+backward is timed on a tensor shaped like the model's output, and
a step whose loss is a plain weighted sum of the output ("model only") gives the step's cost
without any heatmap loss. The table reports the step, the loss alone, the loss's share of the
step, and the step's speed-up over eager.

The model comes from hgloss.pose.models (SimpleBaseline: a ResNet and three 4x4 deconvolutions,
stride 4 heatmaps; or HRNet), with random weights, since its speed does not depend on them.

Examples::

    python benchmarks/bench_train_step.py                           # CPU: simplebaseline_res18_small, B=16
    python benchmarks/bench_train_step.py --device cuda             # simplebaseline_res50, 256x192, B=32
    python benchmarks/bench_train_step.py --model hrnet_w32 --batch 8 --rounds 2 --out /tmp/step

It prints a markdown table and writes train_step.csv, train_step.md and train_step.png to
benchmarks/results/<device-tag>/.
"""

import argparse
import copy
import csv
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import hgloss
from hgloss.pose import models

try:
    from . import _timing as timing
    from .bench_loss import eager_loss, fused_backends, machine_info
except ImportError:  # run as a script: its folder, benchmarks/, is on sys.path
    import _timing as timing
    from bench_loss import eager_loss, fused_backends, machine_info

VARIANTS = ("mse", "hg", "hg+teacher")
BASELINES = ("eager", "reference", "compile")
MODEL_ONLY = "model only"
ALPHA = 0.5
LOSS_RTOL = 1e-4
JOINTS = 17


# ------------------------------------------------------------------------------------------------
# Losses

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def mmpose_keypoint_mse(output: torch.Tensor, target: torch.Tensor, target_weights: torch.Tensor) -> torch.Tensor:
    """mmpose 1.x's KeypointMSELoss(use_target_weight=True) forward: the (B, K) weights as a mask."""
    mask = target_weights.view(target_weights.shape + (1,) * (target.ndim - target_weights.ndim))
    return (F.mse_loss(output, target, reduction="none") * mask).mean()


def hgloss_loss(variant: str, backend: str) -> LossFn:
    if variant == "mse":
        criterion = hgloss.compat.KeypointMSELoss(use_target_weight=True, backend=backend)
        return lambda output, target, weight, teacher: criterion(output, target, weight)
    return lambda output, target, weight, teacher: hgloss.heatmap_gradient_loss(
        output, target, weight, teacher=teacher, alpha=ALPHA, backend=backend
    )


def make_loss(variant: str, provider: str) -> LossFn:
    """The provider's loss for a variant; compile gets a freshly compiled function."""
    if provider == "eager":
        if variant == "mse":
            return lambda output, target, weight, teacher: mmpose_keypoint_mse(output, target, weight)
        return lambda output, target, weight, teacher: eager_loss(output, target, weight, teacher, ALPHA, "forward")
    if provider == "compile":
        return torch.compile(hgloss_loss(variant, "reference"), dynamic=False)
    return hgloss_loss(variant, provider)


# ------------------------------------------------------------------------------------------------
# Batches and measurements


@dataclass
class Batch:
    images: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    teacher: torch.Tensor


def make_batches(count: int, batch: int, height: int, width: int, device: torch.device) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    heatmap_shape = (batch, JOINTS, height // 4, width // 4)
    batches = []
    for _ in range(count):
        images = torch.randn(batch, 3, height, width, generator=generator)
        target = torch.rand(heatmap_shape, generator=generator)
        # mmpose's (B, K) keypoint weights: mostly 1, some joints not labelled.
        weight = (torch.rand(batch, JOINTS, generator=generator) > 0.2).float()
        teacher = torch.rand(heatmap_shape, generator=generator).half()
        batches.append(Batch(*(tensor.to(device) for tensor in (images, target, weight, teacher))))
    return batches


@dataclass
class Row:
    variant: str
    provider: str
    step_ms: list[float] = field(default_factory=list)
    loss_ms: list[float] = field(default_factory=list)
    warmup_s: float = 0.0

    def step(self) -> tuple[float, float, float]:
        return timing.summarize(self.step_ms)

    def loss(self) -> tuple[float, float, float] | None:
        return timing.summarize(self.loss_ms) if self.loss_ms else None


class Trainer:
    """One provider's model copy, optimizer and loss, and its timed step."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: list[Batch], uses_teacher: bool) -> None:
        self.model = copy.deepcopy(model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.loss_fn = loss_fn
        self.batches = batches
        self.uses_teacher = uses_teacher

    def prepare(self, index: int) -> Batch:
        self.optimizer.zero_grad(set_to_none=True)
        return self.batches[index % len(self.batches)]

    def step(self, batch: Batch) -> torch.Tensor:
        output = self.model(batch.images)
        loss = self.loss_fn(output, batch.target, batch.weight, batch.teacher if self.uses_teacher else None)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def model_only_loss(output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, teacher) -> torch.Tensor:
    """A loss of negligible cost with the heatmap loss's gradient shape: a weighted sum."""
    return (output * target).mean()


def check_against_eager(variant: str, provider: str, loss_fn: LossFn, output: torch.Tensor, batch: Batch) -> None:
    """The provider's loss and dL/doutput must match eager's on the same output."""
    teacher = batch.teacher if variant == "hg+teacher" else None
    results = []
    for fn in (make_loss(variant, "eager"), loss_fn):
        pred = output.detach().clone().requires_grad_()
        loss = fn(pred, batch.target, batch.weight, teacher)
        loss.backward()
        results.append((loss.item(), pred.grad))
    (eager_value, eager_grad), (value, grad) = results
    value_error = abs(value - eager_value) / max(abs(eager_value), 1e-30)
    grad_error = (grad - eager_grad).abs().max().item() / max(eager_grad.abs().max().item(), 1e-30)
    if value_error > LOSS_RTOL or grad_error > LOSS_RTOL:
        raise AssertionError(
            f"{provider} disagrees with eager on {variant}: loss {value:.8g} vs {eager_value:.8g}, "
            f"relative errors {value_error:.1e} (loss) and {grad_error:.1e} (gradient)"
        )


def time_loss_alone(loss_fn: LossFn, output: torch.Tensor, batch: Batch, uses_teacher: bool, repeats: int,
                    device: torch.device) -> list[float]:
    """Forward+backward of the loss on a tensor shaped like the model's output."""
    pred = output.detach().clone().requires_grad_()

    def prepare(index: int) -> None:
        pred.grad = None

    def step(_: None) -> None:
        loss_fn(pred, batch.target, batch.weight, batch.teacher if uses_teacher else None).backward()

    return timing.time_ms(prepare, step, repeats, device)


# ------------------------------------------------------------------------------------------------
# Output


def markdown_table(rows: list[Row]) -> str:
    eager_step = {row.variant: row.step()[0] for row in rows if row.provider == "eager"}
    model_only = next(row.step()[0] for row in rows if row.provider == MODEL_ONLY)
    lines = [
        "| loss | provider | step median ms (p20-p80) | loss alone ms | loss share of step | step - model-only step ms | step vs eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        median, p20, p80 = row.step()
        loss = row.loss()
        fused = row.provider not in BASELINES + (MODEL_ONLY,)
        provider = f"**{row.provider}**" if fused else row.provider
        if row.provider == MODEL_ONLY:
            lines.append(f"| - | {provider} | {median:.1f} ({p20:.1f}-{p80:.1f}) | - | - | 0 | - |")
            continue
        speedup = f"{eager_step[row.variant] / median:.2f}x" if row.variant in eager_step else "-"
        lines.append(
            f"| {row.variant} | {provider} | {median:.1f} ({p20:.1f}-{p80:.1f}) | {loss[0]:.2f} | "
            f"{100 * loss[0] / median:.1f}% | {median - model_only:+.1f} | {speedup} |"
        )
    return "\n".join(lines)


def write_csv(path: Path, rows: list[Row], settings: dict[str, str], info: dict[str, str]) -> None:
    fields = ["variant", "provider", "runs", "step_median_ms", "step_p20_ms", "step_p80_ms", "loss_median_ms",
              "loss_p20_ms", "loss_p80_ms", "loss_share", "warmup_s", *settings, *info]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            step = row.step()
            loss = row.loss() or (None, None, None)
            writer.writerow({
                "variant": row.variant, "provider": row.provider, "runs": len(row.step_ms),
                "step_median_ms": f"{step[0]:.4g}", "step_p20_ms": f"{step[1]:.4g}", "step_p80_ms": f"{step[2]:.4g}",
                "loss_median_ms": "" if loss[0] is None else f"{loss[0]:.4g}",
                "loss_p20_ms": "" if loss[1] is None else f"{loss[1]:.4g}",
                "loss_p80_ms": "" if loss[2] is None else f"{loss[2]:.4g}",
                "loss_share": "" if loss[0] is None else f"{loss[0] / step[0]:.4g}",
                "warmup_s": f"{row.warmup_s:.3g}", **settings, **info,
            })


def write_plot(path: Path, rows: list[Row], title: str) -> None:
    """Horizontal bars: each step split into the loss alone and the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if row.provider != MODEL_ONLY]
    labels = [f"{row.variant} / {row.provider}" for row in shown]
    steps = [row.step()[0] for row in shown]
    losses = [min(row.loss()[0], step) for row, step in zip(shown, steps, strict=True)]
    rest = [step - loss for step, loss in zip(steps, losses, strict=True)]
    figure, axes = plt.subplots(figsize=(9, 0.38 * len(shown) + 1.6))
    positions = range(len(shown))[::-1]
    axes.barh(positions, rest, color="#9db4c0", label="rest of the step")
    axes.barh(positions, losses, left=rest, color="#c44536", label="loss forward+backward")
    axes.set_yticks(list(positions), labels)
    axes.set_xlabel("median training-step time (ms)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, axis="x", alpha=0.3)
    figure.legend(loc="lower center", ncol=2)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------
# Main


def progress(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(part) for part in text.lower().split("x"))
    if height % 32 or width % 32:
        raise argparse.ArgumentTypeError(f"input size {text} must be a multiple of 32 in both dimensions")
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--model", choices=models.MODEL_NAMES,
                        help="default: simplebaseline_res50 on cuda, simplebaseline_res18_small on cpu")
    parser.add_argument("--batch", type=int, help="default: 32 on cuda, 16 on cpu")
    parser.add_argument("--input-size", type=parse_size, default=(256, 192), help="HxW of the images [256x192]")
    parser.add_argument("--providers", help="comma-separated; default: eager, reference, compile and every fused backend")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the providers [3]")
    parser.add_argument("--repeats", type=int, help="timed steps per provider and round; default: 10 on cuda, 3 on cpu")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per provider before the rounds [3]")
    parser.add_argument("--out", type=Path, help="output folder; default benchmarks/results/<device-tag>/")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train_step.py: error: --device cuda but torch sees no CUDA device")
    on_cuda = device.type == "cuda"
    model_name = args.model or ("simplebaseline_res50" if on_cuda else "simplebaseline_res18_small")
    batch_size = args.batch or (32 if on_cuda else 16)
    repeats = args.repeats or (10 if on_cuda else 3)
    if min(batch_size, args.rounds, repeats) < 1 or args.warmup < 0:
        raise SystemExit("bench_train_step.py: error: --batch, --rounds and --repeats must be >= 1, --warmup >= 0")
    variants = [name for name in args.variants.split(",") if name]
    if unknown := [name for name in variants if name not in VARIANTS]:
        raise SystemExit(f"bench_train_step.py: error: unknown variants {unknown}; expected {list(VARIANTS)}")
    providers = list(BASELINES) + fused_backends(device)
    if args.providers:
        wanted = args.providers.split(",")
        if unknown := [name for name in wanted if name not in providers]:
            raise SystemExit(f"bench_train_step.py: error: providers {unknown} are not available; have {providers}")
        providers = [name for name in providers if name in wanted]

    height, width = args.input_size
    torch.manual_seed(0)
    model = models.build_model(model_name, JOINTS).to(device)
    batches = make_batches(2, batch_size, height, width, device)
    with torch.no_grad():
        sample_output = model(batches[0].images)
    progress(
        f"{timing.device_name(device)}: {model_name} (hgloss.pose.models), batch {batch_size}, "
        f"{height}x{width} -> {tuple(sample_output.shape[1:])}; providers: {', '.join(providers)}"
    )

    rows = [Row("-", MODEL_ONLY)]
    trainers = {(MODEL_ONLY, "-"): Trainer(model, model_only_loss, batches, uses_teacher=False)}
    for variant in variants:
        for provider in providers:
            started = time.perf_counter()
            loss_fn = make_loss(variant, provider)
            check_against_eager(variant, provider, loss_fn, sample_output, batches[0])  # compiles, for compile
            trainers[(provider, variant)] = Trainer(model, loss_fn, batches, uses_teacher=variant == "hg+teacher")
            rows.append(Row(variant, provider, warmup_s=time.perf_counter() - started))

    for row in rows:
        trainer = trainers[(row.provider, row.variant)]
        started = time.perf_counter()
        timing.time_ms(trainer.prepare, trainer.step, args.warmup, device)
        row.warmup_s += time.perf_counter() - started
        if row.provider != MODEL_ONLY:
            row.loss_ms = time_loss_alone(trainer.loss_fn, sample_output, batches[0], trainer.uses_teacher,
                                          args.rounds * repeats, device)
        progress(f"warmed up {row.variant} / {row.provider} in {row.warmup_s:.1f} s")
    for round_index in range(args.rounds):
        for row in rows:
            trainer = trainers[(row.provider, row.variant)]
            row.step_ms += timing.time_ms(trainer.prepare, trainer.step, repeats, device, first=round_index * repeats)
        progress(f"round {round_index + 1}/{args.rounds} done")

    table = markdown_table(rows)
    print(table)
    out = args.out or Path(__file__).resolve().parent / "results" / timing.device_tag(device)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "device": device.type, "model": model_name, "batch": str(batch_size), "input_size": f"{height}x{width}",
        "joints": str(JOINTS), "dtype": "float32", "rounds": str(args.rounds), "repeats_per_round": str(repeats),
    }
    info = machine_info([device.type], {device.type: timing.copy_bandwidth(device)})
    write_csv(out / "train_step.csv", rows, settings, info)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    title = (f"{info['device_name']}: {model_name}, batch {batch_size}, {height}x{width}, "
             f"K={JOINTS}, float32, Adam")
    (out / "train_step.md").write_text(
        f"# Training step: {title}\n\n"
        f"Command: `{command}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"hgloss {hgloss.__version__}, {info['cpu_cores']} cores, {info['torch_threads']} torch threads.\n\n"
        f"{table}\n\n"
        f"A step is zero_grad, forward, loss, backward and Adam's step; medians over {args.rounds} interleaved "
        f"rounds of {repeats} steps each, after {args.warmup} warm-up steps and a check of the loss against "
        f"eager (where torch.compile compiles; warmup_s in the CSV). \"loss alone\" "
        f"is the loss's forward+backward on a tensor shaped like the model's output, timed on its own; "
        f"\"model only\" is the step with a negligible loss. The model is built in bench_train_step.py "
        f"(hgloss ships no model zoo); its weights are random, which does not change its speed.\n"
    )
    try:
        write_plot(out / "train_step.png", rows, title)
    except ImportError:
        progress("matplotlib is not installed: no plot")
    progress(f"wrote {out / 'train_step.csv'}, train_step.md and train_step.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
