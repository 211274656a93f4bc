"""The Triton backend: the fused loss as Triton kernels, registered as hgloss::triton_heatmap_loss.

Kernels
- `_plane_tile_kernel`: program (plane, tile) owns TILE consecutive pixels of one flattened
  H x W plane. It loads D = P - T at the shifts its stencil needs (the centre and +-1 along each
  axis for "forward", +-1 and +-2 for "central", the 5 x 5 neighbourhood for "sobel"). The
  shifted loads hit L1/L2, so each input is read from memory about once. The program writes its
  tile's sums of D^2 and Ax^2 + Ay^2 and, when asked, dL/dD for an upstream gradient of 1. dL/dD
  needs only per-plane constants known before the sums (H, W, Nx + Ny, the plane's weight, the
  mean's 1/(B*K)), so tiles never wait for each other: the same kernel serves planes that fit
  one tile and 1024 x 1024, 1 x W or H x 1 planes alike; a neighbour across a tile edge is read
  from memory like any other neighbour. Planes smaller than a tile are packed several to a
  program.
  Memory traffic per pixel: P, G (and S) read once in their own dtypes; dL/dD written once
  (4 bytes, 2 for a bfloat16 pred).
- `_finish_planes_kernel`: one program adds each plane's partial sums in tile order, writes the
  per-plane terms mu*V + lambda*R, and the weighted plane losses or their sum or mean, summed in
  a fixed order: bit-identical run to run, no atomics.
- `_scale_planes_kernel`: the backward's in-place scaling of dL/dD by the upstream gradient. A
  plane whose factor is exactly 1 (every plane, after `loss.backward()` on a mean or a sum) is
  skipped; the factor is read on the device, so nothing waits for the host.

Every load is converted to float32 (float64 for a float64 pred) before any arithmetic, which is
also what keeps bfloat16 right under the Triton interpreter (TRITON_INTERPRET=1), where
bfloat16 arithmetic is silently wrong.

Registration: on a GPU the operator is a `torch.library.triton_op`, so torch.compile sees the
kernels and inductor launches them from its own generated code, plans the buffers the operator
allocates, and fuses the caller's arithmetic on the loss into its kernels, instead of calling an
opaque operator through the dispatcher. The interpreter runs kernels on CPU tensors that
`triton_op` cannot trace, so there the same function is a `torch.library.custom_op` with a fake
implementation; that is the form CI tests with opcheck and torch.compile.
"""

import struct

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from .. import ops
from .reference import accumulation_dtype

STENCIL_CODES = {"forward": 0, "central": 1, "sobel": 2}
REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}
# Per stencil, the most pixels of one plane a tile-kernel program owns and its warps. A thread
# keeps the D values its stencil reuses in registers; fewer pixels per thread for the wider
# stencils keep that at or under 128 registers, without spills (ptxas -v, sm_90, float32: 77
# for "forward", 61 for "central", 125 for "sobel"), so that several programs share an SM.
# Chosen by register count; not yet timed on a GPU.
TILE_CONFIG = {"forward": (1024, 8), "central": (512, 8), "sobel": (512, 8)}
# Pixels per program of the backward's scaling kernel, and planes per step of the finishing kernel.
SCALE_TILE = 1024
PLANE_BLOCK = 1024


@triton.jit
def _difference(inputs, tile, row_shift: tl.constexpr, col_shift: tl.constexpr,
                HAS_TEACHER: tl.constexpr, CONTIGUOUS: tl.constexpr, ACC: tl.constexpr):
    """D = P - T at the tile's pixels shifted by (row_shift, col_shift); 0 outside the plane."""
    pred_ptr, target_ptr, teacher_ptr, blend, pred_strides, target_strides, teacher_strides = inputs
    offsets, rows, cols, in_tile, height, width = tile
    shifted_rows = rows + row_shift
    shifted_cols = cols + col_shift
    inside = in_tile & (shifted_rows >= 0) & (shifted_rows < height) & (shifted_cols >= 0) & (shifted_cols < width)
    if CONTIGUOUS:
        # Every input's plane is dense, so the shifted pixel is a fixed distance away in memory
        # and the centre loads are contiguous (vectorised).
        pred_offsets = offsets + (row_shift * width + col_shift)
        target_offsets = pred_offsets
        teacher_offsets = pred_offsets
    else:
        pred_offsets = shifted_rows * pred_strides[0] + shifted_cols * pred_strides[1]
        target_offsets = shifted_rows * target_strides[0] + shifted_cols * target_strides[1]
        teacher_offsets = shifted_rows * teacher_strides[0] + shifted_cols * teacher_strides[1]
    pred = tl.load(pred_ptr + pred_offsets, mask=inside, other=0.0).to(ACC)
    target = tl.load(target_ptr + target_offsets, mask=inside, other=0.0).to(ACC)
    if HAS_TEACHER:
        teacher = tl.load(teacher_ptr + teacher_offsets, mask=inside, other=0.0).to(ACC)
        return pred - ((1 - blend) * target + blend * teacher)
    return pred - target


