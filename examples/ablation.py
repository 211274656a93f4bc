"""Trains mse, hg and hg+sd on the synthetic set with a few seeds each and prints COCO AP as
mean +- std with the wall time, so the three losses can be compared on equal terms.

Every run uses the same data, model, schedule and evaluation (examples/configs/synthetic.yaml
unless --config says otherwise); only the loss and the seed differ. The seed sets the model's
initialisation and the order and augmentation of the batches; the synthetic set itself is the
same for all runs. It writes every run to --out/<loss>-seed<seed>/ and the table to
--out/ablation.md, and prints the table last.

    python examples/ablation.py --seeds 0,1,2                 # about 25 minutes per seed on 2 CPU cores
    python examples/ablation.py --seeds 0 --epochs 8          # a shorter look
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

from hgloss.pose.training import LOSSES, Trainer, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "synthetic.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML settings shared by every run")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds [0,1,2]")
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated subset of {list(LOSSES)}")
    parser.add_argument("--epochs", type=int, help="override the config's epochs (and scale its lr steps)")
    parser.add_argument("--out", default="runs/ablation", help="output folder [runs/ablation]")
    args = parser.parse_args(argv)
    seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    losses = [loss for loss in args.losses.split(",") if loss]
    if unknown := [loss for loss in losses if loss not in LOSSES]:
        parser.error(f"unknown losses {unknown}; expected a subset of {list(LOSSES)}")
    out = Path(args.out)
    shared = {"data_root": str(out / "data"), "progress": False}
    if args.epochs:
        base = load_config(args.config, {})
        shared["epochs"] = args.epochs
        shared["lr_steps"] = [max(1, round(step * args.epochs / base.epochs)) for step in base.lr_steps]
        shared["eval_every"] = args.epochs

    results: dict[str, list[tuple[float, float]]] = {loss: [] for loss in losses}
    for seed in seeds:
        for loss in losses:
            config = load_config(args.config, {**shared, "loss": loss, "seed": seed,
                                               "out": str(out / f"{loss.replace('+', '_')}-seed{seed}")})
            started = time.perf_counter()
            metrics = Trainer(config).fit()
            seconds = time.perf_counter() - started
            results[loss].append((metrics["AP"], seconds))
            print(f"{loss} seed {seed}: AP {metrics['AP']:.4f} in {seconds / 60:.1f} min", file=sys.stderr, flush=True)

    lines = [
        f"Synthetic set, {args.config}, seeds {seeds}" + (f", {args.epochs} epochs" if args.epochs else ""),
        "",
        "| loss | AP mean | AP std | APs | minutes per run |",
        "| --- | --- | --- | --- | --- |",
    ]
    for loss, runs in results.items():
        aps = [ap for ap, _ in runs]
        spread = statistics.stdev(aps) if len(aps) > 1 else float("nan")
        minutes = statistics.mean(seconds for _, seconds in runs) / 60
        lines.append(f"| {loss} | {statistics.mean(aps):.4f} | {spread:.4f} | "
                     f"{', '.join(f'{ap:.4f}' for ap in aps)} | {minutes:.1f} |")
    table = "\n".join(lines)
    (out / "ablation.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
