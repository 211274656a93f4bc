"""The Triton backend: the fused loss of docs/spec.md as Triton kernels.

`heatmap_loss` is the body of the operator hgloss::triton_heatmap_loss and `scale_gradient_` its
backward's in-place scaling; hgloss/ops.py registers them. This module knows nothing of the
registration: it checks arguments by the contract, launches kernels and returns tensors.

What one program owns
    Program (p, t) of the tile kernel owns tile t, TILE consecutive pixels of the flattened
    H x W plane, of PLANES consecutive planes (several when planes are smaller than a tile,
    else one). Tiles never wait for each other: dL/dD needs only per-plane constants known
    before any sum (H, W, Nx + Ny, the plane's weight, the mean's 1/(B*K)), so the same kernel
    serves 64 x 48 planes and 1024 x 1024, 1 x W or H x 1 ones; a neighbour across a tile edge
    is read from memory like any other.

What is read and written per pixel
    P, G (and S) are read in their own dtypes at the shifts the stencil needs (the taps of the
    gradient maps, then of their adjoints); the shifted loads hit L1/L2, so each input comes
    from memory about once. A separable target (hgloss.targets) is no tensor at all: at each
    shifted pixel (i, j) the kernel reads the plane's float64 row factor i and column factor j
    and forms G = float32(row * col), H + W values read per plane instead of H x W. dL/dD is
    written once (4 bytes, 2 for a bfloat16 pred). Every load of P, G or S is converted to the
    accumulation dtype before any arithmetic, which also keeps bfloat16 right under the Triton
    interpreter, where bfloat16 arithmetic is silently wrong; only the factors are multiplied
    first, in float64, as G is defined.

Why the sums are deterministic
    Each program writes its tile's two partial sums (of D^2 and of Ax^2 + Ay^2) to its own
    slot. One program of `_finish_planes_kernel` then adds each plane's partials in tile order
    and the plane losses in plane order: the same order on every run, and no atomics.

The stencil comes from hgloss.stencils as constexprs, unrolled with tl.static_range: its scale,
each map's taps paired into weighted differences, and the margins of each map's valid range.
The pairs keep the arithmetic as the formulas are written, a difference per pair and one
multiply by the scale per map. Summed tap by tap instead, the sobel kernel needs 147 to 155
registers rather than 128 (ptxas, sm_90, float32 with teacher and weight), above the 128 that
let two 256-thread programs share an SM.
"""

import functools
import struct

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from .. import stencils
from ..contract import accumulation_dtype, check_operator_arguments, operator_outputs

# Per stencil, the most pixels of one plane a tile-kernel program owns and its warps. A thread
# keeps the D values its stencil reuses in registers; fewer pixels per thread for the wider
# stencils keep that at or under 128 registers, without spills (ptxas -v, sm_90, float32), so
# that several programs share an SM. Chosen by register count; not yet timed on a GPU.
TILE_CONFIG = {"forward": (1024, 8), "central": (512, 8), "sobel": (512, 8)}
# Pixels per program of the backward's scaling kernel, and planes per step of the finishing kernel.
SCALE_TILE = 1024
PLANE_BLOCK = 1024
# Offsets at or above this many elements need 64-bit arithmetic.
INT32_LIMIT = 2**31


@triton.jit
def _exact_float(bits, ACC: tl.constexpr):
    """A float argument, passed as the int64 bits of its float64 value (Triton would round a
    Python float to float32, and 1e40 to inf), in the accumulation dtype."""
    return tl.cast(tl.cast(bits, tl.int64), tl.float64, bitcast=True).to(ACC)


@triton.jit
def _times(value, WEIGHT: tl.constexpr):
    """WEIGHT * value, without a multiply for a weight of 1."""
    if WEIGHT == 1:
        return value
    else:
        return WEIGHT * value