@triton.jit
def _gradient_map(inputs, tile, row_shift: tl.constexpr, col_shift: tl.constexpr, STEP_ROW: tl.constexpr,
                  STEP_COL: tl.constexpr, STENCIL: tl.constexpr, HAS_TEACHER: tl.constexpr,
                  CONTIGUOUS: tl.constexpr, ACC: tl.constexpr):
    """One gradient map at the tile's pixels shifted by (row_shift, col_shift), 0 off its valid
    positions: Ax for a step (STEP_ROW, STEP_COL) = (0, 1) along the row, Ay for (1, 0). The
    sobel smoothing runs across the step, along (STEP_COL, STEP_ROW)."""
    _, rows, cols, in_tile, height, width = tile
    i = rows + row_shift
    j = cols + col_shift
    along = i * STEP_ROW + j * STEP_COL
    across = i * STEP_COL + j * STEP_ROW
    along_size = height * STEP_ROW + width * STEP_COL
    across_size = height * STEP_COL + width * STEP_ROW
    if STENCIL == 0:
        valid = (along >= 0) & (along < along_size - 1) & (across >= 0) & (across < across_size)
        value = (_difference(inputs, tile, row_shift + STEP_ROW, col_shift + STEP_COL, HAS_TEACHER, CONTIGUOUS, ACC)
                 - _difference(inputs, tile, row_shift, col_shift, HAS_TEACHER, CONTIGUOUS, ACC))
    elif STENCIL == 1:
        valid = (along >= 1) & (along < along_size - 1) & (across >= 0) & (across < across_size)
        value = 0.5 * (
            _difference(inputs, tile, row_shift + STEP_ROW, col_shift + STEP_COL, HAS_TEACHER, CONTIGUOUS, ACC)
            - _difference(inputs, tile, row_shift - STEP_ROW, col_shift - STEP_COL, HAS_TEACHER, CONTIGUOUS, ACC))
    else:
        valid = (along >= 1) & (along < along_size - 1) & (across >= 1) & (across < across_size - 1)
        # Differences along the step at the three rows (or columns) across it, weighted 1, 2, 1.
        value = 0.125 * (
            (_difference(inputs, tile, row_shift - STEP_COL + STEP_ROW, col_shift - STEP_ROW + STEP_COL,
                         HAS_TEACHER, CONTIGUOUS, ACC)
             - _difference(inputs, tile, row_shift - STEP_COL - STEP_ROW, col_shift - STEP_ROW - STEP_COL,
                           HAS_TEACHER, CONTIGUOUS, ACC))
            + 2 * (_difference(inputs, tile, row_shift + STEP_ROW, col_shift + STEP_COL, HAS_TEACHER, CONTIGUOUS, ACC)
                   - _difference(inputs, tile, row_shift - STEP_ROW, col_shift - STEP_COL, HAS_TEACHER, CONTIGUOUS, ACC))
            + (_difference(inputs, tile, row_shift + STEP_COL + STEP_ROW, col_shift + STEP_ROW + STEP_COL,
                           HAS_TEACHER, CONTIGUOUS, ACC)
               - _difference(inputs, tile, row_shift + STEP_COL - STEP_ROW, col_shift + STEP_ROW - STEP_COL,
                             HAS_TEACHER, CONTIGUOUS, ACC)))
    return tl.where(valid & in_tile, value, 0.0)


