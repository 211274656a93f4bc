"""The stencil table of hgloss/stencils.py against csrc/include/hgloss/stencil.h, which the C++ and
CUDA kernels use: the same taps, valid ranges, gradient counts and adjoints (docs/spec.md
section 1). The header is compiled here into a small program that prints them."""

import shutil
import subprocess

import pytest

from hgloss import stencils

from conftest import ROOT

SIZES = [(1, 1), (1, 9), (9, 1), (2, 2), (3, 3), (5, 6), (64, 48)]


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory):
    """The lines tests/cpp/dump_stencil.cpp prints, split into fields."""
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH to compile stencil.h")
    program = tmp_path_factory.mktemp("stencil") / "dump_stencil"
    subprocess.run(
        [compiler, "-std=c++17", "-O1", f"-I{ROOT}/csrc/include", f"{ROOT}/tests/cpp/dump_stencil.cpp", "-o", str(program)],
        check=True,
        capture_output=True,
    )
    output = subprocess.run([str(program)], check=True, capture_output=True, text=True).stdout
    return [line.split() for line in output.splitlines()]


@pytest.mark.parametrize("stencil", stencils.STENCILS)
@pytest.mark.parametrize("axis", stencils.AXES)
def test_taps_equal_the_header(header_facts, stencil, axis):
    header = {(int(u), int(v)): float(c) for kind, name, ax, u, v, c in (f for f in header_facts if f[0] == "tap")
              if name == stencil and ax == axis}
    assert stencils.coefficients(stencil, axis) == header


@pytest.mark.parametrize("stencil", stencils.STENCILS)
@pytest.mark.parametrize("axis", stencils.AXES)
def test_valid_ranges_equal_the_header(header_facts, stencil, axis):
    header = {
        (int(h), int(w)): tuple(int(x) for x in bounds)
        for _, name, ax, h, w, *bounds in (f for f in header_facts if f[0] == "range")
        if name == stencil and ax == axis
    }
    assert set(header) == set(SIZES)
    for height, width in SIZES:
        top, bottom, left, right = stencils.margins(stencil, axis)
        rows, cols = height - top - bottom, width - left - right
        expected = (top if rows > 0 else 0, height - bottom if rows > 0 else 0,
                    left if cols > 0 else 0, width - right if cols > 0 else 0)
        assert header[(height, width)] == expected, (height, width)


@pytest.mark.parametrize("stencil", stencils.STENCILS)
def test_gradient_counts_equal_the_header(header_facts, stencil):
    header = {(int(h), int(w)): int(n) for _, name, h, w, n in (f for f in header_facts if f[0] == "count") if name == stencil}
    assert header == {(h, w): stencils.gradient_count(h, w, stencil) for h, w in SIZES}


@pytest.mark.parametrize("stencil", stencils.STENCILS)
@pytest.mark.parametrize("axis", stencils.AXES)
def test_adjoints_equal_the_table_read_backwards(header_facts, stencil, axis):
    """(A^T e_p)[q] = coefficient of the tap q - p, for every valid p of a 5 x 6 plane."""
    header = {
        tuple(int(x) for x in fields[5:9]): float(fields[9])
        for fields in header_facts
        if fields[0] == "adjoint" and fields[1] == stencil and fields[2] == axis
    }
    height, width = 5, 6
    top, bottom, left, right = stencils.margins(stencil, axis)
    expected = {}
    for pi in range(top, height - bottom):
        for pj in range(left, width - right):
            for (u, v), coefficient in stencils.coefficients(stencil, axis).items():
                expected[(pi, pj, pi + u, pj + v)] = coefficient
    assert header == expected


@pytest.mark.parametrize("stencil", stencils.STENCILS)
@pytest.mark.parametrize("axis", stencils.AXES)
def test_differences_are_the_taps_paired(stencil, axis):
    """The kernels' form (weighted differences) holds exactly the table's taps."""
    rebuilt = {}
    for difference in stencils.differences(stencil, axis):
        rebuilt[(difference.plus_row, difference.plus_col)] = difference.weight
        rebuilt[(difference.minus_row, difference.minus_col)] = -difference.weight
    assert rebuilt == {(tap.row, tap.col): tap.weight for tap in stencils.taps(stencil, axis)}


def test_y_map_is_the_x_map_transposed():
    for stencil in stencils.STENCILS:
        x = stencils.coefficients(stencil, "x")
        assert stencils.coefficients(stencil, "y") == {(v, u): c for (u, v), c in x.items()}


def test_unknown_stencil_is_refused():
    with pytest.raises(ValueError, match="unknown stencil 'scharr'"):
        stencils.taps("scharr", "x")