@triton.jit
def _difference(
    pred_plane, target_plane, target_rows_plane, target_cols_plane, teacher_plane, blend,
    pred_row_stride, pred_col_stride, target_row_stride, target_col_stride, teacher_row_stride, teacher_col_stride,
    offsets, rows, cols, in_tile, height, width,
    ROW_SHIFT: tl.constexpr, COL_SHIFT: tl.constexpr,
    HAS_TEACHER: tl.constexpr, SEPARABLE: tl.constexpr, DENSE: tl.constexpr, ACC: tl.constexpr,
):
    """D = P - ((1 - a) G + a S) at the tile's pixels shifted by (ROW_SHIFT, COL_SHIFT); 0 off the plane."""
    i = rows + ROW_SHIFT
    j = cols + COL_SHIFT
    inside = in_tile & (i >= 0) & (i < height) & (j >= 0) & (j < width)
    if DENSE:
        # Every input's plane is one dense run, so the shifted pixel is a fixed distance away
        # and the loads stay contiguous (vectorised).
        pred_offsets = offsets + (ROW_SHIFT * width + COL_SHIFT)
        target_offsets = pred_offsets
        teacher_offsets = pred_offsets
    else:
        pred_offsets = i * pred_row_stride + j * pred_col_stride
        target_offsets = i * target_row_stride + j * target_col_stride
        teacher_offsets = i * teacher_row_stride + j * teacher_col_stride
    pred = tl.load(pred_plane + pred_offsets, mask=inside, other=0.0).to(ACC)
    if SEPARABLE:
        # G = float32(rows[i] * cols[j]) (hgloss.targets): the product in float64, rounded to the
        # float32 the codecs store, so that G has the bits of the target tensor it stands for.
        # Each factor is masked by its own axis alone, so that the loads of one row shift are the
        # same for every column shift (and the other way round) and the compiler merges them.
        row_factor = tl.load(target_rows_plane + i, mask=in_tile & (i >= 0) & (i < height), other=0.0)
        col_factor = tl.load(target_cols_plane + j, mask=in_tile & (j >= 0) & (j < width), other=0.0)
        target = tl.where(inside, (row_factor * col_factor).to(tl.float32), 0.0).to(ACC)
    else:
        target = tl.load(target_plane + target_offsets, mask=inside, other=0.0).to(ACC)
    if HAS_TEACHER:
        teacher = tl.load(teacher_plane + teacher_offsets, mask=inside, other=0.0).to(ACC)
        return pred - ((1 - blend) * target + blend * teacher)
    return pred - target


@triton.jit
def _gradient_map(
    pred_plane, target_plane, target_rows_plane, target_cols_plane, teacher_plane, blend,
    pred_row_stride, pred_col_stride, target_row_stride, target_col_stride, teacher_row_stride, teacher_col_stride,
    pixel_plane, pixel_row_stride, pixel_col_stride,
    offsets, rows, cols, in_tile, height, width,
    ROW_SHIFT: tl.constexpr, COL_SHIFT: tl.constexpr,
    SCALE: tl.constexpr, DIFFERENCES: tl.constexpr, MARGINS: tl.constexpr,
    HAS_TEACHER: tl.constexpr, SEPARABLE: tl.constexpr, DENSE: tl.constexpr, WEIGHED: tl.constexpr,
    ACC: tl.constexpr,
):
    """A gradient map, SCALE * (sum over DIFFERENCES (weight, plus_row, plus_col, minus_row,
    minus_col) of weight * (D[plus] - D[minus])), at the tile's pixels shifted by
    (ROW_SHIFT, COL_SHIFT); 0 off its valid range, MARGINS = (top, bottom, left, right). WEIGHED:
    each entry times the pixel weight M at the entry's own index."""
    i = rows + ROW_SHIFT
    j = cols + COL_SHIFT
    valid = in_tile & (i >= MARGINS[0]) & (i < height - MARGINS[1]) & (j >= MARGINS[2]) & (j < width - MARGINS[3])
    for k in tl.static_range(len(DIFFERENCES)):
        plus = _difference(
            pred_plane, target_plane, target_rows_plane, target_cols_plane, teacher_plane, blend,
            pred_row_stride, pred_col_stride, target_row_stride, target_col_stride, teacher_row_stride, teacher_col_stride,
            offsets, rows, cols, in_tile, height, width,
            ROW_SHIFT + DIFFERENCES[k][1], COL_SHIFT + DIFFERENCES[k][2], HAS_TEACHER, SEPARABLE, DENSE, ACC,
        )
        minus = _difference(
            pred_plane, target_plane, target_rows_plane, target_cols_plane, teacher_plane, blend,
            pred_row_stride, pred_col_stride, target_row_stride, target_col_stride, teacher_row_stride, teacher_col_stride,
            offsets, rows, cols, in_tile, height, width,
            ROW_SHIFT + DIFFERENCES[k][3], COL_SHIFT + DIFFERENCES[k][4], HAS_TEACHER, SEPARABLE, DENSE, ACC,
        )
        if k == 0:
            total = _times(plus - minus, DIFFERENCES[k][0])
        else:
            total += _times(plus - minus, DIFFERENCES[k][0])
    if WEIGHED:
        pixel = tl.load(pixel_plane + i * pixel_row_stride + j * pixel_col_stride, mask=valid, other=0.0).to(ACC)
        total = total * pixel
    return tl.where(valid, SCALE * total, 0.0)