@triton.jit
def _map_adjoint(inputs, tile, STEP_ROW: tl.constexpr, STEP_COL: tl.constexpr, STENCIL: tl.constexpr,
                 HAS_TEACHER: tl.constexpr, CONTIGUOUS: tl.constexpr, ACC: tl.constexpr):
    """(A^T A D) at the tile's pixels for the map with this step: each tap (offset, c) of the map
    sends c * A[p] to pixel p + offset, so pixel q gathers c * A[q - offset] from valid positions."""
    if STENCIL == 0:
        # Taps: -1 at the pixel, +1 one step on.
        gathered = (_gradient_map(inputs, tile, -STEP_ROW, -STEP_COL, STEP_ROW, STEP_COL, STENCIL,
                                  HAS_TEACHER, CONTIGUOUS, ACC)
                    - _gradient_map(inputs, tile, 0, 0, STEP_ROW, STEP_COL, STENCIL, HAS_TEACHER, CONTIGUOUS, ACC))
    elif STENCIL == 1:
        # Taps: -1/2 one step back, +1/2 one step on.
        gathered = 0.5 * (
            _gradient_map(inputs, tile, -STEP_ROW, -STEP_COL, STEP_ROW, STEP_COL, STENCIL, HAS_TEACHER, CONTIGUOUS, ACC)
            - _gradient_map(inputs, tile, STEP_ROW, STEP_COL, STEP_ROW, STEP_COL, STENCIL, HAS_TEACHER, CONTIGUOUS, ACC))
    else:
        # Taps: +-(2 - |u|) / 8 one step on and back, at u = -1, 0, 1 across the step.
        gathered = 0.125 * (
            (_gradient_map(inputs, tile, STEP_COL - STEP_ROW, STEP_ROW - STEP_COL, STEP_ROW, STEP_COL, STENCIL,
                           HAS_TEACHER, CONTIGUOUS, ACC)
             - _gradient_map(inputs, tile, STEP_COL + STEP_ROW, STEP_ROW + STEP_COL, STEP_ROW, STEP_COL, STENCIL,
                             HAS_TEACHER, CONTIGUOUS, ACC))
            + 2 * (_gradient_map(inputs, tile, -STEP_ROW, -STEP_COL, STEP_ROW, STEP_COL, STENCIL,
                                 HAS_TEACHER, CONTIGUOUS, ACC)
                   - _gradient_map(inputs, tile, STEP_ROW, STEP_COL, STEP_ROW, STEP_COL, STENCIL,
                                   HAS_TEACHER, CONTIGUOUS, ACC))
            + (_gradient_map(inputs, tile, -STEP_COL - STEP_ROW, -STEP_ROW - STEP_COL, STEP_ROW, STEP_COL, STENCIL,
                             HAS_TEACHER, CONTIGUOUS, ACC)
               - _gradient_map(inputs, tile, -STEP_COL + STEP_ROW, -STEP_ROW + STEP_COL, STEP_ROW, STEP_COL, STENCIL,
                               HAS_TEACHER, CONTIGUOUS, ACC)))
    return gathered


@triton.jit
def _weight_from_parts(high, low, ACC: tl.constexpr):
    """A float argument passed as two float32 halves (Triton passes Python floats as float32),
    rejoined to float64 precision when ACC is float64."""
    return tl.cast(high, ACC) + tl.cast(low, ACC)


