"""Measurement helpers for the benchmarks: timing, peak memory, copy bandwidth, machine facts and
the parsing of their comma-separated flags.

Every measurement splits a repetition into an untimed `prepare(i)`, which builds what the timed
step consumes (and drops what the previous repetition left), and the timed `step(state)`. The
value `step` returns is released only after the clock stops, so freeing it is never timed.
"""

import contextlib
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

Prepare = Callable[[int], Any]
Step = Callable[[Any], Any]

_MEASURED_RANGE = "hgloss_bench::measured"

CPU_MEMORY_METHOD = (
    "torch.profiler allocator events ([memory] records of the ATen CPU allocator), "
    "peak of their running sum inside the measured call"
)
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated() minus memory_allocated() before the call"


def time_ms(prepare: Prepare, step: Step, repeats: int, device: torch.device, first: int = 0) -> list[float]:
    """Milliseconds of `step` for repetitions first .. first+repeats-1, one sample each.

    On the CPU the host clock brackets the call. On CUDA, events recorded on the stream bracket
    it after a synchronize, so only the step's own device work (and any launch gaps inside it)
    is counted.
    """
    samples = []
    for i in range(first, first + repeats):
        state = prepare(i)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            result = step(state)
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            result = step(state)
            samples.append((time.perf_counter() - begin) * 1e3)
        del result, state
    return samples


def time_in_turns(steps: dict[str, Step], prepare: Prepare, warmup: int, repeats: int,
                  device: torch.device) -> dict[str, list[float]]:
    """Milliseconds of each named step, the steps taken in turns, one call each per round, so
    that a slow spell of a shared machine falls on all of them alike; the first `warmup` rounds
    are not kept."""
    samples = {name: [] for name in steps}
    for round_index in range(warmup + repeats):
        for name, step in steps.items():
            taken = time_ms(prepare, step, 1, device, first=round_index)
            if round_index >= warmup:
                samples[name] += taken
    return samples


def summarize(samples: list[float]) -> tuple[float, float, float]:
    """(median, 20th percentile, 80th percentile) of the samples."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    # quantiles(n=10, method="inclusive") gives the 10th..90th percentiles of the samples.
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), deciles[1], deciles[7]


def peak_memory_bytes(prepare: Prepare, step: Step, device: torch.device) -> int:
    """Peak bytes allocated by one `step` above what was allocated when it started.

    Whatever `step` returns counts (it stays alive to the end of the call), and so does a
    gradient it leaves in a tensor's .grad.
    """
    if device.type == "cuda":
        return _cuda_peak_bytes(prepare, step, device)
    return _cpu_peak_bytes(prepare, step)


def _cuda_peak_bytes(prepare: Prepare, step: Step, device: torch.device) -> int:
    """The caching allocator keeps a high-water mark of allocated (not reserved) bytes."""
    state = prepare(0)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = step(state)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result, state
    return peak


def _cpu_peak_bytes(prepare: Prepare, step: Step) -> int:
    """The CPU allocator has no peak counter, so the peak is rebuilt from the profiler's events.

    With profile_memory=True every allocation and free of the ATen CPU allocator is recorded as
    a `[memory]` event whose nbytes() is signed (+ allocated, - freed). The running sum of those
    events, in time order, is the allocated total relative to the start of profiling; its maximum
    inside the measured range, minus its value when the range opens, is the step's peak.

    `prepare` runs inside the profile too: the allocator reports the free of a block only when
    it saw the block's allocation while profiling, so a graph built by `prepare` (the forward of
    a backward-only measurement) must be allocated under the profiler for its frees during the
    step to be counted.

    prof.events() cannot give the peak: it gives each op the net sum of the memory records inside
    its interval (allocations minus frees, their order lost, nested ops counted again by their
    parents), and lists as separate "[memory]" events only the records outside every op.
    """
    with _without_kineto_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        state = prepare(0)
        with record_function(_MEASURED_RANGE):
            result = step(state)
        del result, state
    events = prof.profiler.kineto_results.events()
    (measured,) = [event for event in events if event.name() == _MEASURED_RANGE]
    memory = sorted((event for event in events if event.name() == "[memory]"), key=lambda event: event.start_ns())
    allocated, baseline, peak = 0, None, 0
    for event in memory:
        if baseline is None and event.start_ns() >= measured.start_ns():
            baseline = peak = allocated
        if event.start_ns() > measured.end_ns():
            break
        allocated += event.nbytes()
        if baseline is not None:
            peak = max(peak, allocated)
    return 0 if baseline is None else peak - baseline


@contextlib.contextmanager
def _without_kineto_chatter() -> Iterator[None]:
    """Kineto writes "USDT: ... profiler_start/stop" lines to stderr on every profile, whatever
    KINETO_LOG_LEVEL says, which would break the progress lines. Captures file descriptor 2 for
    the duration and passes on every other line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if not line.startswith(("USDT:", "STAGE:")):
                    sys.stderr.write(line)


def copy_bandwidth(device: torch.device, mebibytes: int = 256, repeats: int = 10) -> float:
    """Bytes per second of a large device-to-device tensor copy, counting bytes read + written."""
    source = torch.ones(mebibytes * 2**20 // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # touches every page once, so page faults stay out of the timing
    samples = time_ms(lambda _: None, lambda _: target.copy_(source), repeats, device)
    return 2 * source.numel() * source.element_size() / (statistics.median(samples) / 1e3)


def last_level_cache_bytes(device: torch.device) -> int:
    """The largest cache of the device (the CPU's L3 or the GPU's L2); 32 MiB when unknown."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or 32 * 2**20
    sizes = []
    cache_dir = "/sys/devices/system/cpu/cpu0/cache"
    if os.path.isdir(cache_dir):
        for index in os.listdir(cache_dir):
            try:
                with open(os.path.join(cache_dir, index, "size")) as handle:
                    text = handle.read().strip()
            except OSError:
                continue
            match = re.fullmatch(r"(\d+)([KMG]?)", text)
            if match:
                sizes.append(int(match[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match[2]])
    return max(sizes, default=32 * 2**20)


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's marketing name, e.g. "AMD EPYC 7B13"."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_name(device: torch.device) -> str:
    """The GPU's name for CUDA, the CPU model otherwise."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_tag(device: torch.device) -> str:
    """A folder name for the device, e.g. "cpu-2core-amd-epyc" or "nvidia-h100-80gb-hbm3"."""
    name = device_name(device)
    if device.type == "cpu":
        name = f"cpu-{cpu_count()}core-{name}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def optional_version(module: str) -> str:
    """The version of an importable module, or "" when it is not installed."""
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken on this machine: either way, no version
        return ""


def parse_list(text: str, convert: Callable[[str], object] = str) -> list:
    """A comma-separated flag value as a list, each item converted: "32,64" -> [32, 64]."""
    return [convert(item.strip()) for item in text.split(",") if item.strip()]


def machine_record(device: torch.device, bandwidth: float) -> dict[str, str]:
    """What a result file says about where it was measured; `bandwidth` is copy_bandwidth's."""
    import hgloss

    return {
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "hgloss_version": hgloss.__version__,
        "cpu_cores": str(cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "copy_gbps": f"{bandwidth / 1e9:.1f}",
    }


def command_line(argv: list[str] | None) -> str:
    """The command that ran this benchmark, to quote in its summary: `python <script> <arguments>`."""
    arguments = argv or sys.argv[1:]
    return "python " + " ".join(shlex.quote(part) for part in [os.path.basename(sys.argv[0]), *arguments])
