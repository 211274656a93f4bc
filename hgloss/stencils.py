"""The finite-difference stencils of the gradient term, as one table (docs/spec.md, section 1).

A stencil is a scale s and the taps of its x map: ``Ax[i, j] = s * sum of n * D[i + u, j + v]``
over its taps ``(u, v, n)``, u along rows, v along columns and n a small integer weight, so the
coefficient of a tap is c = s * n. The y map is the x map with rows and columns swapped. A map is
defined only where all its taps fall inside the plane, which makes its valid range, and so
Nx + Ny, a consequence of the taps. (Integer weights and one scale let the kernels add and
subtract, then multiply once, as the formulas are written.)

The adjoint A^T, which the backward needs, is the same table read backwards: A scatters each
A[p] back onto p + (u, v) with coefficient c, so ``(A^T Y)[q] = sum of c * Y[q - (u, v)]`` over
the valid positions q - (u, v).

This table drives the reference backend, the Triton kernels and the benchmarks' eager loss.
The C++ and CUDA kernels read the same coefficients from csrc/include/hgloss/stencil.h;
tests/test_stencils.py compiles that header and checks that both give the same taps, ranges and
adjoints.
"""

from typing import NamedTuple


class Tap(NamedTuple):
    """D[i + row, j + col] enters the map at (i, j) with coefficient scale * weight."""

    row: int
    col: int
    weight: int


class Margins(NamedTuple):
    """The valid range of a map on an H x W plane: rows [top, H - bottom), columns [left, W - right)."""

    top: int
    bottom: int
    left: int
    right: int


X_TAPS: dict[str, tuple[Tap, ...]] = {
    # D[i, j+1] - D[i, j]
    "forward": (Tap(0, 0, -1), Tap(0, 1, 1)),
    # (D[i, j+1] - D[i, j-1]) / 2
    "central": (Tap(0, -1, -1), Tap(0, 1, 1)),
    # (1/8) sum over u, v in {-1, 0, 1} of v * (2 - |u|) * D[i+u, j+v]: differences along the
    # row, smoothed 1-2-1 across it.
    "sobel": tuple(Tap(u, v, v * (2 - abs(u))) for u in (-1, 0, 1) for v in (-1, 1)),
}
SCALES: dict[str, float] = {"forward": 1.0, "central": 0.5, "sobel": 0.125}

STENCILS: tuple[str, ...] = tuple(X_TAPS)
AXES = ("x", "y")


def check_stencil(stencil: str) -> None:
    if stencil not in X_TAPS:
        raise ValueError(f"unknown stencil {stencil!r}; expected one of {list(STENCILS)}")


def taps(stencil: str, axis: str) -> tuple[Tap, ...]:
    """The taps of the stencil's x or y map."""
    check_stencil(stencil)
    if axis == "x":
        return X_TAPS[stencil]
    if axis == "y":
        return tuple(Tap(tap.col, tap.row, tap.weight) for tap in X_TAPS[stencil])
    raise ValueError(f"unknown axis {axis!r}; expected 'x' or 'y'")


def scale(stencil: str) -> float:
    """The factor s of every coefficient of the stencil's maps."""
    check_stencil(stencil)
    return SCALES[stencil]


def coefficients(stencil: str, axis: str) -> dict[tuple[int, int], float]:
    """{(row, col): coefficient} of the x or y map's taps."""
    return {(tap.row, tap.col): SCALES[stencil] * tap.weight for tap in taps(stencil, axis)}


class Difference(NamedTuple):
    """weight * (D[i + plus_row, j + plus_col] - D[i + minus_row, j + minus_col])."""

    weight: int
    plus_row: int
    plus_col: int
    minus_row: int
    minus_col: int


def differences(stencil: str, axis: str) -> tuple[Difference, ...]:
    """The map's taps paired into weighted differences, each positive tap with the next negative
    one of the same size: every stencil here is a weighted sum of differences (a constant plane
    has no gradient). Kernels evaluate them in this form, as the formulas are written."""
    positive = [tap for tap in taps(stencil, axis) if tap.weight > 0]
    negative = [tap for tap in taps(stencil, axis) if tap.weight < 0]
    pairs = []
    for plus in positive:
        minus = next(tap for tap in negative if tap.weight == -plus.weight)
        negative.remove(minus)
        pairs.append(Difference(plus.weight, plus.row, plus.col, minus.row, minus.col))
    return tuple(pairs)


def margins(stencil: str, axis: str) -> Margins:
    """How far the map's valid range stays from each edge: as far as its taps reach out."""
    stencil_taps = taps(stencil, axis)
    return Margins(
        top=max(0, -min(tap.row for tap in stencil_taps)),
        bottom=max(0, max(tap.row for tap in stencil_taps)),
        left=max(0, -min(tap.col for tap in stencil_taps)),
        right=max(0, max(tap.col for tap in stencil_taps)),
    )


def valid_shape(height: int, width: int, stencil: str, axis: str) -> tuple[int, int]:
    """(rows, columns) of the map's valid range on an H x W plane; (0, 0) when it is empty."""
    top, bottom, left, right = margins(stencil, axis)
    rows, cols = height - top - bottom, width - left - right
    return (rows, cols) if rows > 0 and cols > 0 else (0, 0)


def gradient_count(height: int, width: int, stencil: str) -> int:
    """Nx + Ny, the denominator of the gradient term R (0 when neither map has a position)."""
    total = 0
    for axis in AXES:
        rows, cols = valid_shape(height, width, stencil, axis)
        total += rows * cols
    return total
