"""The evidence study: which loss settings improve pose accuracy, measured on one protocol.

Every run trains one model on the synthetic COCO-format set with the protocol of
examples/configs/ablation.yaml (same data, data order, schedule shape and evaluation); only the
loss settings, the model and the seed differ. Self-distillation in replay mode adds iterations
to each epoch, so its runs get proportionally fewer epochs (same learning-rate schedule shape)
and every run takes about the same number of optimizer steps; each row records its count.

The settings (SETTINGS below) answer four questions:
  1. the gradient constraint: grad_weight swept over 0.1, 0.3, 1 and 4 (forward stencil); then,
     at the best weight, the central and Sobel stencils, the gradient-magnitude form, and the
     term switched on only after the first learning-rate drop;
  2. self-distillation at equal steps: replay and snapshot, with and without the gradient term;
  3. stepping: the snapshot teacher's distance stepping up at each decay against a fixed one;
  4. mechanism: each run's validation heatmaps are measured against their best-fitting
     isotropic Gaussian, with the peak value and the localisation error (runs.csv).
"The best weight" is the swept weight with the highest mean AP once every swept weight has
--best-after seeds for that model; it is written to --results/best_weights.json and kept from
then on.

Runs go to --runs/<model>/<setting>/seed<k>/ (the trainer's usual outputs). A finished run is
skipped: its result.json is there, or its row is in --results/runs.csv, so that a fresh clone
carries on from the committed record. An interrupted run resumes from its last.pt, so the study
can be stopped and started again (a resumed run's wall_s sums its parts: the trainer keeps the
time in its checkpoints). After every finished run the report is rewritten in
--results: runs.csv (one row per run), summary.md (per model: AP mean +- std, the paired
difference against mse with its 95% interval, the heatmap-shape metrics) and the plots.

    python examples/ablation.py                          # the whole study, 2 runs at a time
    python examples/ablation.py --models simplebaseline_res18_small --settings mse,hg-w1 --seeds 0,1
    python examples/ablation.py --report-only            # rebuild the report from finished runs
"""

import argparse
import concurrent.futures
import csv
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
DEFAULT_CONFIG = EXAMPLES / "configs" / "ablation.yaml"
DEFAULT_RESULTS = EXAMPLES.parent / "benchmarks" / "results" / "cpu-2core-amd-epyc" / "ablation"
MODELS = ("simplebaseline_res18_small", "hrnet_w8_small")  # the study's; --models takes any other too
SWEPT_WEIGHTS = (0.1, 0.3, 1.0, 4.0)
BEST = "best"  # a grad_weight resolved to the model's best swept weight
# The snapshot teacher's first distance, in optimizer steps: about one epoch of the protocol.
# A teacher one step behind the student (distance 1) differs from it by one Adam step only.
SNAPSHOT_DISTANCE = 48


