"""Compile the Triton kernels for sm_80 and sm_90 without a GPU, and report registers and spills.

The interpreter that runs the kernels in CI accepts code the GPU compiler may reject, and says
nothing about register pressure. This script compiles each kernel variant to a cubin with
triton.compile (the nvidia backend and its ptxas come with triton), then runs ptxas -v on the PTX
for the register and spill counts. It exits non-zero if a variant fails to compile, or if one
that accumulates in float32 spills registers.

    TRITON_INTERPRET=0 python tests/triton_gpu_compile.py
"""

import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hgloss.backends import triton as triton_backend  # noqa: E402
from hgloss.contract import REDUCTIONS  # noqa: E402
from hgloss.stencils import STENCILS  # noqa: E402

TYPE_NAMES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}


def signature(kernel, pointers: dict[str, str | None], constexprs: dict) -> dict[str, str]:
    """Triton types of a kernel's arguments: the given pointer types (None: absent, passed as a
    constexpr None), 32-bit ints for sizes and strides, 64-bit ints for the float weights' bits."""
    types = {}
    for name in kernel.arg_names:
        if name in constexprs or pointers.get(name, "") is None:
            types[name] = "constexpr"
        elif name in pointers:
            types[name] = TYPE_NAMES[pointers[name]]
        elif name.endswith("_bits"):
            types[name] = "i64"
        else:
            types[name] = "i32"
    return types


def variants():
    """(description, kernel, pointer dtypes, constexprs, warps, must not spill)."""
    for stencil in STENCILS:
        tile, warps = triton_backend.TILE_CONFIG[stencil]
        # pixel: the pixel weight's dtype, or None without one.
        for pred, grad, contiguous, wide, with_inputs, separable, pixel in (
            ("fp32", "fp32", True, False, True, False, None),
            ("fp32", "fp32", False, False, True, False, None),
            ("fp32", "fp32", False, True, True, False, None),
            ("fp32", "fp32", True, False, False, False, None),
            ("bf16", "bf16", True, False, True, False, None),
            ("fp16", "fp32", True, False, True, False, None),
            ("fp64", "fp64", True, False, True, False, None),
            ("fp32", "fp32", True, False, True, True, None),
            ("fp32", "fp32", True, False, False, True, None),
            ("bf16", "bf16", True, False, True, True, None),
            ("fp32", "fp32", True, False, True, False, "fp32"),
            ("fp32", "fp32", True, False, False, False, "fp16"),
            ("bf16", "bf16", False, False, True, False, "fp32"),
            ("fp32", "fp32", True, False, True, True, "fp32"),
        ):
            accumulation = "fp64" if pred == "fp64" else "fp32"
            # A separable target: no target tensor, float64 row and column factors.
            target = {"target_ptr": None, "target_rows_ptr": "fp64", "target_cols_ptr": "fp64"} if separable else {
                "target_ptr": pred, "target_rows_ptr": None, "target_cols_ptr": None}
            pointers = {
                "pred_ptr": pred, **target, "teacher_ptr": pred if with_inputs else None,
                "blend_ptr": accumulation if with_inputs else None, "weight_ptr": pred if with_inputs else None,
                "pixel_ptr": pixel, "partials_ptr": accumulation, "grad_ptr": grad,
            }
            constexprs = dict(
                **triton_backend.stencil_constants(stencil),
                HAS_TEACHER=with_inputs, HAS_WEIGHT=with_inputs, COMPUTE_GRAD=True, MEAN=True,
                DENSE=contiguous, WIDE=wide, PLANES=1, TILE=tile,
            )
            layout = ("contiguous" if contiguous else "strided") + (" int64" if wide else "")
            extras = ("teacher+weight" if with_inputs else "plain") + (" separable" if separable else "")
            extras += f" pixel {pixel}" if pixel else ""
            description = f"tile {stencil} {pred} {layout} {extras}"
            yield description, triton_backend._plane_tile_kernel, pointers, constexprs, warps, accumulation == "fp32"
    for accumulation in ("fp32", "fp64"):
        pointers = {"partials_ptr": accumulation, "weight_ptr": "fp32", "terms_ptr": accumulation, "loss_ptr": accumulation}
        for reduction in REDUCTIONS:
            constexprs = dict(
                REDUCE=reduction != "none", MEAN=reduction == "mean", HAS_WEIGHT=True,
                PLANE_BLOCK=triton_backend.PLANE_BLOCK,
            )
            yield f"finish {reduction} {accumulation}", triton_backend._finish_planes_kernel, pointers, constexprs, 4, True
        for grad in ("bf16", accumulation):
            for per_plane in (False, True):
                pointers = {"grad_ptr": grad, "scale_ptr": accumulation}
                constexprs = dict(PER_PLANE=per_plane, TILE=triton_backend.SCALE_TILE)
                scale = "per plane" if per_plane else "by one"
                yield f"scale {grad} {scale} {accumulation}", triton_backend._scale_planes_kernel, pointers, constexprs, 4, True


def ptxas_report(ptx: str, arch: str) -> tuple[int, int]:
    """(registers, spill-store bytes) that ptxas reports for the PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        log = subprocess.run(
            [triton.knobs.nvidia.ptxas.path, f"--gpu-name={arch}", "-v", handle.name, "-o", os.devnull],
            capture_output=True, text=True, check=True,
        ).stderr
    finally:
        os.unlink(handle.name)
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores", log)
    return registers, int(spills.group(1)) if spills else 0


def main() -> int:
    if isinstance(triton_backend._plane_tile_kernel, triton.runtime.interpreter.InterpretedFunction):
        print("run with TRITON_INTERPRET=0: the interpreter's kernels cannot be compiled")
        return 2
    print(f"triton {triton.__version__}")
    print(f"{'kernel variant':44} {'arch':6} {'regs':>5} {'spill B':>8} {'compile s':>9}")
    failures = []
    for capability, arch in ((80, "sm_80"), (90, "sm_90a")):
        for description, kernel, pointers, constexprs, warps, must_not_spill in variants():
            started = time.perf_counter()
            try:
                source = ASTSource(fn=kernel, signature=signature(kernel, pointers, constexprs), constexprs=constexprs)
                compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps})
                registers, spills = ptxas_report(compiled.asm["ptx"], arch)
            except Exception as error:  # report every variant, then fail
                failures.append(f"{description} on {arch}: {type(error).__name__}: {error}")
                print(f"{description:44} {arch:6} FAILED")
                continue
            print(f"{description:44} {arch:6} {registers:5d} {spills:8d} {time.perf_counter() - started:9.1f}")
            if spills and must_not_spill:
                failures.append(f"{description} on {arch} spills {spills} bytes of registers")
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