@triton.jit
def _adjoint_of_map(
    pred_plane, target_plane, target_rows_plane, target_cols_plane, teacher_plane, blend,
    pred_row_stride, pred_col_stride, target_row_stride, target_col_stride, teacher_row_stride, teacher_col_stride,
    pixel_plane, pixel_row_stride, pixel_col_stride,
    offsets, rows, cols, in_tile, height, width,
    SCALE: tl.constexpr, DIFFERENCES: tl.constexpr, MARGINS: tl.constexpr,
    HAS_TEACHER: tl.constexpr, SEPARABLE: tl.constexpr, DENSE: tl.constexpr, PIXEL_WEIGHTED: tl.constexpr,
    ACC: tl.constexpr,
):
    """(A^T A D) at the tile's pixels (A^T M A D with a pixel weight). The map sent weight * A[p]
    to p + plus and took it from p + minus, so pixel q gathers
    SCALE * weight * (A[q - plus] - A[q - minus])."""
    for k in tl.static_range(len(DIFFERENCES)):
        from_plus = _gradient_map(
            pred_plane, target_plane, target_rows_plane, target_cols_plane, teacher_plane, blend,
            pred_row_stride, pred_col_stride, target_row_stride, target_col_stride, teacher_row_stride, teacher_col_stride,
            pixel_plane, pixel_row_stride, pixel_col_stride,
            offsets, rows, cols, in_tile, height, width,
            -DIFFERENCES[k][1], -DIFFERENCES[k][2], SCALE, DIFFERENCES, MARGINS, HAS_TEACHER, SEPARABLE, DENSE,
            PIXEL_WEIGHTED, ACC,
        )
        from_minus = _gradient_map(
            pred_plane, target_plane, target_rows_plane, target_cols_plane, teacher_plane, blend,
            pred_row_stride, pred_col_stride, target_row_stride, target_col_stride, teacher_row_stride, teacher_col_stride,
            pixel_plane, pixel_row_stride, pixel_col_stride,
            offsets, rows, cols, in_tile, height, width,
            -DIFFERENCES[k][3], -DIFFERENCES[k][4], SCALE, DIFFERENCES, MARGINS, HAS_TEACHER, SEPARABLE, DENSE,
            PIXEL_WEIGHTED, ACC,
        )
        if k == 0:
            total = _times(from_plus - from_minus, DIFFERENCES[k][0])
        else:
            total += _times(from_plus - from_minus, DIFFERENCES[k][0])
    return SCALE * total