@triton.jit
def _plane_tile_kernel(
    pred_ptr, target_ptr, teacher_ptr, blend_ptr, weight_ptr, partials_ptr, grad_ptr,
    joints, height, width, gradient_count, plane_count,
    pred_batch_stride, pred_joint_stride, pred_row_stride, pred_col_stride,
    target_batch_stride, target_joint_stride, target_row_stride, target_col_stride,
    teacher_batch_stride, teacher_joint_stride, teacher_row_stride, teacher_col_stride,
    blend_stride, weight_batch_stride, weight_joint_stride,
    mse_high, mse_low, grad_high, grad_low,
    STENCIL: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, MEAN: tl.constexpr, CONTIGUOUS: tl.constexpr,
    PLANES: tl.constexpr, TILE: tl.constexpr,
):
    ACC = partials_ptr.dtype.element_ty  # float32, or float64 for a float64 pred
    # Rows of the program's 2-D block are its planes, columns the pixels of one tile of each.
    first_plane = tl.program_id(0) * PLANES
    tile_index = tl.program_id(1)
    tiles = tl.num_programs(1)
    plane_list = first_plane + tl.arange(0, PLANES)
    planes = plane_list[:, None]
    plane_present = planes < plane_count
    batch = (planes // joints).to(tl.int64)
    joint = (planes % joints).to(tl.int64)

    plane_size = height * width
    offsets = tile_index * TILE + tl.arange(0, TILE)[None, :]
    in_tile = plane_present & (offsets < plane_size)
    rows = offsets // width
    cols = offsets % width
    tile = (offsets, rows, cols, in_tile, height, width)

    pred_plane = pred_ptr + batch * pred_batch_stride + joint * pred_joint_stride
    # Without a teacher, its slot holds a pointer that is never read (the compiler rejects None).
    teacher_plane = pred_plane
    blend = 0.0
    if HAS_TEACHER:
        blend = tl.load(blend_ptr + batch * blend_stride, mask=plane_present, other=0.0).to(ACC)
        teacher_plane = teacher_ptr + batch * teacher_batch_stride + joint * teacher_joint_stride
    inputs = (
        pred_plane,
        target_ptr + batch * target_batch_stride + joint * target_joint_stride,
        teacher_plane,
        blend,
        (pred_row_stride, pred_col_stride),
        (target_row_stride, target_col_stride),
        (teacher_row_stride, teacher_col_stride),
    )

    diff = _difference(inputs, tile, 0, 0, HAS_TEACHER, CONTIGUOUS, ACC)
    x_map = _gradient_map(inputs, tile, 0, 0, 0, 1, STENCIL, HAS_TEACHER, CONTIGUOUS, ACC)
    y_map = _gradient_map(inputs, tile, 0, 0, 1, 0, STENCIL, HAS_TEACHER, CONTIGUOUS, ACC)
    if COMPUTE_GRAD:
        scale = tl.full([PLANES, 1], 2.0, ACC)
        if HAS_WEIGHT:
            weight_at = weight_ptr + batch * weight_batch_stride + joint * weight_joint_stride
            scale = scale * tl.load(weight_at, mask=plane_present, other=0.0).to(ACC)
        if MEAN:
            scale = scale / tl.cast(plane_count, ACC)
        value_coefficient = scale * _weight_from_parts(mse_high, mse_low, ACC) / tl.cast(plane_size, ACC)
        gradient_coefficient = scale * _weight_from_parts(grad_high, grad_low, ACC) / tl.cast(gradient_count, ACC)
        adjoint = (_map_adjoint(inputs, tile, 0, 1, STENCIL, HAS_TEACHER, CONTIGUOUS, ACC)
                   + _map_adjoint(inputs, tile, 1, 0, STENCIL, HAS_TEACHER, CONTIGUOUS, ACC))
        grad = value_coefficient * diff + gradient_coefficient * adjoint
        grad_at = grad_ptr + planes.to(tl.int64) * plane_size + offsets
        tl.store(grad_at, grad.to(grad_ptr.dtype.element_ty), mask=in_tile)

    # Stored last: the compiler cannot tell that a store leaves the inputs alone, so a load after
    # one would not be merged with the same load before it.
    partial = partials_ptr + (plane_list.to(tl.int64) * tiles + tile_index) * 2
    tl.store(partial, tl.sum(diff * diff, axis=1), mask=plane_list < plane_count)
    tl.store(partial + 1, tl.sum(x_map * x_map + y_map * y_map, axis=1), mask=plane_list < plane_count)


@triton.jit
def _finish_planes_kernel(
    partials_ptr, weight_ptr, terms_ptr, loss_ptr,
    plane_count, joints, tiles, value_count, gradient_count,
    weight_batch_stride, weight_joint_stride,
    mse_high, mse_low, grad_high, grad_low,
    REDUCTION: tl.constexpr, HAS_WEIGHT: tl.constexpr, PLANE_BLOCK: tl.constexpr,
):
    ACC = terms_ptr.dtype.element_ty
    mse_weight = _weight_from_parts(mse_high, mse_low, ACC)
    grad_weight = _weight_from_parts(grad_high, grad_low, ACC)
    running = tl.zeros([PLANE_BLOCK], dtype=ACC)
    for start in range(0, plane_count, PLANE_BLOCK):
        planes = start + tl.arange(0, PLANE_BLOCK)
        present = planes < plane_count
        value_sum = tl.zeros([PLANE_BLOCK], dtype=ACC)
        gradient_sum = tl.zeros([PLANE_BLOCK], dtype=ACC)
        for tile_index in range(0, tiles):
            partial = partials_ptr + (planes.to(tl.int64) * tiles + tile_index) * 2
            value_sum += tl.load(partial, mask=present, other=0.0)
            gradient_sum += tl.load(partial + 1, mask=present, other=0.0)
        terms = mse_weight * (value_sum / tl.cast(value_count, ACC)) + grad_weight * (gradient_sum / tl.cast(gradient_count, ACC))
        tl.store(terms_ptr + planes, terms, mask=present)
        plane_loss = terms
        if HAS_WEIGHT:
            batch = (planes // joints).to(tl.int64)
            joint = (planes % joints).to(tl.int64)
            weight_at = weight_ptr + batch * weight_batch_stride + joint * weight_joint_stride
            plane_loss = terms * tl.load(weight_at, mask=present, other=0.0).to(ACC)
        if REDUCTION == 0:
            tl.store(loss_ptr + planes, plane_loss, mask=present)
        else:
            running += tl.where(present, plane_loss, 0.0)
    if REDUCTION != 0:
        total = tl.sum(running, axis=0)
        if REDUCTION == 2:
            total = total / tl.cast(tl.maximum(plane_count, 1), ACC)
        tl.store(loss_ptr, total)


@triton.jit
def _scale_planes_kernel(grad_ptr, scale_ptr, plane_size, PER_PLANE: tl.constexpr, TILE: tl.constexpr):
    ACC = scale_ptr.dtype.element_ty
    plane = tl.program_id(0)
    factor = tl.load(scale_ptr + plane) if PER_PLANE else tl.load(scale_ptr)
    if factor != 1.0:
        offsets = tl.program_id(1) * TILE + tl.arange(0, TILE)
        grad_at = grad_ptr + plane.to(tl.int64) * plane_size + offsets
        inside = offsets < plane_size
        grad = tl.load(grad_at, mask=inside, other=0.0).to(ACC)
        tl.store(grad_at, (grad * factor.to(ACC)).to(grad_ptr.dtype.element_ty), mask=inside)


# Whether triton.jit gave interpreted kernels (TRITON_INTERPRET=1 when this module was imported).
INTERPRETING = isinstance(_plane_tile_kernel, InterpretedFunction)


def launch_shape(height: int, width: int, stencil: str) -> tuple[int, int, int, int]:
    """(pixels per tile, tiles per plane, planes per program, warps) of the tile kernel. A plane
    smaller than a tile shares its program with other planes."""
    max_tile, num_warps = TILE_CONFIG[stencil]
    program_pixels = max_tile
    if INTERPRETING:
        # The interpreter's cost is per operation whatever the block size: larger blocks, fewer
        # programs. Planes above 8192 pixels still take the multi-tile path.
        max_tile, program_pixels = 8192, 32768
    tile_pixels = min(triton.next_power_of_2(height * width), max_tile)
    return tile_pixels, triton.cdiv(height * width, tile_pixels), program_pixels // tile_pixels, num_warps


def _float32_parts(value: float) -> tuple[float, float]:
    """value as high + low, both exactly representable in float32 (about 48 bits together)."""
    high = struct.unpack("f", struct.pack("f", value))[0]
    return high, struct.unpack("f", struct.pack("f", value - high))[0]


def _gradient_count(height: int, width: int, stencil: str) -> int:
    """Nx + Ny: how many valid positions the stencil's two gradient maps have together."""
    if stencil == "forward":
        return height * (width - 1) + (height - 1) * width
    if stencil == "central":
        return height * max(width - 2, 0) + max(height - 2, 0) * width
    return 2 * max(height - 2, 0) * max(width - 2, 0)


def _plane_strides(tensor: torch.Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if tensor is None else tuple(tensor.stride())


def _has_dense_planes(tensor: torch.Tensor | None) -> bool:
    if tensor is None:
        return True
    height, width = tensor.shape[2:]
    return (tensor.stride(3) == 1 or width == 1) and (tensor.stride(2) == width or height == 1)


def _triton_heatmap_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    teacher: torch.Tensor | None,
    alpha: torch.Tensor | None,
    weight: torch.Tensor | None,
    mse_weight: float,
    grad_weight: float,
    stencil: str,
    reduction: str,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hgloss::heatmap_loss computed by the Triton kernels: (loss, per-plane terms, dL/dD or an
    empty tensor). See hgloss/ops.py for the contract."""
    batch, joints, height, width = pred.shape
    dtype = accumulation_dtype(pred)
    plane_count = batch * joints
    tile_pixels, tiles, planes_per_program, num_warps = launch_shape(height, width, stencil)
    mse_parts = _float32_parts(mse_weight)
    grad_parts = _float32_parts(grad_weight)
    # With no gradient position the gradient sums are 0; dividing by 1 keeps R = 0.
    gradient_count = max(_gradient_count(height, width, stencil), 1)

    partials = pred.new_empty((plane_count, tiles, 2), dtype=dtype)
    terms = pred.new_empty((batch, joints), dtype=dtype)
    loss = pred.new_empty((batch, joints) if reduction == "none" else (), dtype=dtype)
    grad = pred.new_empty(pred.shape if compute_grad else (0,), dtype=ops.saved_gradient_dtype(pred))
    weight_strides = (0, 0) if weight is None else weight.stride()

    if plane_count > 0:
        wrap_triton(_plane_tile_kernel)[(triton.cdiv(plane_count, planes_per_program), tiles)](
            pred, target, teacher, alpha, weight, partials, grad,
            joints, height, width, gradient_count, plane_count,
            *pred.stride(), *target.stride(), *_plane_strides(teacher),
            0 if alpha is None else alpha.stride(0), *weight_strides,
            *mse_parts, *grad_parts,
            STENCIL=STENCIL_CODES[stencil],
            HAS_TEACHER=teacher is not None,
            HAS_WEIGHT=weight is not None,
            COMPUTE_GRAD=compute_grad,
            MEAN=reduction == "mean",
            CONTIGUOUS=all(_has_dense_planes(tensor) for tensor in (pred, target, teacher)),
            PLANES=planes_per_program,
            TILE=tile_pixels,
            num_warps=num_warps,
        )
    wrap_triton(_finish_planes_kernel)[(1,)](
        partials, weight, terms, loss,
        plane_count, joints, tiles, height * width, gradient_count,
        *weight_strides,
        *mse_parts, *grad_parts,
        REDUCTION=REDUCTION_CODES[reduction],
        HAS_WEIGHT=weight is not None,
        PLANE_BLOCK=PLANE_BLOCK,
    )
    return loss, terms, grad


def scale_gradient_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale in place, per plane when scale is (B, K), skipping factors that are exactly 1."""
    batch, joints, height, width = grad.shape
    if batch * joints == 0:
        return
    per_plane = scale.dim() > 0
    scale = scale.contiguous()
    _scale_planes_kernel[(batch * joints, triton.cdiv(height * width, SCALE_TILE))](
        grad, scale, height * width,
        PER_PLANE=per_plane,
        TILE=SCALE_TILE,
    )


if INTERPRETING:
    torch.library.custom_op("hgloss::triton_heatmap_loss", mutates_args=())(_triton_heatmap_loss)
    torch.library.register_fake("hgloss::triton_heatmap_loss")(ops.fake_heatmap_loss)
else:
    torch.library.triton_op("hgloss::triton_heatmap_loss", mutates_args=())(_triton_heatmap_loss)
ops.register_fused_autograd("hgloss::triton_heatmap_loss", torch.ops.hgloss.triton_heatmap_loss, scale_gradient_)
