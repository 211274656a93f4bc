"""Benchmark of hgloss.heatmap_gradient_loss against the loss as users write it in PyTorch.

For every configuration (device, batch, joints, heatmap size, dtype, teacher, stencil) it times
these providers of the same number:

  eager       the loss written by hand, mmpose style: soft target, gradient maps of pred and of
              the target taken separately, F.mse_loss on both, target weight per plane
  reference   hgloss with backend="reference" (plain PyTorch, written to be read)
  compile     torch.compile of a function calling hgloss with backend="reference"
  <backend>   one per fused backend of hgloss.available_backends() that runs on the device
              ("cpu" on CPU tensors; "cuda" and "triton" on CUDA tensors where built)

Before timing a configuration, every provider's loss and dL/dpred are checked against the eager
loss (1e-4 relative for the loss), so the providers compare the same computation.

Peak memory is what one call allocates above what was allocated before it, dL/dpred included:
on CUDA from the caching allocator's high-water mark, on the CPU rebuilt from the allocation and
free events of torch.profiler (see _timing.py).

It prints a markdown table (median and p20-p80 milliseconds, peak extra memory, effective
bandwidth against a copy of the same device, speed-ups vs eager and vs compile) and writes a CSV,
summary.md and, when matplotlib is installed, plots to benchmarks/results/<device-tag>/.

Examples::

    python benchmarks/bench_loss.py                      # B=64 K=17 64x48 float32, teacher on
    python benchmarks/bench_loss.py --threads 1,2        # every provider at 1 and at 2 CPU threads
    python benchmarks/bench_loss.py --batch 8,32,128 --teacher on,off --mode fwd,bwd,fwd+bwd
    python benchmarks/bench_loss.py --device cuda --dtype float32,bfloat16 --stencil forward,sobel
    python benchmarks/bench_loss.py --providers eager,cpu --repeats 100 --out /tmp/bench
    python benchmarks/bench_loss.py --full                # the large sweep, 864 configurations
    python benchmarks/bench_loss.py --full --dtype float32 --max-seconds 20   # part of it

On a 2-core CPU the default run takes about 20 s, half of it compiling on a cold Inductor
cache. --full takes hours: its float32 and bfloat16 part (576 configurations) took about 1.5
hours. --full skips eager, reference and compile where one measurement would exceed 5 s
(--max-seconds) and cuts a fused backend's runs to fit (at least 5), and the table says where. Progress goes to stderr, one line per configuration.
"""

import argparse
import csv
import itertools
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

import hgloss
from hgloss import stencils

try:
    from . import _timing as timing
except ImportError:  # run as a script: its folder, benchmarks/, is on sys.path
    import _timing as timing

ALPHA = 0.5  # teacher blend; any value in [0, 1] costs the same
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("fwd", "bwd", "fwd+bwd")
BASELINES = ("eager", "reference", "compile")

DEFAULTS = {
    "batch": "64",
    "joints": "17",
    "size": "64x48",
    "dtype": "float32",
    "teacher": "on",
    "stencil": "forward",
}
FULL_SWEEP = {
    "batch": "8,32,64,128",
    "joints": "17,16,133",
    "size": "64x48,96x72,64x64,128x128",
    "dtype": "float32,bfloat16,float16",
    "teacher": "on,off",
    "stencil": "forward,central,sobel",
}
FULL_MAX_SECONDS = 5.0

LOSS_RTOL = 1e-4
# dL/dpred is returned in pred's dtype, so 16-bit grads differ by their rounding.
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}

# Input buffer sets rotate so that small configurations are not timed out of a warm cache:
# enough sets to cover twice the last-level cache, within this much memory.
ROTATION_BYTES_CAP = 2**30
MAX_BUFFER_SETS = 32
# The eager check runs in batch chunks of at most this many pred elements, to bound its memory.
CHECK_CHUNK_ELEMENTS = 2**22
# A fused backend over the time budget still gets at least this many timed runs.
MIN_FUSED_RUNS = 5
# Timed calls at most to decide whether a measurement fits the time budget.
PROBE_ATTEMPTS = 3


# ------------------------------------------------------------------------------------------------
# Configurations and inputs


@dataclass(frozen=True)
class Config:
    """One point of the sweep."""

    device: str
    batch: int
    joints: int
    height: int
    width: int
    dtype: str
    teacher: bool
    stencil: str
    threads: int = 0  # torch's CPU threads for this measurement; 0 on CUDA

    @property
    def elements(self) -> int:
        return self.batch * self.joints * self.height * self.width

    @property
    def heatmap_bytes(self) -> int:
        """Bytes of one pred-sized tensor in the configuration's dtype."""
        return self.elements * DTYPES[self.dtype].itemsize

    @property
    def min_bytes(self) -> int:
        """Least traffic of a fused forward+backward: read P, G (and S) once, write dL/dP once."""
        return self.heatmap_bytes * (4 if self.teacher else 3)

    def label(self) -> str:
        teacher = "teacher" if self.teacher else "no-teacher"
        threads = f" {self.threads} thread{'s' if self.threads > 1 else ''}" if self.threads else ""
        return (
            f"{self.device} B={self.batch} K={self.joints} {self.height}x{self.width} "
            f"{self.dtype} {teacher} {self.stencil}{threads}"
        )