@triton.jit(do_not_specialize=["mse_weight_bits", "grad_weight_bits"])
def _plane_tile_kernel(
    pred_ptr, target_ptr, target_rows_ptr, target_cols_ptr, teacher_ptr, blend_ptr, weight_ptr, pixel_ptr,
    partials_ptr, grad_ptr,
    joints, height, width, gradient_count, plane_count,
    pred_batch_stride, pred_joint_stride, pred_row_stride, pred_col_stride,
    target_batch_stride, target_joint_stride, target_row_stride, target_col_stride,
    teacher_batch_stride, teacher_joint_stride, teacher_row_stride, teacher_col_stride,
    pixel_batch_stride, pixel_joint_stride, pixel_row_stride, pixel_col_stride,
    blend_stride, weight_batch_stride, weight_joint_stride,
    mse_weight_bits, grad_weight_bits,
    SCALE: tl.constexpr, X_DIFFERENCES: tl.constexpr, Y_DIFFERENCES: tl.constexpr, X_MARGINS: tl.constexpr, Y_MARGINS: tl.constexpr,
    HAS_TEACHER: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, MEAN: tl.constexpr,
    DENSE: tl.constexpr, WIDE: tl.constexpr, PLANES: tl.constexpr, TILE: tl.constexpr,
):
    ACC = partials_ptr.dtype.element_ty  # float32, or float64 for a float64 pred

    # 1. Which pixels this program owns: rows of the block are planes, columns a tile of each.
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
    if WIDE:
        # In-plane offsets that can pass 2^31 elements (huge planes or strides): 64-bit throughout.
        offsets = offsets.to(tl.int64)
    in_tile = plane_present & (offsets < plane_size)
    rows = offsets // width
    cols = offsets % width

    pred_plane = pred_ptr + batch * pred_batch_stride + joint * pred_joint_stride
    # A separable target comes as its factors alone, target_ptr None. Deciding that from the
    # arguments rather than by a constexpr of its own keeps the two from disagreeing.
    SEPARABLE: tl.constexpr = target_ptr is None
    # The slots of the form not given, and the teacher's without a teacher, hold a pointer that
    # is never read (the compiler rejects None).
    if SEPARABLE:
        target_plane = pred_plane
        target_rows_plane = target_rows_ptr + planes.to(tl.int64) * height
        target_cols_plane = target_cols_ptr + planes.to(tl.int64) * width
    else:
        target_plane = target_ptr + batch * target_batch_stride + joint * target_joint_stride
        target_rows_plane = pred_plane
        target_cols_plane = pred_plane
    teacher_plane = pred_plane
    blend = 0.0
    if HAS_TEACHER:
        blend = tl.load(blend_ptr + batch * blend_stride, mask=plane_present, other=0.0).to(ACC)
        teacher_plane = teacher_ptr + batch * teacher_batch_stride + joint * teacher_joint_stride
    # A pixel weight M comes with the strides of its (B, K, H, W) expansion (0 where broadcast)
    # and is read at any strides; pixel_ptr None without one.
    PIXEL_WEIGHTED: tl.constexpr = pixel_ptr is not None
    if PIXEL_WEIGHTED:
        pixel_plane = pixel_ptr + batch * pixel_batch_stride + joint * pixel_joint_stride
        pixel = tl.load(pixel_plane + rows * pixel_row_stride + cols * pixel_col_stride, mask=in_tile, other=0.0)
        pixel = pixel.to(ACC)
    else:
        pixel_plane = pred_plane

    # 2. The value term's D and the gradient term's maps at the tile's own pixels.
    diff = _difference(
        pred_plane, target_plane, target_rows_plane, target_cols_plane, teacher_plane, blend,
        pred_row_stride, pred_col_stride, target_row_stride, target_col_stride, teacher_row_stride, teacher_col_stride,
        offsets, rows, cols, in_tile, height, width, 0, 0, HAS_TEACHER, SEPARABLE, DENSE, ACC,
    )
    x_map = _gradient_map(
        pred_plane, target_plane, target_rows_plane, target_cols_plane, teacher_plane, blend,
        pred_row_stride, pred_col_stride, target_row_stride, target_col_stride, teacher_row_stride, teacher_col_stride,
        pixel_plane, pixel_row_stride, pixel_col_stride,
        offsets, rows, cols, in_tile, height, width, 0, 0, SCALE, X_DIFFERENCES, X_MARGINS,
        HAS_TEACHER, SEPARABLE, DENSE, False, ACC,
    )
    y_map = _gradient_map(
        pred_plane, target_plane, target_rows_plane, target_cols_plane, teacher_plane, blend,
        pred_row_stride, pred_col_stride, target_row_stride, target_col_stride, teacher_row_stride, teacher_col_stride,
        pixel_plane, pixel_row_stride, pixel_col_stride,
        offsets, rows, cols, in_tile, height, width, 0, 0, SCALE, Y_DIFFERENCES, Y_MARGINS,
        HAS_TEACHER, SEPARABLE, DENSE, False, ACC,
    )

    # 3. dL/dD for an upstream gradient of 1:
    #    2 c w (mse_weight / (H W) D + grad_weight / (Nx + Ny) (Ax^T Ax D + Ay^T Ay D)),
    #    c = 1/(B K) for the mean, w the plane's weight; with a pixel weight M,
    #    2 c w (mse_weight / (H W) M D + grad_weight / (Nx + Ny) (Ax^T M Ax D + Ay^T M Ay D)).
    value_diff = diff
    map_squares = x_map * x_map + y_map * y_map
    if PIXEL_WEIGHTED:
        value_diff = pixel * diff
        map_squares = pixel * map_squares
    if COMPUTE_GRAD:
        scale = tl.full([PLANES, 1], 2.0, ACC)
        if HAS_WEIGHT:
            weight_at = weight_ptr + batch * weight_batch_stride + joint * weight_joint_stride
            scale = scale * tl.load(weight_at, mask=plane_present, other=0.0).to(ACC)
        if MEAN:
            scale = scale / tl.cast(plane_count, ACC)
        value_coefficient = scale * _exact_float(mse_weight_bits, ACC) / tl.cast(plane_size, ACC)
        gradient_coefficient = scale * _exact_float(grad_weight_bits, ACC) / tl.cast(gradient_count, ACC)
        x_adjoint = _adjoint_of_map(
            pred_plane, target_plane, target_rows_plane, target_cols_plane, teacher_plane, blend,
            pred_row_stride, pred_col_stride, target_row_stride, target_col_stride, teacher_row_stride, teacher_col_stride,
            pixel_plane, pixel_row_stride, pixel_col_stride,
            offsets, rows, cols, in_tile, height, width, SCALE, X_DIFFERENCES, X_MARGINS,
            HAS_TEACHER, SEPARABLE, DENSE, PIXEL_WEIGHTED, ACC,
        )
        y_adjoint = _adjoint_of_map(
            pred_plane, target_plane, target_rows_plane, target_cols_plane, teacher_plane, blend,
            pred_row_stride, pred_col_stride, target_row_stride, target_col_stride, teacher_row_stride, teacher_col_stride,
            pixel_plane, pixel_row_stride, pixel_col_stride,
            offsets, rows, cols, in_tile, height, width, SCALE, Y_DIFFERENCES, Y_MARGINS,
            HAS_TEACHER, SEPARABLE, DENSE, PIXEL_WEIGHTED, ACC,
        )
        grad = value_coefficient * value_diff + gradient_coefficient * (x_adjoint + y_adjoint)
        grad_at = grad_ptr + planes.to(tl.int64) * plane_size + offsets
        tl.store(grad_at, grad.to(grad_ptr.dtype.element_ty), mask=in_tile)

    # 4. The tile's partial sums, stored last: the compiler cannot tell that a store leaves the
    #    inputs alone, so a load after one would not be merged with the same load before it.
    partial = partials_ptr + (plane_list.to(tl.int64) * tiles + tile_index) * 2
    tl.store(partial, tl.sum(value_diff * diff, axis=1), mask=plane_list < plane_count)
    tl.store(partial + 1, tl.sum(map_squares, axis=1), mask=plane_list < plane_count)