@dataclass(frozen=True)
class Setting:
    """A named set of loss settings (TrainConfig overrides) and the models it runs on."""

    name: str
    overrides: dict = field(hash=False)
    models: tuple[str, ...] | None = None  # None: every model

    def runs_on(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def needs_best_weight(self) -> bool:
        return self.overrides.get("grad_weight") == BEST


def _swept(weight: float) -> Setting:
    return Setting(f"hg-w{weight:g}", {"loss": "hg", "grad_weight": weight})


_SNAPSHOT = {"loss": "hg+sd", "distill": "snapshot", "distance0": SNAPSHOT_DISTANCE}
SETTINGS = (
    Setting("mse", {"loss": "mse"}),
    *(_swept(weight) for weight in SWEPT_WEIGHTS),
    Setting("hg-central", {"loss": "hg", "grad_weight": BEST, "stencil": "central"}, MODELS[:1]),
    Setting("hg-sobel", {"loss": "hg", "grad_weight": BEST, "stencil": "sobel"}, MODELS[:1]),
    Setting("hg-magnitude", {"loss": "hg", "grad_weight": BEST, "gradient_form": "magnitude"}, MODELS[:1]),
    Setting("hg-late", {"loss": "hg", "grad_weight": BEST, "grad_start_epoch": "first_drop"}, MODELS[:1]),
    Setting("hg+sd-replay", {"loss": "hg+sd", "grad_weight": BEST, "distill": "replay"}, MODELS[:1]),
    Setting("hg+sd-snapshot", {**_SNAPSHOT, "grad_weight": BEST}),
    Setting("sd-snapshot", {**_SNAPSHOT, "grad_weight": 0.0}, MODELS[:1]),
    Setting("sd-snapshot-fixed", {**_SNAPSHOT, "grad_weight": 0.0, "step_factor": 1}, MODELS[:1]),
)
SETTING_NAMES = tuple(setting.name for setting in SETTINGS)

COLUMNS = (
    "model", "setting", "loss", "grad_weight", "stencil", "gradient_form", "grad_start_epoch", "distill", "alpha",
    "distance0", "step_factor", "seed", "epochs", "optimizer_steps", "AP", "AP50", "AP75", "AR",
    "gaussian_residual", "fitted_sigma", "peak", "localisation_error", "wall_s",
)  # fmt: skip
SHAPE_METRICS = ("gaussian_residual", "fitted_sigma", "peak", "localisation_error")

# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom.
T_QUANTILES_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


@dataclass(frozen=True)
class Run:
    model: str
    setting: Setting
    seed: int

    def folder(self, runs: Path) -> Path:
        return runs / self.model / self.setting.name.replace("+", "_") / f"seed{self.seed}"


# ------------------------------------------------------------------------------------------------
# One run (in a worker process)


def _run_overrides(run: Run, base, best_weight: float | None, runs: Path) -> dict:
    """The TrainConfig overrides of one run: its setting, resolved against the protocol."""
    overrides = {**run.setting.overrides, "model": run.model, "seed": run.seed, "progress": False,
                 "out": str(run.folder(runs)), "data_root": str(runs / "data")}
    if overrides.get("grad_weight") == BEST:
        overrides["grad_weight"] = best_weight
    if overrides.get("grad_start_epoch") == "first_drop":
        overrides["grad_start_epoch"] = base.lr_steps[0]
    if overrides.get("distill") == "replay":
        # Replayed samples take 1 / (1 - f) more batches per epoch; fewer epochs even the steps.
        kept = 1 - base.replay_fraction
        overrides["epochs"] = max(1, round(base.epochs * kept))
        overrides["lr_steps"] = [max(1, round(step * kept)) for step in base.lr_steps]
        overrides["eval_every"] = max(1, round(base.eval_every * kept))
    return overrides


def _train(run: Run, config_path: str, best_weight: float | None, runs: Path, threads: int) -> dict:
    import torch

    from trainer import Trainer, load_config

    torch.set_num_threads(threads)
    base = load_config(config_path, {})
    config = load_config(config_path, _run_overrides(run, base, best_weight, runs))
    folder = run.folder(runs)
    resume = "auto" if (folder / "last.pt").is_file() else None
    trainer = Trainer(config, resume=resume)
    metrics = trainer.fit()
    row = {
        "model": run.model, "setting": run.setting.name, "loss": config.loss,
        "grad_weight": config.grad_weight if config.loss != "mse" else 0.0, "stencil": config.stencil,
        "gradient_form": config.gradient_form, "grad_start_epoch": config.grad_start_epoch,
        "distill": config.distill if config.loss == "hg+sd" else "", "alpha": config.alpha if config.loss == "hg+sd" else 0.0,
        "distance0": config.distance0 if config.loss == "hg+sd" else "",
        "step_factor": config.step_factor if config.loss == "hg+sd" else "", "seed": run.seed,
        "epochs": config.epochs, "optimizer_steps": trainer.state.step, "wall_s": round(trainer.state.seconds, 1),
        **{key: metrics.get(key, float("nan")) for key in ("AP", "AP50", "AP75", "AR", *SHAPE_METRICS)},
    }  # fmt: skip
    (folder / "result.json").write_text(json.dumps(row, indent=1))
    for checkpoint in ("last.pt", "best.pt"):  # the study keeps results, not weights
        (folder / checkpoint).unlink(missing_ok=True)
    return row


# ------------------------------------------------------------------------------------------------
# The schedule of runs


def _run_key(row: dict) -> tuple[str, str, int]:
    return row["model"], row["setting"], int(row["seed"])


def _csv_value(text: str) -> int | float | str:
    """A runs.csv cell as result.json holds it: the writer prints ints and floats with repr."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _finished(runs: Path, results: Path) -> list[dict]:
    """Every finished run: the result.json files under runs, then the rows of results/runs.csv
    whose run folder is gone (a fresh clone of the committed study)."""
    rows = [json.loads(path.read_text()) for path in sorted(runs.glob("*/*/seed*/result.json"))]
    recorded = results / "runs.csv"
    if recorded.is_file():
        present = {_run_key(row) for row in rows}
        with open(recorded, newline="") as handle:
            for cells in csv.DictReader(handle):
                row = {column: _csv_value(text) for column, text in cells.items()}
                if _run_key(row) not in present:
                    rows.append(row)
    return rows


def _best_weight(model: str, rows: list[dict], results: Path, best_after: int) -> float | None:
    """The model's best swept weight, fixed in results/best_weights.json once chosen; None until
    every swept weight has best_after seeds."""
    path = results / "best_weights.json"
    chosen = json.loads(path.read_text()) if path.is_file() else {}
    if model in chosen:
        return chosen[model]
    means = {}
    for weight in SWEPT_WEIGHTS:
        aps = [row["AP"] for row in rows if row["model"] == model and row["setting"] == _swept(weight).name]
        if len(aps) < best_after:
            return None
        means[weight] = statistics.mean(aps)
    chosen[model] = max(means, key=means.get)
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chosen, indent=1))
    print(f"best swept grad_weight for {model}: {chosen[model]:g} (mean AP {means[chosen[model]]:.4f})",
          file=sys.stderr, flush=True)
    return chosen[model]


def _planned(models: list[str], settings: list[Setting], seeds: list[int]) -> list[Run]:
    """Runs in the order they start: model by model; the sweep before the settings that need its
    best weight; seed-major, so that partial results already pair every setting with mse."""
    planned = []
    for model in models:
        for needs_best in (False, True):
            for seed in seeds:
                planned += [Run(model, setting, seed) for setting in settings
                            if setting.runs_on(model) and setting.needs_best_weight == needs_best]
    return planned


def run_study(args, models: list[str], settings: list[Setting], seeds: list[int]) -> None:
    runs, results = Path(args.runs), Path(args.results)
    runs.mkdir(parents=True, exist_ok=True)
    finished = {_run_key(row) for row in _finished(runs, results)}
    pending = [run for run in _planned(models, settings, seeds)
               if (run.model, run.setting.name, run.seed) not in finished]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    total = len(pending)
    print(f"{total} runs to do, {args.jobs} at a time with {threads} thread(s) each; runs in {runs}",
          file=sys.stderr, flush=True)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        active: dict[concurrent.futures.Future, Run] = {}
        done = 0
        while pending or active:
            rows = _finished(runs, results)
            for run in list(pending):
                if len(active) >= args.jobs:
                    break
                weight = None
                if run.setting.needs_best_weight:
                    weight = _best_weight(run.model, rows, results, args.best_after)
                    if weight is None:
                        continue
                pending.remove(run)
                active[pool.submit(_train, run, args.config, weight, runs, threads)] = run
            if not active:
                raise SystemExit("runs left that need a best weight whose sweep is not in this invocation: "
                                 + ", ".join(f"{run.model}/{run.setting.name}/seed{run.seed}" for run in pending))
            finished, _ = concurrent.futures.wait(active, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                run = active.pop(future)
                row = future.result()
                done += 1
                print(f"[{done}/{total}] {run.model} {run.setting.name} seed {run.seed}: AP {row['AP']:.4f}, "
                      f"{row['optimizer_steps']} steps, {row['wall_s'] / 60:.1f} min", file=sys.stderr, flush=True)
            write_report(runs, results, Path(args.config))


# ------------------------------------------------------------------------------------------------
# The report


def paired_interval(differences: list[float]) -> tuple[float, float]:
    """Mean of the paired differences and the half-width of its 95% t interval (nan below 2)."""
    mean = statistics.mean(differences)
    if len(differences) < 2:
        return mean, float("nan")
    degrees = len(differences) - 1
    quantile = T_QUANTILES_95[degrees - 1] if degrees <= len(T_QUANTILES_95) else 1.96
    return mean, quantile * statistics.stdev(differences) / math.sqrt(len(differences))


def _models(rows: list[dict]) -> list[str]:
    """The models that rows hold: the study's two first, then any other in name order."""
    present = {row["model"] for row in rows}
    return [model for model in MODELS if model in present] + sorted(present - set(MODELS))


def _coloured_models(rows: list[dict]) -> list[tuple[str, str]]:
    """(colour, model) for every model that rows hold, in matplotlib's colour cycle, so that each
    model keeps its colour in every plot."""
    return [(f"C{index % 10}", model) for index, model in enumerate(_models(rows))]


def _by_setting(rows: list[dict], model: str) -> dict[str, dict[int, dict]]:
    table: dict[str, dict[int, dict]] = {}
    for row in rows:
        if row["model"] == model:
            table.setdefault(row["setting"], {})[int(row["seed"])] = row
    return {name: table[name] for name in SETTING_NAMES if name in table}


def _summary_lines(rows: list[dict], config: Path) -> list[str]:
    lines = [
        "# Evidence study: loss settings against plain MSE",
        "",
        f"Protocol: `{config.name}` (synthetic COCO-format set; every run the same data order, schedule shape and "
        "evaluation; replay runs take fewer epochs so that the optimizer steps match). Each row pairs a setting's "
        "seeds with the mse runs of the same seeds: d = AP(setting) - AP(mse), mean and 95% t interval. "
        "'yes' marks an interval that excludes 0.",
        "",
        "Heatmap shape, on the validation predictions of labelled joints: `residual` is the fraction of a plane's "
        "energy that its best-fitting isotropic Gaussian leaves unexplained, `sigma` that Gaussian's width and "
        "`peak` the plane's maximum (heatmap pixels and values; the targets have sigma "
        "equal to the protocol's), `loc err` the distance from the true keypoint in heatmap pixels.",
    ]
    for model in _models(rows):
        table = _by_setting(rows, model)
        baseline = table.get("mse", {})
        lines += ["", f"## {model}", "",
                  "| setting | seeds | steps | AP mean ± std | d vs mse (95% CI) | significant | AP75 | residual | "
                  "sigma | peak | loc err | min/run |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, by_seed in table.items():
            aps = [row["AP"] for row in by_seed.values()]
            spread = f" ± {statistics.stdev(aps):.4f}" if len(aps) > 1 else ""
            paired = [by_seed[seed]["AP"] - baseline[seed]["AP"] for seed in by_seed if seed in baseline]
            if name == "mse" or not paired:
                difference, significant = "", ""
            else:
                mean, half = paired_interval(paired)
                difference = f"{mean:+.4f} ± {half:.4f}" if not math.isnan(half) else f"{mean:+.4f}"
                significant = "" if math.isnan(half) else ("yes" if abs(mean) > half else "no")
            shape = [statistics.mean(float(row[key]) for row in by_seed.values()) for key in SHAPE_METRICS]
            steps = statistics.mean(int(row["optimizer_steps"]) for row in by_seed.values())
            minutes = statistics.mean(float(row["wall_s"]) for row in by_seed.values()) / 60
            ap75 = statistics.mean(float(row["AP75"]) for row in by_seed.values())
            lines.append(f"| {name} | {len(aps)} | {steps:.0f} | {statistics.mean(aps):.4f}{spread} | {difference} | "
                         f"{significant} | {ap75:.4f} | {shape[0]:.3f} | {shape[1]:.2f} | {shape[2]:.3f} | "
                         f"{shape[3]:.3f} | {minutes:.1f} |")
    total_hours = sum(float(row["wall_s"]) for row in rows) / 3600
    lines += ["", f"{len(rows)} runs, {total_hours:.1f} hours of run time in all (runs share the machine's cores)."]
    return lines


def write_report(runs: Path, results: Path, config: Path) -> None:
    rows = _finished(runs, results)
    if not rows:
        return
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "runs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in sorted(rows, key=lambda row: (row["model"], SETTING_NAMES.index(row["setting"]), row["seed"])):
            writer.writerow(row)
    (results / "summary.md").write_text("\n".join(_summary_lines(rows, config)) + "\n")
    _plot_weight_sweep(rows, results / "ap_vs_grad_weight.png")
    _plot_shape_metrics(rows, results / "heatmap_shape.png")
    _plot_mse_curves(runs, rows, results / "mse_curves.png")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _plot_weight_sweep(rows: list[dict], path: Path) -> None:
    """AP against grad_weight per model (mean and min-max over seeds), mse as a band."""
    figure = _figure(6.5, 4.0)
    axes = figure.add_subplot()
    drawn = False
    for colour, model in _coloured_models(rows):
        table = _by_setting(rows, model)
        mse = [row["AP"] for row in table.get("mse", {}).values()]
        if mse:
            axes.axhspan(min(mse), max(mse), color=colour, alpha=0.15)
            axes.axhline(statistics.mean(mse), color=colour, linestyle="--", label=f"{model}, mse (band: seeds)")
        points = [(weight, [row["AP"] for row in table.get(_swept(weight).name, {}).values()]) for weight in SWEPT_WEIGHTS]
        points = [(weight, aps) for weight, aps in points if aps]
        if points:
            weights = [weight for weight, _ in points]
            means = [statistics.mean(aps) for _, aps in points]
            low = [mean - min(aps) for mean, (_, aps) in zip(means, points)]
            high = [max(aps) - mean for mean, (_, aps) in zip(means, points)]
            axes.errorbar(weights, means, yerr=[low, high], marker="o", capsize=3, color=colour, label=f"{model}, hg")
        drawn = drawn or bool(mse or points)
    if not drawn:
        return
    axes.set_xscale("log")
    _save_ap_plot(figure, axes, path, "grad_weight (forward stencil)",
                  "AP against the gradient term's weight (mean, min-max over seeds)")


def _plot_shape_metrics(rows: list[dict], path: Path) -> None:
    """The heatmap-shape metrics per setting, one panel each, a bar per model."""
    figure = _figure(11, 7)
    names = [name for name in SETTING_NAMES if any(row["setting"] == name for row in rows)]
    models = _coloured_models(rows)
    tables = {model: _by_setting(rows, model) for _, model in models}
    width = 0.8 / len(models)
    for index, (key, label) in enumerate(zip(SHAPE_METRICS + ("AP",), (
            "residual vs best Gaussian", "fitted sigma (heatmap px)", "peak value", "localisation error (heatmap px)",
            "AP"))):
        axes = figure.add_subplot(2, 3, index + 1)
        for offset, (colour, model) in enumerate(models):
            table = tables[model]
            values = [statistics.mean(float(row[key]) for row in table[name].values()) if name in table else math.nan
                      for name in names]
            axes.bar([i + (offset - (len(models) - 1) / 2) * width for i in range(len(names))], values, width,
                     color=colour, label=model)
        axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        axes.set_title(label, fontsize=9)
        axes.grid(axis="y", alpha=0.3)
        if index == 0:
            axes.legend(fontsize=7)
    figure.suptitle("Validation heatmaps per setting (mean over seeds)")
    figure.tight_layout()
    figure.savefig(path)


def _plot_mse_curves(runs: Path, rows: list[dict], path: Path) -> None:
    """Validation AP against the epoch of every mse run: whether the protocol trains to a plateau.
    Drawn only while every finished mse run has its log: a run known from runs.csv alone has none,
    and the plot already drawn shows it."""
    unlogged = [row for row in rows if row["setting"] == "mse"
                and not (runs / row["model"] / "mse" / f"seed{row['seed']}" / "log.jsonl").is_file()]
    if unlogged:
        print(f"{path.name} kept: {len(unlogged)} finished mse run(s) have no log.jsonl under {runs}", file=sys.stderr)
        return
    figure = _figure(6.5, 4.0)
    axes = figure.add_subplot()
    drawn = False
    for colour, model in _coloured_models(rows):
        for index, log in enumerate(sorted((runs / model / "mse").glob("seed*/log.jsonl"))):
            records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            points = [(record["epoch"], record["AP"]) for record in records if record.get("kind") == "val" and "AP" in record]
            if points:
                axes.plot(*zip(*points), marker=".", color=colour, alpha=0.7, label=model if index == 0 else None)
                drawn = True
    if not drawn:
        return
    _save_ap_plot(figure, axes, path, "epoch", "mse runs: validation AP during training (one line per seed)")


def _save_ap_plot(figure, axes, path: Path, xlabel: str, title: str) -> None:
    axes.set_xlabel(xlabel)
    axes.set_ylabel("COCO AP (synthetic val)")
    axes.set_title(title)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


# ------------------------------------------------------------------------------------------------


def _list(text: str, allowed, kind) -> list:
    values = [kind(part) for part in text.split(",") if part]
    if allowed is not None and (unknown := [value for value in values if value not in allowed]):
        raise argparse.ArgumentTypeError(f"unknown {unknown}; expected a subset of {list(allowed)}")
    return values


def main(argv=None) -> int:
    from hgloss.pose.models import MODEL_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the protocol: YAML settings shared by every run")
    parser.add_argument("--models", default=",".join(MODELS), type=lambda text: _list(text, MODEL_NAMES, str),
                        help="comma-separated models [%(default)s]")
    parser.add_argument("--settings", default=",".join(SETTING_NAMES), type=lambda text: _list(text, SETTING_NAMES, str),
                        help="comma-separated settings [all]")
    parser.add_argument("--seeds", default="0,1,2,3,4", type=lambda text: _list(text, None, int), help="[0,1,2,3,4]")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each with cpu_count / jobs threads [2]")
    parser.add_argument("--best-after", type=int, default=3,
                        help="seeds of every swept weight needed before the best weight is chosen [3]")
    parser.add_argument("--runs", default="runs/ablation", help="run folders [runs/ablation]")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="runs.csv, summary.md and plots [%(default)s]")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.best_after < 1:
        parser.error("--jobs and --best-after must be >= 1")
    if not args.report_only:
        settings = [setting for setting in SETTINGS if setting.name in args.settings]
        run_study(args, args.models, settings, args.seeds)
    write_report(Path(args.runs), Path(args.results), Path(args.config))
    summary = Path(args.results) / "summary.md"
    if summary.is_file():
        print(summary.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