@dataclass
class Inputs:
    """One buffer set. pred requires grad; the others do not."""

    pred: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    teacher: torch.Tensor | None


def make_inputs(config: Config, count: int, seed: int = 0) -> list[Inputs]:
    """`count` independent buffer sets. Values are random but never denormal, which would slow
    the CPU down in a way real heatmaps (zeros and values near 1) do not."""
    generator = torch.Generator().manual_seed(seed)
    shape = (config.batch, config.joints, config.height, config.width)
    dtype, device = DTYPES[config.dtype], torch.device(config.device)

    def heatmap() -> torch.Tensor:
        return torch.rand(shape, generator=generator).to(device=device, dtype=dtype)

    sets = []
    for _ in range(count):
        pred = heatmap().requires_grad_()
        target = heatmap()
        # HRNet's (B, K, 1) visibility weights; 0/1 in practice, any value costs the same.
        weight = torch.rand(config.batch, config.joints, 1, generator=generator).to(device)
        sets.append(Inputs(pred, target, weight, heatmap() if config.teacher else None))
    return sets


def buffer_set_count(config: Config, minimum: int) -> int:
    """How many buffer sets to rotate: at least `minimum`, enough to span twice the last-level
    cache, no more than fit in ROTATION_BYTES_CAP (and at least one)."""
    set_bytes = config.min_bytes  # P, G, S and a gradient-sized output: the working set
    cache = timing.last_level_cache_bytes(torch.device(config.device))
    wanted = max(minimum, math.ceil(2 * cache / set_bytes))
    return max(1, min(wanted, MAX_BUFFER_SETS, ROTATION_BYTES_CAP // set_bytes))


# ------------------------------------------------------------------------------------------------
# Providers

LossFn = Callable[[Inputs], torch.Tensor]


def gradient_maps(x: torch.Tensor, stencil: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The x and y finite-difference maps of (B, K, H, W) heatmaps, valid positions only, written
    the way pose-estimation code does: differences of shifted slices (x[..., 1:] - x[..., :-1]
    for "forward"), taken from the stencil table hgloss.stencils."""
    height, width = x.shape[-2:]
    maps = []
    for axis in stencils.AXES:
        rows, cols = stencils.valid_shape(height, width, stencil, axis)
        top, _, left, _ = stencils.margins(stencil, axis)

        def shifted(row: int, col: int) -> torch.Tensor:
            return x[..., top + row : top + row + rows, left + col : left + col + cols]

        total = None
        for weight, plus_row, plus_col, minus_row, minus_col in stencils.differences(stencil, axis):
            difference = shifted(plus_row, plus_col) - shifted(minus_row, minus_col)
            difference = difference if weight == 1 else weight * difference
            total = difference if total is None else total + difference
        scale = stencils.scale(stencil)
        maps.append(total if scale == 1 else scale * total)
    return maps[0], maps[1]


def eager_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    teacher: torch.Tensor | None,
    alpha: float,
    stencil: str,
) -> torch.Tensor:
    """The heatmap-gradient loss as a PyTorch user writes it, without hgloss.

    Inputs are upcast to float32 first (autocast runs mse_loss in float32 too), so that the
    result agrees with hgloss, which accumulates in float32.
    """
    pred, target = pred.float(), target.float()
    if teacher is not None:
        target = (1 - alpha) * target + alpha * teacher.float()
    batch, joints = pred.shape[:2]
    plane_weight = weight.reshape(batch, joints, 1, 1)
    value_term = (F.mse_loss(pred, target, reduction="none") * plane_weight).mean()

    pred_x, pred_y = gradient_maps(pred, stencil)
    target_x, target_y = gradient_maps(target, stencil)
    squared = (F.mse_loss(pred_x, target_x, reduction="none") * plane_weight).sum() + (
        F.mse_loss(pred_y, target_y, reduction="none") * plane_weight
    ).sum()
    # hgloss normalises the x and y maps together by their combined number of positions.
    positions = pred_x[0, 0].numel() + pred_y[0, 0].numel()
    gradient_term = squared / (batch * joints * positions)
    return value_term + gradient_term


def _reference_loss(pred, target, weight, teacher, stencil: str) -> torch.Tensor:
    return hgloss.heatmap_gradient_loss(
        pred, target, weight, teacher=teacher, alpha=ALPHA, stencil=stencil, backend="reference"
    )


def make_loss(provider: str, config: Config) -> LossFn:
    """The provider's loss for one configuration. For compile, a fresh compiled function with
    static shapes, as a training loop with a fixed batch shape gets it."""
    stencil = config.stencil
    if provider == "eager":
        return lambda x: eager_loss(x.pred, x.target, x.weight, x.teacher, ALPHA, stencil)
    if provider == "reference":
        return lambda x: _reference_loss(x.pred, x.target, x.weight, x.teacher, stencil)
    if provider == "compile":
        # One cache entry per configuration: no recompile limit, no guard search over old shapes.
        torch._dynamo.reset()
        compiled = torch.compile(_reference_loss, dynamic=False)
        return lambda x: compiled(x.pred, x.target, x.weight, x.teacher, stencil)
    return lambda x: hgloss.heatmap_gradient_loss(
        x.pred, x.target, x.weight, teacher=x.teacher, alpha=ALPHA, stencil=stencil, backend=provider
    )


def fused_backends(device: torch.device) -> list[str]:
    """The fused hgloss backends that accept tensors on `device`, found by trying each."""
    probe = torch.zeros(1, 1, 3, 3, device=device)
    usable = []
    for name in hgloss.available_backends():
        if name == "reference":
            continue
        try:
            hgloss.heatmap_gradient_loss(probe, probe, backend=name)
        except RuntimeError:  # the backend exists but not for this device type
            continue
        usable.append(name)
    return usable


# ------------------------------------------------------------------------------------------------
# Modes: what one timed repetition does


def mode_steps(mode: str, loss_fn: LossFn, sets: list[Inputs]) -> tuple[timing.Prepare, timing.Step]:
    """(prepare, step) for a mode. prepare(i) picks buffer set i (rotating), clears pred.grad
    and, for "bwd", builds the graph; step is what the clock sees."""

    def fresh(i: int) -> Inputs:
        inputs = sets[i % len(sets)]
        inputs.pred.grad = None
        return inputs

    if mode == "fwd":
        return fresh, loss_fn
    if mode == "bwd":
        return (lambda i: loss_fn(fresh(i))), (lambda loss: loss.backward())
    if mode == "fwd+bwd":
        return fresh, (lambda inputs: loss_fn(inputs).backward())
    raise ValueError(f"unknown mode {mode!r}")


# ------------------------------------------------------------------------------------------------
# Checking that every provider computes the same thing


def eager_oracle(config: Config, inputs: Inputs) -> tuple[float, torch.Tensor]:
    """The eager loss and dL/dpred for one buffer set, computed in batch chunks so that its
    intermediates stay bounded; the loss is a mean over planes, so chunks add up exactly."""
    batch = config.batch
    chunk = max(1, CHECK_CHUNK_ELEMENTS // (config.elements // batch))
    pred = inputs.pred.detach()
    grad = torch.empty_like(pred)
    total = 0.0
    for start in range(0, batch, chunk):
        part = slice(start, min(start + chunk, batch))
        piece = pred[part].clone().requires_grad_()
        teacher = None if inputs.teacher is None else inputs.teacher[part]
        share = (part.stop - part.start) / batch
        loss = eager_loss(piece, inputs.target[part], inputs.weight[part], teacher, ALPHA, config.stencil) * share
        loss.backward()
        grad[part] = piece.grad
        total += loss.item()
    return total, grad


def check_provider(
    name: str, loss_fn: LossFn, config: Config, inputs: Inputs, oracle: tuple[float, torch.Tensor]
) -> None:
    """Runs one forward+backward; raises AssertionError unless its loss and dL/dpred match the
    eager oracle."""
    inputs.pred.grad = None
    loss = loss_fn(inputs)
    loss.backward()
    expected_loss, expected_grad = oracle
    loss_error = abs(loss.item() - expected_loss) / max(abs(expected_loss), 1e-30)
    grad_error = (inputs.pred.grad.float() - expected_grad.float()).abs().max().item() / max(
        expected_grad.float().abs().max().item(), 1e-30
    )
    inputs.pred.grad = None
    grad_tolerance = GRAD_RTOL[DTYPES[config.dtype]]
    if loss_error > LOSS_RTOL or grad_error > grad_tolerance:
        raise AssertionError(
            f"{name} disagrees with the eager loss on {config.label()}: loss {loss.item():.8g} vs "
            f"{expected_loss:.8g} (relative error {loss_error:.2e}, limit {LOSS_RTOL:.0e}); "
            f"dL/dpred relative max error {grad_error:.2e} (limit {grad_tolerance:.0e})"
        )


# ------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Measurement:
    """One CSV row: a provider in a mode on a configuration."""

    config: Config
    provider: str
    mode: str
    status: str = "ok"  # "ok", or why there is no number
    runs: int = 0
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    compile_s: float | None = None
    peak_bytes: int | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_compile: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Budget:
    """The per-measurement time limit and the per-element speed seen so far, to predict."""

    max_seconds: float | None
    fastest_ns_per_element: dict[tuple[str, str], float] = field(default_factory=dict)

    def predict_ms(self, provider: str, config: Config) -> float | None:
        """An optimistic guess of one forward+backward, from the fastest rate seen so far."""
        rate = self.fastest_ns_per_element.get((config.device, provider))
        return None if rate is None else rate * config.elements / 1e6

    def record(self, provider: str, config: Config, call_ms: float) -> None:
        key = (config.device, provider)
        rate = call_ms * 1e6 / config.elements
        self.fastest_ns_per_element[key] = min(rate, self.fastest_ns_per_element.get(key, math.inf))

    def fits(self, call_ms: float, calls: int) -> bool:
        return self.max_seconds is None or call_ms * calls / 1e3 <= self.max_seconds

    def runs_within(self, call_ms: float, warmup: int, repeats: int) -> int:
        """Runs of a fused backend: all `repeats` if they fit, else as many as fit, at least a few."""
        if self.fits(call_ms, warmup + repeats):
            return repeats
        fitting = int(self.max_seconds * 1e3 / max(call_ms, 1e-9)) - warmup
        return max(MIN_FUSED_RUNS, min(repeats, fitting))


def measure_provider(
    provider: str,
    config: Config,
    sets: list[Inputs],
    oracle: tuple[float, torch.Tensor],
    modes: Sequence[str],
    args: argparse.Namespace,
    budget: Budget,
) -> list[Measurement]:
    """Checks, warms up, times and memory-profiles one provider on one configuration."""
    rows = [Measurement(config, provider, mode) for mode in modes]
    device = torch.device(config.device)
    is_baseline = provider in BASELINES
    calls = args.warmup + args.repeats

    def skip(reason: str) -> list[Measurement]:
        for row in rows:
            row.status = reason
        return rows

    predicted = budget.predict_ms(provider, config)
    if is_baseline and predicted is not None and not budget.fits(predicted, calls):
        return skip(f"skipped: about {predicted * calls / 1e3:.3g} s > {budget.max_seconds:g} s budget")

    loss_fn = make_loss(provider, config)
    started = time.perf_counter()
    try:
        check_provider(provider, loss_fn, config, sets[0], oracle)  # compiles, for compile
    except Exception as error:  # torch.compile can fail on a machine (no C++ compiler, ...)
        if provider != "compile" or isinstance(error, AssertionError):
            raise
        first_line = (str(error).strip().splitlines() or [""])[0][:160]
        return skip(f"failed: {type(error).__name__}: {first_line}")
    compile_s = time.perf_counter() - started if provider == "compile" else None

    # Timed forward+backward calls, the per-call cost the budget decision rests on. A call that
    # does not fit is retried (twice at most): on a busy machine one call can be far off.
    prepare, step = mode_steps("fwd+bwd", loss_fn, sets)
    probe_ms = math.inf
    for attempt in range(1, PROBE_ATTEMPTS + 1):
        probe_ms = min(probe_ms, *timing.time_ms(prepare, step, 1, device, first=attempt))
        if budget.fits(probe_ms, calls):
            break
    budget.record(provider, config, probe_ms)
    if is_baseline and not budget.fits(probe_ms, calls):
        return skip(f"skipped: about {probe_ms * calls / 1e3:.3g} s > {budget.max_seconds:g} s budget")
    runs = budget.runs_within(probe_ms, args.warmup, args.repeats)

    for row in rows:
        prepare, step = mode_steps(row.mode, loss_fn, sets)
        timing.time_ms(prepare, step, args.warmup, device)
        samples = timing.time_ms(prepare, step, runs, device, first=args.warmup)
        row.median_ms, row.p20_ms, row.p80_ms = timing.summarize(samples)
        row.runs = runs
        row.compile_s = compile_s
        # Gradients left by the timed runs were allocated before the profiler started; dropping
        # them first keeps their frees out of its view.
        for inputs in sets:
            inputs.pred.grad = None
        row.peak_bytes = timing.peak_memory_bytes(prepare, step, device)
        sets[0].pred.grad = None
        if row.mode == "fwd+bwd":
            budget.record(provider, config, row.median_ms)
    return rows


def add_speedups(rows: list[Measurement]) -> None:
    """Speed-ups vs eager and vs compile, from medians of the same configuration and mode."""
    medians = {(row.config, row.mode, row.provider): row.median_ms for row in rows if row.ok}
    for row in rows:
        if not row.ok:
            continue
        eager = medians.get((row.config, row.mode, "eager"))
        compiled = medians.get((row.config, row.mode, "compile"))
        row.speedup_vs_eager = None if eager is None else eager / row.median_ms
        row.speedup_vs_compile = None if compiled is None else compiled / row.median_ms


# ------------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    size = int(height), int(width)
    if min(size) < 3:
        raise argparse.ArgumentTypeError(f"size {text!r}: heatmaps must be at least 3x3")
    return size


def parse_switch(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark hgloss.heatmap_gradient_loss against eager PyTorch and torch.compile.",
        epilog="Lists are comma-separated; every combination is measured.",
    )
    sweep = parser.add_argument_group("sweep (explicit values win over --full)")
    sweep.add_argument("--batch", help=f"batch sizes [{DEFAULTS['batch']}]")
    sweep.add_argument("--joints", help=f"joint counts K [{DEFAULTS['joints']}]")
    sweep.add_argument("--size", help=f"heatmap sizes HxW [{DEFAULTS['size']}]")
    sweep.add_argument("--dtype", help=f"{', '.join(DTYPES)} [{DEFAULTS['dtype']}]")
    sweep.add_argument("--teacher", help=f"on, off [{DEFAULTS['teacher']}]")
    sweep.add_argument("--stencil", help=f"forward, central, sobel [{DEFAULTS['stencil']}]")
    sweep.add_argument(
        "--full",
        action="store_true",
        help="the large sweep: "
        + "; ".join(f"{name} {value}" for name, value in FULL_SWEEP.items())
        + f"; with a {FULL_MAX_SECONDS:g} s budget per measurement unless --max-seconds is given",
    )
    parser.add_argument("--device", help="cpu, cuda (default: cuda when available, else cpu)")
    parser.add_argument(
        "--threads", help=f"CPU thread counts to time every provider at, e.g. 1,2 [{torch.get_num_threads()}, torch's]"
    )
    parser.add_argument("--mode", default="fwd+bwd", help="fwd, bwd, fwd+bwd [fwd+bwd]")
    parser.add_argument("--providers", help="default: eager, reference, compile and every fused backend")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per measurement [30]")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before them [5]")
    parser.add_argument("--buffer-sets", type=int, default=3, help="least number of input sets to rotate [3]")
    parser.add_argument(
        "--max-seconds",
        type=float,
        help="skip eager/reference/compile where one measurement "
        "would take longer, and cut a fused backend's runs (at least 5) to fit",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device-tag>)")
    return parser


def sweep_values(args: argparse.Namespace) -> dict[str, list]:
    """The value lists of the sweep: explicit arguments, else --full's, else the defaults."""
    base = FULL_SWEEP if args.full else DEFAULTS
    text = {name: getattr(args, name) or base[name] for name in DEFAULTS}
    try:
        values = {
            "batch": timing.parse_list(text["batch"], int),
            "joints": timing.parse_list(text["joints"], int),
            "size": timing.parse_list(text["size"], parse_size),
            "dtype": timing.parse_list(text["dtype"]),
            "teacher": timing.parse_list(text["teacher"], parse_switch),
            "stencil": timing.parse_list(text["stencil"]),
        }
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise SystemExit(f"bench_loss.py: error: {error}") from None
    if min(values["batch"] + values["joints"]) < 1:
        raise SystemExit("bench_loss.py: error: batch sizes and joint counts must be at least 1")
    for dtype in values["dtype"]:
        if dtype not in DTYPES:
            raise SystemExit(f"bench_loss.py: error: unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
    for stencil in values["stencil"]:
        if stencil not in stencils.STENCILS:
            raise SystemExit(f"bench_loss.py: error: unknown stencil {stencil!r}")
    return values


def resolve_devices(args: argparse.Namespace) -> list[str]:
    devices = timing.parse_list(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for device in devices:
        if device not in ("cpu", "cuda"):
            raise SystemExit(f"bench_loss.py: error: unknown device {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("bench_loss.py: error: --device cuda but torch sees no CUDA device")
    return devices


def resolve_providers(args: argparse.Namespace, device: str) -> list[str]:
    """The providers to run on a device, in table order: baselines first, then fused backends."""
    available = list(BASELINES) + fused_backends(torch.device(device))
    if args.providers is None:
        return available
    wanted = timing.parse_list(args.providers)
    unknown = [name for name in wanted if name not in list(BASELINES) + list(hgloss.functional.BACKENDS)]
    if unknown:
        raise SystemExit(f"bench_loss.py: error: unknown providers {unknown}")
    missing = [name for name in wanted if name not in available]
    if missing:
        print(f"note: {', '.join(missing)} not available on {device}; skipped", file=sys.stderr)
    return [name for name in available if name in wanted]


# ------------------------------------------------------------------------------------------------
# Output


def machine_info(devices: list[str], copy_bandwidths: dict[str, float]) -> dict[str, str]:
    """Facts about the machine and software, one CSV column each."""
    info = {
        "device_name": " + ".join(timing.device_name(torch.device(device)) for device in devices),
        "torch_version": torch.__version__,
        "triton_version": timing.optional_version("triton"),
        "hgloss_version": hgloss.__version__,
        "hgloss_backends": " ".join(hgloss.available_backends()),
        "cpu_model": timing.cpu_model(),
        "cpu_cores": str(timing.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "python_version": sys.version.split()[0],
    }
    for device, bandwidth in copy_bandwidths.items():
        info[f"copy_gbps_{device}"] = f"{bandwidth / 1e9:.1f}"
    return info


def derived(row: Measurement, copy_bandwidth: float) -> dict[str, float | None]:
    """Bandwidth figures of a row. Only forward+backward has a well-defined least traffic: the
    fused backends move work between their forward and backward."""
    config = row.config
    result = {
        "peak_mib": None if row.peak_bytes is None else row.peak_bytes / 2**20,
        "peak_per_heatmap": None if row.peak_bytes is None else row.peak_bytes / config.heatmap_bytes,
        "bytes": None,
        "gbps": None,
        "pct_copy_bw": None,
        "floor_ms": None,
    }
    if row.mode == "fwd+bwd":
        result["bytes"] = config.min_bytes
        result["floor_ms"] = config.min_bytes / copy_bandwidth * 1e3
        if row.ok:
            result["gbps"] = config.min_bytes / (row.median_ms / 1e3) / 1e9
            result["pct_copy_bw"] = 100 * result["gbps"] * 1e9 / copy_bandwidth
    return result


CONFIG_COLUMNS = ("device", "threads", "batch", "joints", "size", "dtype", "teacher", "stencil", "mode")


def config_values(row: Measurement) -> dict[str, str]:
    config = row.config
    return {
        "device": config.device,
        "threads": str(config.threads) if config.threads else "-",
        "batch": str(config.batch),
        "joints": str(config.joints),
        "size": f"{config.height}x{config.width}",
        "dtype": config.dtype,
        "teacher": "on" if config.teacher else "off",
        "stencil": config.stencil,
        "mode": row.mode,
    }


def write_csv(path: Path, rows: list[Measurement], info: dict[str, str], bandwidths: dict[str, float]) -> None:
    """One row per measurement: configuration, results, derived figures and machine facts."""
    fieldnames = [
        *asdict(rows[0].config),
        "provider",
        "mode",
        "status",
        "runs",
        "median_ms",
        "p20_ms",
        "p80_ms",
        "compile_s",
        "peak_mib",
        "peak_per_heatmap",
        "bytes",
        "gbps",
        "pct_copy_bw",
        "floor_ms",
        "speedup_vs_eager",
        "speedup_vs_compile",
        "memory_method",
        *info,
    ]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        for row in rows:
            record = asdict(row.config)
            record.update(
                teacher="on" if row.config.teacher else "off",
                provider=row.provider,
                mode=row.mode,
                status=row.status,
                runs=row.runs,
                median_ms=row.median_ms,
                p20_ms=row.p20_ms,
                p80_ms=row.p80_ms,
                compile_s=row.compile_s,
                speedup_vs_eager=row.speedup_vs_eager,
                speedup_vs_compile=row.speedup_vs_compile,
                memory_method=memory_method(row.config.device),
                **derived(row, bandwidths[row.config.device]),
                **info,
            )
            writer.writerow({key: _csv_value(value) for key, value in record.items()})


def _csv_value(value: object) -> object:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def memory_method(device: str) -> str:
    return timing.CUDA_MEMORY_METHOD if device == "cuda" else timing.CPU_MEMORY_METHOD


def _number(value: float | None) -> str:
    """Three significant digits, without exponents: 0.0123, 1.23, 123, 12345."""
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{max(2 - math.floor(math.log10(abs(value))), 0)}f}"


def _suffixed(value: float | None, suffix: str, decimals: int = 2) -> str:
    return "-" if value is None else f"{value:.{decimals}f}{suffix}"


def markdown_table(rows: list[Measurement], bandwidths: dict[str, float]) -> tuple[str, str]:
    """(the fields every row shares, the table of the rest). Columns whose value never changes
    are hoisted into the first line to keep the table narrow."""
    values = [config_values(row) for row in rows]
    varying = [name for name in CONFIG_COLUMNS if len({value[name] for value in values}) > 1]
    shared = ", ".join(f"{name} {values[0][name]}" for name in CONFIG_COLUMNS if name not in varying)
    show_runs = len({row.runs for row in rows if row.ok}) > 1
    show_compile = any(row.compile_s is not None for row in rows)
    header = [
        *varying,
        "provider",
        "median ms",
        "p20-p80 ms",
        *(["runs"] if show_runs else []),
        "peak MiB",
        "extra / heatmap",
        "GB/s",
        "% copy BW",
        "floor ms",
        "vs eager",
        "vs compile",
        *(["compile s"] if show_compile else []),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, value in zip(rows, values, strict=True):
        extra = derived(row, bandwidths[row.config.device])
        cells = [value[name] for name in varying] + [row.provider]
        if row.ok:
            cells += [
                _number(row.median_ms),
                f"{_number(row.p20_ms)}-{_number(row.p80_ms)}",
                *([str(row.runs)] if show_runs else []),
                _suffixed(extra["peak_mib"], ""),
                _suffixed(extra["peak_per_heatmap"], "x"),
                _number(extra["gbps"]),
                _suffixed(extra["pct_copy_bw"], "%", 1),
                _number(extra["floor_ms"]),
                _suffixed(row.speedup_vs_eager, "x"),
                _suffixed(row.speedup_vs_compile, "x"),
                *([_suffixed(row.compile_s, "", 1)] if show_compile else []),
            ]
        else:
            cells += [row.status] + [""] * (len(header) - len(cells) - 1)
        lines.append("| " + " | ".join(cells) + " |")
    return shared, "\n".join(lines)


def write_summary(
    path: Path,
    command: str,
    info: dict[str, str],
    bandwidths: dict[str, float],
    shared: str,
    table: str,
    notes: list[str],
) -> None:
    """summary.md: how the numbers were made, on what, and the table."""
    machine = "\n".join(f"- {name}: {value or '-'}" for name, value in info.items() if not name.startswith("copy_"))
    copy = "\n".join(
        f"- {device}: {bandwidth / 1e9:.1f} GB/s (256 MiB tensor copy, bytes read + written, median of 10)"
        for device, bandwidth in bandwidths.items()
    )
    method = "\n".join(f"  - {device}: {memory_method(device)}" for device in bandwidths)
    text = f"""# hgloss loss benchmark

Run {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")} with:

    {command}

## Machine

{machine}

## Copy bandwidth

{copy}

## Method

- Providers: `eager` is the loss written by hand in PyTorch (inputs upcast to float32, soft
  target, gradient maps of pred and target by slicing, or F.conv2d for sobel, F.mse_loss with
  the weight per plane); `reference` is hgloss's plain-PyTorch backend; `compile` is
  torch.compile (static shapes) of a call to it; the others are hgloss's fused backends.
- Time: median and p20-p80 of the timed runs, in ms. pred requires grad; target, teacher and
  weight do not. `bwd` times `loss.backward()` only (the graph is built before the clock starts);
  `fwd+bwd` times both; pred.grad is reset between runs. Input buffer sets rotate so that small
  configurations are not timed out of a warm cache.
- Peak memory: bytes allocated during one call above what was allocated before it, dL/dpred
  included; "extra / heatmap" divides it by one pred tensor. Measured with:
{method}
- Bandwidth (fwd+bwd rows): least bytes of a fused call (read pred, target and teacher once,
  write dL/dpred once, in their dtypes) / median time; "floor ms" is those bytes at the copy
  bandwidth.
- vs eager / vs compile: that provider's median / this row's median, same configuration and mode.
- compile s: the first call of the compiled loss, compilation included (excluded from the
  timings). Inductor's on-disk cache makes it shorter when the same shapes ran before.
- Every provider's loss matched the eager loss to {LOSS_RTOL:g} relative (dL/dpred too) before timing.

## Results ({shared})

{table}
"""
    if notes:
        text += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    path.write_text(text)


def write_plots(out: Path, rows: list[Measurement]) -> list[Path]:
    """Time and peak memory vs batch size, one figure per group with several batch sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    groups: dict[tuple, list[Measurement]] = {}
    for row in rows:
        if row.ok:
            config = row.config
            key = (
                config.device,
                config.joints,
                config.height,
                config.width,
                config.dtype,
                config.teacher,
                config.stencil,
                row.mode,
                config.threads,
            )
            groups.setdefault(key, []).append(row)
    written = []
    for key, group in groups.items():
        if len({row.config.batch for row in group}) < 2:
            continue
        device, joints, height, width, dtype, teacher, stencil, mode, threads = key
        figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
        for provider in dict.fromkeys(row.provider for row in group):
            points = sorted(
                (row.config.batch, row.median_ms, row.peak_bytes / 2**20) for row in group if row.provider == provider
            )
            provider_batches, times, memory = zip(*points, strict=True)
            time_axes.plot(provider_batches, times, marker="o", label=provider)
            memory_axes.plot(provider_batches, memory, marker="o", label=provider)
        batches = sorted({row.config.batch for row in group})
        for axes, label in ((time_axes, f"{mode} median time (ms)"), (memory_axes, "peak extra memory (MiB)")):
            axes.set_xscale("log", base=2)
            axes.set_yscale("log")
            axes.set_xticks(batches, [str(batch) for batch in batches])
            axes.xaxis.set_minor_locator(ticker.NullLocator())
            # Plain numbers at 1, 2 and 5 times powers of ten, on short and long ranges alike.
            for axis_formatter in (axes.yaxis.set_major_formatter, axes.yaxis.set_minor_formatter):
                axis_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "125" else ""))
            axes.set_xlabel("batch size")
            axes.set_ylabel(label)
            axes.grid(True, which="both", alpha=0.3)
            axes.legend()
        teacher_text = "teacher" if teacher else "no teacher"
        threads_text = f", {threads} thread{'s' if threads > 1 else ''}" if threads else ""
        figure.suptitle(
            f"{device}: K={joints}, {height}x{width}, {dtype}, {teacher_text}, {stencil} stencil, {mode}{threads_text}"
        )
        figure.tight_layout()
        # The thread count enters the name only when the run compared several.
        threads_part = f"_{threads}threads" if len({row.config.threads for row in rows}) > 1 else ""
        name = (
            f"{device}_k{joints}_{height}x{width}_{dtype}_teacher-{'on' if teacher else 'off'}_{stencil}_{mode}"
            f"{threads_part}.png"
        )
        path = out / name.replace("+", "-")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------
# Main


def progress(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    default_threads = torch.get_num_threads()
    for name in ("repeats", "warmup", "buffer_sets"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            raise SystemExit(f"bench_loss.py: error: --{name.replace('_', '-')} is too small")
    modes = timing.parse_list(args.mode)
    if unknown := [mode for mode in modes if mode not in MODES]:
        raise SystemExit(f"bench_loss.py: error: unknown modes {unknown}; expected {list(MODES)}")
    sweep = sweep_values(args)
    devices = resolve_devices(args)
    providers = {device: resolve_providers(args, device) for device in devices}
    budget = Budget(args.max_seconds if args.max_seconds is not None else (FULL_MAX_SECONDS if args.full else None))
    try:
        thread_counts = timing.parse_list(args.threads, int) if args.threads else [torch.get_num_threads()]
    except ValueError as error:
        raise SystemExit(f"bench_loss.py: error: --threads: {error}") from None
    if min(thread_counts) < 1:
        raise SystemExit("bench_loss.py: error: thread counts must be at least 1")
    configs = [
        Config(device, batch, joints, height, width, dtype, teacher, stencil, threads if device == "cpu" else 0)
        for device, dtype, teacher, stencil, joints, (height, width), batch, threads in itertools.product(
            devices, sweep["dtype"], sweep["teacher"], sweep["stencil"], sweep["joints"], sweep["size"], sweep["batch"],
            thread_counts,
        )
    ]
    configs = list(dict.fromkeys(configs))  # CUDA configurations do not repeat per thread count

    bandwidths = {device: timing.copy_bandwidth(torch.device(device)) for device in devices}
    for device, bandwidth in bandwidths.items():
        progress(f"{device} copy bandwidth: {bandwidth / 1e9:.1f} GB/s; providers: {', '.join(providers[device])}")

    rows: list[Measurement] = []
    notes: list[str] = []
    interrupted = False
    try:
        for index, config in enumerate(configs, 1):
            progress(f"[{index}/{len(configs)}] {config.label()}:", end="")
            if config.threads:
                torch.set_num_threads(config.threads)
            started = time.perf_counter()
            sets = make_inputs(config, buffer_set_count(config, args.buffer_sets), seed=index)
            oracle = eager_oracle(config, sets[0])
            config_rows = []
            for provider in providers[config.device]:
                measured = measure_provider(provider, config, sets, oracle, modes, args, budget)
                config_rows += measured
                shown = measured[-1]
                outcome = f"{shown.median_ms:.3g} ms" if shown.ok else shown.status.split(":")[0]
                progress(f" {provider} {outcome}", end="")
            # The table lists a configuration mode by mode, each with every provider.
            rows += sorted(config_rows, key=lambda row: modes.index(row.mode))
            del sets, oracle
            progress(f" ({modes[-1]} medians, {time.perf_counter() - started:.1f} s)")
    except KeyboardInterrupt:
        interrupted = True
        progress("\ninterrupted: writing the measurements made so far")
        notes.append("The run was interrupted; configurations after the last row were not measured.")
    torch.set_num_threads(default_threads)
    if not rows:
        return 130 if interrupted else 1

    add_speedups(rows)
    skipped = [row for row in rows if row.status.startswith("skipped")]
    if skipped:
        notes.append(
            f"{len(skipped)} measurements of eager/reference/compile were skipped because one would take "
            f"longer than the {budget.max_seconds:g} s budget (--max-seconds)."
        )
    failed = [row for row in rows if row.status.startswith("failed")]
    if failed:
        notes.append(f"{len(failed)} torch.compile measurements failed; the status column says why.")
    if any(mode != "fwd+bwd" for mode in modes):
        notes.append(
            "With pred requiring grad, the fused backends compute dL/dpred during the forward and "
            "the backward only hands it over: compare providers on fwd+bwd."
        )
    cut = [row for row in rows if row.ok and row.runs < args.repeats]
    if cut:
        notes.append(f"{len(cut)} fused-backend measurements ran fewer than {args.repeats} times to fit the budget.")

    out = args.out or Path(__file__).resolve().parent / "results" / "+".join(
        timing.device_tag(torch.device(device)) for device in devices
    )
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info(devices, bandwidths)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    shared, table = markdown_table(rows, bandwidths)
    try:
        plots = write_plots(out, rows)
    except ImportError:
        plots = []
        notes.append("matplotlib is not installed: no plots (pip install matplotlib).")
    else:
        if not plots:
            notes.append("No plots: they need at least two batch sizes of one configuration.")
    write_csv(out / "bench_loss.csv", rows, info, bandwidths)
    write_summary(out / "summary.md", command, info, bandwidths, shared, table, notes)

    for device, bandwidth in bandwidths.items():
        print(f"{timing.device_name(torch.device(device))} ({device}): copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"\n{shared}\n\n{table}\n")
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {out / 'bench_loss.csv'}, {out / 'summary.md'}" + (f" and {len(plots)} plots" if plots else ""))
    return 130 if interrupted else 0  # 130: the shell's code for a run stopped by Ctrl-C


if __name__ == "__main__":
    sys.exit(main())
