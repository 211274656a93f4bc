"""Benchmark of fused keypoint targets: the loss builds the Gaussians, the data loader does not.

Two measurements, side by side in one run:

1. The loss, forward+backward, for each batch size and teacher setting, with these providers:

     fused          hgloss.keypoint_heatmap_loss on a fused backend: (B, K, 2) keypoints in, the
                    target evaluated in registers from per-plane factors, no target tensor
     materialised   hgloss.heatmap_gradient_loss on the same backend, reading the (B, K, H, W)
                    target the data loader built
     compile        torch.compile of "build the Gaussians from the keypoints, then the reference
                    loss" (hgloss.targets' formula multiplied out, then backend="reference")
     eager          the same function without compiling

   Before timing, every provider's loss is checked against the materialised one (1e-5 relative).
   The providers of a setting are timed in turns, one call each per round.
   "% copy BW" counts only the bytes the fused call cannot avoid: P (and S) read, dL/dP written,
   plus the factors (B*K*(H+W) float64), over the bandwidth of a large copy on the same device.

2. The data loader: samples per second of hgloss.pose's TopDownDataset on the synthetic set
   (COCO layout, augmentation on, decoded images cached), with heatmap targets (the codec paints
   (K, H, W) per sample) and with keypoint targets (no painting), for each --workers count; the
   two forms take timed passes in turns. "target bytes per batch" is what a trainer copies to
   the device for the targets of one collated batch.

It prints markdown tables and writes bench_keypoint_targets.csv, keypoint_targets.md and (with
matplotlib) keypoint_targets.png to --out (default benchmarks/results/<device-tag>/keypoint_targets).

Examples::

    python benchmarks/bench_keypoint_targets.py                    # B=64,128, teacher off,on; workers 0,2
    python benchmarks/bench_keypoint_targets.py --batch 64 --skip-loader --repeats 50
    python benchmarks/bench_keypoint_targets.py --device cuda --out /tmp/bench

On a 2-core CPU the default run takes about two minutes: the synthetic set is rendered once
(about 20 s), and each compile provider compiles first.
"""

import argparse
import csv
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import hgloss
from hgloss import targets

try:
    from . import _timing as timing
except ImportError:  # run as a script: its folder, benchmarks/, is on sys.path
    import _timing as timing

JOINTS, HEIGHT, WIDTH, SIGMA = 17, 64, 48, 2.0
INPUT_SIZE = (192, 256)  # (width, height) of the crops, four times the heatmap
ALPHA = 0.5
LOSS_RTOL = 1e-5
PROVIDERS = ("fused", "materialised", "compile", "eager")
LOADER_BATCH = 32


@dataclass
class LossRow:
    batch: int
    teacher: bool
    provider: str
    backend: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    unavoidable_bytes: int
    copy_bandwidth: float

    @property
    def pct_copy_bw(self) -> float:
        return 100 * self.unavoidable_bytes / (self.median_ms / 1e3) / self.copy_bandwidth


@dataclass
class LoaderRow:
    targets: str
    workers: int
    samples_per_s: float
    batches: int
    target_bytes: int  # of one collated batch's targets and weights: what a trainer copies to the device


# ------------------------------------------------------------------------------------------------
# The loss


def keypoint_inputs(batch: int, teacher: bool, device: torch.device, generator: torch.Generator) -> dict:
    """A batch as a data loader hands it over: keypoints in heatmap pixels (some outside the map,
    about a fifth invisible), 0/1 weights, the heatmaps the codec would paint for them, and pred
    (and teacher) heatmaps."""
    size = torch.tensor([WIDTH, HEIGHT], dtype=torch.float64)
    keypoints = torch.rand(batch, JOINTS, 2, generator=generator, dtype=torch.float64) * (size + 8) - 4
    weights = (torch.rand(batch, JOINTS, generator=generator) > 0.2).to(torch.float32)
    rows, cols, reaches = targets.gaussian_factors(keypoints, weights, HEIGHT, WIDTH, SIGMA, "msra")
    shape = (batch, JOINTS, HEIGHT, WIDTH)
    return {
        "pred": torch.rand(shape, generator=generator).to(device).requires_grad_(),
        "keypoints": keypoints.to(device),
        "weights": weights.to(device),
        "target": targets.materialise(rows, cols).to(device),
        "target_weight": (weights * reaches).to(torch.float32).to(device),
        "teacher": torch.rand(shape, generator=generator).to(device) if teacher else None,
    }


def generate_then_reference(pred, keypoints, weights, teacher):
    """What a user writes without hgloss's fused targets: Gaussians from the keypoints, then the loss."""
    rows, cols, reaches = targets.gaussian_factors(keypoints, weights, HEIGHT, WIDTH, SIGMA, "msra")
    return hgloss.heatmap_gradient_loss(
        pred, targets.materialise(rows, cols), weights * reaches, teacher=teacher, alpha=ALPHA, backend="reference"
    )