@triton.jit(do_not_specialize=["mse_weight_bits", "grad_weight_bits"])
def _finish_planes_kernel(
    partials_ptr, weight_ptr, terms_ptr, loss_ptr,
    plane_count, joints, tiles, value_count, gradient_count,
    weight_batch_stride, weight_joint_stride,
    mse_weight_bits, grad_weight_bits,
    REDUCE: tl.constexpr, MEAN: tl.constexpr, HAS_WEIGHT: tl.constexpr, PLANE_BLOCK: tl.constexpr,
):
    """One program: each plane's partials added in tile order into its terms
    mse_weight * V + grad_weight * R, then the weighted plane losses, or their sum (REDUCE) or
    mean (MEAN) added in plane order."""
    ACC = terms_ptr.dtype.element_ty
    mse_weight = _exact_float(mse_weight_bits, ACC)
    grad_weight = _exact_float(grad_weight_bits, ACC)
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
        terms = mse_weight * (value_sum / tl.cast(value_count, ACC)) + grad_weight * (
            gradient_sum / tl.cast(gradient_count, ACC)
        )
        tl.store(terms_ptr + planes, terms, mask=present)
        plane_loss = terms
        if HAS_WEIGHT:
            batch = (planes // joints).to(tl.int64)
            joint = (planes % joints).to(tl.int64)
            weight_at = weight_ptr + batch * weight_batch_stride + joint * weight_joint_stride
            plane_loss = terms * tl.load(weight_at, mask=present, other=0.0).to(ACC)
        if REDUCE:
            running += tl.where(present, plane_loss, 0.0)
        else:
            tl.store(loss_ptr + planes, plane_loss, mask=present)
    if REDUCE:
        total = tl.sum(running, axis=0)
        if MEAN:
            total = total / tl.cast(tl.maximum(plane_count, 1), ACC)
        tl.store(loss_ptr, total)


@triton.jit
def _scale_planes_kernel(grad_ptr, scale_ptr, plane_size, PER_PLANE: tl.constexpr, TILE: tl.constexpr):
    """grad *= scale for one tile of one plane; a plane whose factor is exactly 1 (every plane
    after `loss.backward()` on a mean or a sum) is skipped, decided on the device."""
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


@functools.cache
def stencil_constants(stencil: str) -> dict[str, tuple]:
    """The stencil table as the tile kernel's constexprs: the scale, each map's taps paired into
    weighted differences (weight, plus_row, plus_col, minus_row, minus_col) and the margins of its
    valid range."""
    constants = {"SCALE": stencils.scale(stencil)}
    for axis in stencils.AXES:
        constants[f"{axis.upper()}_DIFFERENCES"] = tuple(
            tuple(difference) for difference in stencils.differences(stencil, axis)
        )
        constants[f"{axis.upper()}_MARGINS"] = tuple(stencils.margins(stencil, axis))
    return constants


def float_bits(value: float) -> int:
    """The int64 bit pattern of value as a float64 (read back by _exact_float)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _strides(tensor: torch.Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if tensor is None else tuple(tensor.stride())


def _has_dense_planes(tensor: torch.Tensor | None) -> bool:
    if tensor is None:
        return True
    height, width = tensor.shape[2:]
    return (tensor.stride(3) == 1 or width == 1) and (tensor.stride(2) == width or height == 1)


def _needs_wide_offsets(tensors) -> bool:
    """Whether an in-plane offset, at any shift the stencils reach (two pixels), can pass int32."""
    for tensor in tensors:
        if tensor is None:
            continue
        height, width = tensor.shape[2:]
        reach = (height + 2) * abs(tensor.stride(2)) + (width + 2) * abs(tensor.stride(3))
        if max(reach, (height + 2) * (width + 2)) >= INT32_LIMIT:
            return True
    return False


def heatmap_loss(
    pred: torch.Tensor,
    target: torch.Tensor | None,
    teacher: torch.Tensor | None,
    alpha: torch.Tensor | None,
    weight: torch.Tensor | None,
    mse_weight: float,
    grad_weight: float,
    stencil: str,
    reduction: str,
    compute_grad: bool,
    target_rows: torch.Tensor | None = None,
    target_cols: torch.Tensor | None = None,
    pixel_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-plane terms, dL/dD or an empty tensor) computed by the Triton kernels: the body
    of hgloss::triton_heatmap_loss, so it checks its arguments as every operator does. The target
    is a tensor, or None with its separable factors target_rows (B, K, H) and target_cols
    (B, K, W) (hgloss.targets). pixel_weight M broadcasts to (B, K, H, W), at any strides."""
    check_operator_arguments(
        pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction, target_rows, target_cols,
        pixel_weight,
    )
    pixel = None if pixel_weight is None else pixel_weight.expand(pred.shape)
    batch, joints, height, width = pred.shape
    plane_count = batch * joints
    tile_pixels, tiles, planes_per_program, num_warps = launch_shape(height, width, stencil)
    weight_bits = (float_bits(mse_weight), float_bits(grad_weight))
    # With no gradient position the gradient sums are 0; dividing by 1 keeps R = 0.
    gradient_count = max(stencils.gradient_count(height, width, stencil), 1)

    loss, terms, grad = operator_outputs(pred, reduction, compute_grad)
    partials = pred.new_empty((plane_count, tiles, 2), dtype=accumulation_dtype(pred))
    weight_strides = (0, 0) if weight is None else weight.stride()[:2]  # (B, K[, 1[, 1]])

    if plane_count > 0:
        wrap_triton(_plane_tile_kernel)[(triton.cdiv(plane_count, planes_per_program), tiles)](
            pred, target, target_rows, target_cols, teacher, alpha, weight, pixel, partials, grad,
            joints, height, width, gradient_count, plane_count,
            *pred.stride(), *_strides(target), *_strides(teacher), *_strides(pixel),
            0 if alpha is None else alpha.stride(0), *weight_strides,
            *weight_bits,
            **stencil_constants(stencil),
            HAS_TEACHER=teacher is not None,
            HAS_WEIGHT=weight is not None,
            COMPUTE_GRAD=compute_grad,
            MEAN=reduction == "mean",
            DENSE=all(_has_dense_planes(tensor) for tensor in (pred, target, teacher)),
            WIDE=_needs_wide_offsets((pred, target, teacher, pixel)),
            PLANES=planes_per_program,
            TILE=tile_pixels,
            num_warps=num_warps,
        )
    wrap_triton(_finish_planes_kernel)[(1,)](
        partials, weight, terms, loss,
        plane_count, joints, tiles, height * width, gradient_count,
        *weight_strides,
        *weight_bits,
        REDUCE=reduction != "none",
        MEAN=reduction == "mean",
        HAS_WEIGHT=weight is not None,
        PLANE_BLOCK=PLANE_BLOCK,
    )
    return loss, terms, grad


def scale_gradient_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale in place, per plane when scale holds B*K values, skipping factors that are
    exactly 1."""
    batch, joints, height, width = grad.shape
    if batch * joints == 0:
        return
    factors = scale.to(torch.float64 if grad.dtype == torch.float64 else torch.float32).contiguous()
    _scale_planes_kernel[(batch * joints, triton.cdiv(height * width, SCALE_TILE))](
        grad, factors, height * width,
        PER_PLANE=factors.numel() != 1,
        TILE=SCALE_TILE,
    )
