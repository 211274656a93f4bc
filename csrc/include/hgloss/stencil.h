// The finite-difference stencils of the heatmap gradient loss (docs/spec.md section 1) and their adjoints.
//
// Every stencil is a 3x3 operator: Ax[i, j] = sum_{u,v in {-1,0,1}} x_tap(u, v) * D[i+u, j+v],
// evaluated only at the positions of its valid range (the positions whose taps all fall inside
// the plane). Ay likewise with y_tap. The adjoint A^T scatters each Ax[i, j] back onto
// D[i+u, j+v] with the same coefficient, so (A^T Y)[p] = sum_{u,v} tap(u, v) * Y[p - (u, v)]
// over the valid positions p - (u, v).
//
// No torch and no STL: the CPU kernel, the CUDA kernels and the C++ unit tests include this same
// file, so every backend evaluates identical coefficients.
#pragma once

#if defined(__CUDACC__)
#define HGLOSS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HGLOSS_HOST_DEVICE inline
#endif

namespace hgloss {

enum class Stencil : int { Forward = 0, Central = 1, Sobel = 2 };

// Half-open rectangle [row_begin, row_end) x [col_begin, col_end) of valid positions.
struct ValidRange {
  long long row_begin, row_end, col_begin, col_end;

  HGLOSS_HOST_DEVICE long long rows() const { return row_end > row_begin ? row_end - row_begin : 0; }
  HGLOSS_HOST_DEVICE long long cols() const { return col_end > col_begin ? col_end - col_begin : 0; }
  HGLOSS_HOST_DEVICE long long count() const { return rows() * cols(); }
  HGLOSS_HOST_DEVICE bool contains(long long i, long long j) const {
    return i >= row_begin && i < row_end && j >= col_begin && j < col_end;
  }
};

// Coefficient of D[i+u, j+v] in Ax[i, j]; u is the row offset, v the column offset.
template <Stencil S>
HGLOSS_HOST_DEVICE constexpr double x_tap(int u, int v) {
  if (S == Stencil::Forward) {
    return u != 0 ? 0.0 : (v == 1 ? 1.0 : (v == 0 ? -1.0 : 0.0));
  } else if (S == Stencil::Central) {
    return u != 0 ? 0.0 : 0.5 * v;
  } else {
    return v * (2 - (u < 0 ? -u : u)) / 8.0;
  }
}

// Coefficient of D[i+u, j+v] in Ay[i, j]: every stencil is its x form with rows and columns swapped.
template <Stencil S>
HGLOSS_HOST_DEVICE constexpr double y_tap(int u, int v) {
  return x_tap<S>(v, u);
}

// Where Ax is defined on an H x W plane.
template <Stencil S>
HGLOSS_HOST_DEVICE ValidRange x_range(long long height, long long width) {
  if (S == Stencil::Forward) return {0, height, 0, width - 1};
  if (S == Stencil::Central) return {0, height, 1, width - 1};
  return {1, height - 1, 1, width - 1};
}

// Where Ay is defined: the transpose of x_range.
template <Stencil S>
HGLOSS_HOST_DEVICE ValidRange y_range(long long height, long long width) {
  const ValidRange r = x_range<S>(width, height);
  return {r.col_begin, r.col_end, r.row_begin, r.row_end};
}

// Nx + Ny, the denominator of the gradient term R.
template <Stencil S>
HGLOSS_HOST_DEVICE long long gradient_count(long long height, long long width) {
  return x_range<S>(height, width).count() + y_range<S>(height, width).count();
}

template <Stencil S, bool IsX, int U, int V, typename Visit>
HGLOSS_HOST_DEVICE void visit_tap(Visit& visit) {
  constexpr double tap = IsX ? x_tap<S>(U, V) : y_tap<S>(U, V);
  if constexpr (tap != 0.0) visit(U, V, tap);
}

// Calls visit(u, v, tap) for every nonzero tap of Ax (IsX) or Ay. Unrolled at compile time, so
// that after inlining every offset and coefficient is a constant.
template <Stencil S, bool IsX, typename Visit>
HGLOSS_HOST_DEVICE void for_each_tap(Visit&& visit) {
  visit_tap<S, IsX, -1, -1>(visit);
  visit_tap<S, IsX, -1, 0>(visit);
  visit_tap<S, IsX, -1, 1>(visit);
  visit_tap<S, IsX, 0, -1>(visit);
  visit_tap<S, IsX, 0, 0>(visit);
  visit_tap<S, IsX, 0, 1>(visit);
  visit_tap<S, IsX, 1, -1>(visit);
  visit_tap<S, IsX, 1, 0>(visit);
  visit_tap<S, IsX, 1, 1>(visit);
}

// Ax[i, j] (IsX) or Ay[i, j] at a valid position. `plane(r, c)` reads D[r, c].
template <Stencil S, bool IsX, typename T, typename Plane>
HGLOSS_HOST_DEVICE T apply_at(const Plane& plane, long long i, long long j) {
  T value = T(0);
  for_each_tap<S, IsX>([&](int u, int v, double tap) { value += T(tap) * plane(i + u, j + v); });
  return value;
}

// (A^T Y)[i, j] for Y defined on `range`. `map(r, c)` reads Y[r, c] at a valid position.
template <Stencil S, bool IsX, typename T, typename Map>
HGLOSS_HOST_DEVICE T adjoint_at(const Map& map, const ValidRange& range, long long i, long long j) {
  T value = T(0);
  for_each_tap<S, IsX>([&](int u, int v, double tap) {
    if (range.contains(i - u, j - v)) value += T(tap) * map(i - u, j - v);
  });
  return value;
}

}  // namespace hgloss