def loss_function(provider: str, backend: str):
    if provider == "fused":
        return lambda x: hgloss.keypoint_heatmap_loss(
            x["pred"], x["keypoints"], x["weights"], sigma=SIGMA, teacher=x["teacher"], alpha=ALPHA, backend=backend
        )
    if provider == "materialised":
        return lambda x: hgloss.heatmap_gradient_loss(
            x["pred"], x["target"], x["target_weight"], teacher=x["teacher"], alpha=ALPHA, backend=backend
        )
    function = generate_then_reference
    if provider == "compile":
        torch._dynamo.reset()
        function = torch.compile(generate_then_reference, dynamic=False)
    return lambda x: function(x["pred"], x["keypoints"], x["weights"], x["teacher"])


def unavoidable_bytes(batch: int, teacher: bool) -> int:
    """P (and S) read and dL/dP written in float32, plus the float64 factors."""
    heatmap = batch * JOINTS * HEIGHT * WIDTH * 4
    return heatmap * (3 if teacher else 2) + batch * JOINTS * (HEIGHT + WIDTH) * 8


def measure_loss(args, device: torch.device, backend: str, bandwidth: float) -> list[LossRow]:
    """Each setting's providers timed in turns, one call each per round, so that a slow spell of
    a shared machine falls on all of them alike rather than on whichever ran then."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for batch in args.batch:
        for teacher in args.teacher:
            sets = [keypoint_inputs(batch, teacher, device, generator) for _ in range(args.buffer_sets)]
            functions = {provider: loss_function(provider, backend) for provider in args.providers}
            expected = functions["materialised"](sets[0]).item() if "materialised" in functions else None
            label = f"B={batch} teacher {'on' if teacher else 'off'}"
            print(f"[loss] {label}: {', '.join(functions)}", file=sys.stderr, flush=True)
            for provider, function in functions.items():
                got = function(sets[0]).item()  # also compiles the compile provider
                if expected is not None and abs(got - expected) > LOSS_RTOL * abs(expected):
                    raise AssertionError(f"{label} {provider}: loss {got:.8g} differs from the materialised {expected:.8g}")

            def prepare(i):
                inputs = sets[i % len(sets)]
                inputs["pred"].grad = None
                return inputs

            steps = {
                provider: (lambda inputs, f=function: f(inputs).backward()) for provider, function in functions.items()
            }
            samples = timing.time_in_turns(steps, prepare, args.warmup, args.repeats, device)
            for provider, taken in samples.items():
                median, p20, p80 = timing.summarize(taken)
                rows.append(
                    LossRow(batch, teacher, provider, backend if provider in ("fused", "materialised") else "reference",
                            median, p20, p80, unavoidable_bytes(batch, teacher), bandwidth)
                )
    return rows


# ------------------------------------------------------------------------------------------------
# The data loader


def measure_loader(args) -> list[LoaderRow]:
    """Samples per second of the synthetic set's training loader (augmentation on), with heatmap
    targets and with keypoint targets, through a DataLoader as the trainer builds one."""
    from hgloss.pose import codecs, datasets, synthetic

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        print(f"[loader] rendering {args.loader_images} synthetic images", file=sys.stderr, flush=True)
        image_dir, annotation_file = synthetic.write_synthetic_coco(folder, {"train": args.loader_images})["train"]
        records, _ = datasets.coco_records(str(annotation_file), str(image_dir), INPUT_SIZE)
        codec = codecs.MSRAHeatmap(INPUT_SIZE, (WIDTH, HEIGHT), SIGMA)
        seeds = torch.randint(0, 2**31, (len(records),), generator=torch.Generator().manual_seed(0)).tolist()
        # (index, augmentation seed, replayed), as the trainer's batch sampler yields them.
        items = [(index, seed, False) for index, seed in enumerate(seeds)]
        for workers in args.workers:
            loaders = {}
            for form in ("heatmaps", "keypoints"):
                dataset = datasets.TopDownDataset(
                    records, codec, datasets.Augmentation(), cache_images=True, targets=form
                )
                loaders[form] = torch.utils.data.DataLoader(
                    dataset, batch_size=LOADER_BATCH, sampler=items, num_workers=workers,
                    persistent_workers=workers > 0,
                )
            print(f"[loader] {workers} workers: heatmap and keypoint targets", file=sys.stderr, flush=True)
            for loader in loaders.values():  # starts the workers and fills their image caches
                for _ in loader:
                    pass
            # The two forms take passes in turns, so that a slow spell of the machine hits both.
            seconds = dict.fromkeys(loaders, 0.0)
            counts = dict.fromkeys(loaders, (0, 0))
            target_bytes = {}
            for _ in range(args.loader_epochs):
                for form, loader in loaders.items():
                    begin = time.perf_counter()
                    samples, batches, target_bytes[form] = _one_pass(loader)
                    seconds[form] += time.perf_counter() - begin
                    counts[form] = (counts[form][0] + samples, counts[form][1] + batches)
            for form in loaders:
                rows.append(
                    LoaderRow(form, workers, counts[form][0] / seconds[form], counts[form][1], target_bytes[form])
                )
            del loaders
    return rows


TARGET_FIELDS = ("target", "target_weight", "keypoints", "keypoint_weight")


def _one_pass(loader) -> tuple[int, int, int]:
    """(samples, batches, target bytes of the first batch) of one pass over the loader."""
    samples = batches = target_bytes = 0
    for batch in loader:
        if batches == 0:
            target_bytes = sum(batch[name].nbytes for name in TARGET_FIELDS if name in batch)
        samples += len(batch["index"])
        batches += 1
    return samples, batches, target_bytes


# ------------------------------------------------------------------------------------------------
# Output


def loss_table(rows: list[LossRow]) -> str:
    lines = [
        "| batch | teacher | provider | backend | median ms | p20-p80 ms | % copy BW | fused is x faster |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fused = {(row.batch, row.teacher): row.median_ms for row in rows if row.provider == "fused"}
    for row in rows:
        speedup = fused.get((row.batch, row.teacher))
        lines.append(
            f"| {row.batch} | {'on' if row.teacher else 'off'} | {row.provider} | {row.backend} | "
            f"{row.median_ms:.3f} | {row.p20_ms:.3f}-{row.p80_ms:.3f} | "
            f"{row.pct_copy_bw:.1f}% | {'-' if speedup is None or row.provider == 'fused' else f'{row.median_ms / speedup:.2f}x'} |"
        )
    return "\n".join(lines)


def loader_table(rows: list[LoaderRow]) -> str:
    lines = [
        "| workers | targets | samples/s | keypoints vs heatmaps | target bytes per batch |",
        "|---|---|---|---|---|",
    ]
    heatmaps = {row.workers: row.samples_per_s for row in rows if row.targets == "heatmaps"}
    for row in rows:
        ratio = "-" if row.targets == "heatmaps" else f"{row.samples_per_s / heatmaps[row.workers]:.2f}x"
        lines.append(f"| {row.workers} | {row.targets} | {row.samples_per_s:.1f} | {ratio} | {row.target_bytes} |")
    return "\n".join(lines)


def write_csv(path: Path, loss_rows: list[LossRow], loader_rows: list[LoaderRow], info: dict[str, str]) -> None:
    fields = ["part", "batch", "teacher", "provider", "backend", "median_ms", "p20_ms", "p80_ms",
              "unavoidable_bytes", "pct_copy_bw", "targets", "workers", "samples_per_s", "batches", "target_bytes",
              *info]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        for row in loss_rows:
            writer.writerow({
                "part": "loss", "batch": row.batch, "teacher": "on" if row.teacher else "off",
                "provider": row.provider, "backend": row.backend, "median_ms": f"{row.median_ms:.6g}",
                "p20_ms": f"{row.p20_ms:.6g}", "p80_ms": f"{row.p80_ms:.6g}",
                "unavoidable_bytes": row.unavoidable_bytes, "pct_copy_bw": f"{row.pct_copy_bw:.4g}", **info,
            })
        for row in loader_rows:
            writer.writerow({
                "part": "loader", "batch": LOADER_BATCH, "targets": row.targets, "workers": row.workers,
                "samples_per_s": f"{row.samples_per_s:.6g}", "batches": row.batches,
                "target_bytes": row.target_bytes, **info,
            })


def plot(path: Path, loss_rows: list[LossRow], loader_rows: list[LoaderRow]) -> bool:
    """Bars of the loss's median ms per setting and of the loader's samples/s; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, 2 if loader_rows else 1, figsize=(12 if loader_rows else 7, 4.2), squeeze=False)
    settings = sorted({(row.batch, row.teacher) for row in loss_rows})
    providers = [name for name in PROVIDERS if any(row.provider == name for row in loss_rows)]
    width = 0.8 / max(len(providers), 1)
    medians = {(row.batch, row.teacher, row.provider): row.median_ms for row in loss_rows}
    for index, provider in enumerate(providers):
        values = [medians.get((batch, teacher, provider), 0.0) for batch, teacher in settings]
        axes[0][0].bar([n + index * width for n in range(len(settings))], values, width, label=provider)
    axes[0][0].set_xticks([n + width * (len(providers) - 1) / 2 for n in range(len(settings))])
    axes[0][0].set_xticklabels([f"B={batch}\nteacher {'on' if teacher else 'off'}" for batch, teacher in settings])
    axes[0][0].set_ylabel("forward+backward, median ms")
    axes[0][0].set_yscale("log")
    axes[0][0].set_title("loss with targets from keypoints")
    axes[0][0].legend()
    if loader_rows:
        workers = sorted({row.workers for row in loader_rows})
        rates = {(row.workers, row.targets): row.samples_per_s for row in loader_rows}
        for index, form in enumerate(("heatmaps", "keypoints")):
            axes[0][1].bar([n + index * 0.4 for n in range(len(workers))],
                           [rates.get((count, form), 0.0) for count in workers], 0.4, label=f"{form} targets")
        axes[0][1].set_xticks([n + 0.2 for n in range(len(workers))])
        axes[0][1].set_xticklabels([f"{count} workers" for count in workers])
        axes[0][1].set_ylabel("samples / s")
        axes[0][1].set_title("training data loader (synthetic set)")
        axes[0][1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark hgloss.keypoint_heatmap_loss (targets built in the loss) against materialised "
        "targets and torch.compile, and the data loader with and without target generation.",
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--backend", help="fused backend (default: the first fused one available on the device)")
    parser.add_argument("--batch", default="64,128", help="batch sizes of the loss [64,128]")
    parser.add_argument("--teacher", default="off,on", help="teacher settings of the loss [off,on]")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"[{','.join(PROVIDERS)}]")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per loss measurement [30]")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before them [5]")
    parser.add_argument("--buffer-sets", type=int, default=3, help="input sets to rotate [3]")
    parser.add_argument("--workers", default="0,2", help="data-loader worker counts [0,2]")
    parser.add_argument("--loader-images", type=int, default=200, help="synthetic images to load [200]")
    parser.add_argument("--loader-epochs", type=int, default=2, help="timed passes over them [2]")
    parser.add_argument("--skip-loader", action="store_true", help="measure the loss only")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device-tag>/keypoint_targets)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.batch = timing.parse_list(args.batch, int)
        args.teacher = [value == "on" for value in timing.parse_list(args.teacher)]
        args.workers = timing.parse_list(args.workers, int)
    except ValueError as error:
        raise SystemExit(f"bench_keypoint_targets.py: error: {error}") from None
    args.providers = timing.parse_list(args.providers)
    unknown = [name for name in args.providers if name not in PROVIDERS]
    if unknown:
        raise SystemExit(f"bench_keypoint_targets.py: error: unknown providers {unknown}; expected {list(PROVIDERS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fused = [name for name in hgloss.available_backends() if name != "reference"
             and (name in ("cuda", "triton")) == (device.type == "cuda")]
    backend = args.backend or (fused[0] if fused else None)
    if backend is None:
        raise SystemExit(f"bench_keypoint_targets.py: error: no fused backend for {device.type} tensors here")
    out = args.out or Path(__file__).resolve().parent / "results" / timing.device_tag(device) / "keypoint_targets"
    out.mkdir(parents=True, exist_ok=True)

    bandwidth = timing.copy_bandwidth(device)
    loss_rows = measure_loss(args, device, backend, bandwidth)
    loader_rows = [] if args.skip_loader else measure_loader(args)
    info = timing.machine_record(device, bandwidth)
    write_csv(out / "bench_keypoint_targets.csv", loss_rows, loader_rows, info)
    command = timing.command_line(argv)
    summary = [
        f"# Fused keypoint targets: {info['device_name']}",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {info['torch_version']}, "
        f"{info['torch_threads']} threads, copy bandwidth {info['copy_gbps']} GB/s. Command: `{command}`",
        "",
        f"Loss forward+backward, K={JOINTS}, {HEIGHT}x{WIDTH}, float32, sigma {SIGMA}, "
        f"{args.repeats} timed runs after {args.warmup}:",
        "",
        loss_table(loss_rows),
    ]
    if loader_rows:
        summary += [
            "",
            f"Data loader, synthetic set ({args.loader_images} images), batch {LOADER_BATCH}, augmentation on, "
            f"{args.loader_epochs} timed passes after one untimed:",
            "",
            loader_table(loader_rows),
        ]
    text = "\n".join(summary) + "\n"
    (out / "keypoint_targets.md").write_text(text)
    plotted = plot(out / "keypoint_targets.png", loss_rows, loader_rows)
    print(text)
    print(f"wrote {out}/bench_keypoint_targets.csv, keypoint_targets.md" + (", keypoint_targets.png" if plotted else ""))


if __name__ == "__main__":
    main()
