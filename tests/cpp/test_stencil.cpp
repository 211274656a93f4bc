// Unit tests of csrc/include/hgloss/stencil.h against the formulas of docs/spec.md section 1.
//
// Expected values are written out from the spec formulas in this file, never derived from the
// header, so a wrong tap or range in the header cannot also make its own test pass. No framework:
// every check prints "PASS|FAIL <name>", the last line is "N passed, M failed", and the exit
// status is non-zero on any failure.
#include "hgloss/stencil.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace {

using hgloss::Stencil;
using hgloss::ValidRange;

int passed = 0;
int failed = 0;

void check(bool ok, const std::string& name) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", name.c_str());
  (ok ? passed : failed) += 1;
}

void check_near(double actual, double expected, double tolerance, const std::string& name) {
  const bool ok = std::fabs(actual - expected) <= tolerance;
  if (!ok) std::printf("  got %.17g, expected %.17g\n", actual, expected);
  check(ok, name);
}

struct Size {
  long long height, width;
};

const Size kSizes[] = {{1, 1}, {1, 5}, {5, 1}, {2, 2}, {3, 3}, {7, 5}, {16, 12}, {2, 7}};

std::string size_name(Size s) { return std::to_string(s.height) + "x" + std::to_string(s.width); }

// A row-major H x W array. Reads through operator() are bounds-checked against `readable` and
// an out-of-bounds read is recorded instead of being undefined behaviour, so the tests can assert
// that apply_at stays inside the plane and adjoint_at reads Y only on its valid range.
struct Grid {
  long long height, width;
  std::vector<double> values;
  ValidRange readable;
  mutable bool read_outside = false;

  Grid(long long h, long long w)
      : height(h), width(w), values(static_cast<size_t>(h * w), 0.0), readable{0, h, 0, w} {}

  double& at(long long r, long long c) { return values[static_cast<size_t>(r * width + c)]; }
  double at(long long r, long long c) const { return values[static_cast<size_t>(r * width + c)]; }

  double operator()(long long r, long long c) const {
    if (!readable.contains(r, c)) {
      read_outside = true;
      return 0.0;
    }
    return at(r, c);
  }
};

const char* stencil_name(Stencil s) {
  switch (s) {
    case Stencil::Forward: return "forward";
    case Stencil::Central: return "central";
    case Stencil::Sobel: return "sobel";
  }
  return "?";
}

// The x taps of docs/spec.md section 1, written independently of the header. Ay is Ax transposed for
// every stencil, so the y tap at (u, v) is expected_x_tap(v, u).
double expected_x_tap(Stencil s, int u, int v) {
  switch (s) {
    case Stencil::Forward:  // D[i, j+1] - D[i, j]
      return u == 0 && v == 1 ? 1.0 : (u == 0 && v == 0 ? -1.0 : 0.0);
    case Stencil::Central:  // (D[i, j+1] - D[i, j-1]) / 2
      return u == 0 && v == 1 ? 0.5 : (u == 0 && v == -1 ? -0.5 : 0.0);
    case Stencil::Sobel:  // (1/8) v (2 - |u|)
      return v * (2 - std::abs(u)) / 8.0;
  }
  return 0.0;
}

// Where docs/spec.md section 1 defines Ax; Ay's range is this with rows and columns swapped.
bool expected_in_x_range(Stencil s, long long h, long long w, long long i, long long j) {
  switch (s) {
    case Stencil::Forward: return i >= 0 && i < h && j >= 0 && j < w - 1;
    case Stencil::Central: return i >= 0 && i < h && j >= 1 && j < w - 1;
    case Stencil::Sobel: return i >= 1 && i < h - 1 && j >= 1 && j < w - 1;
  }
  return false;
}

long long expected_x_count(Stencil s, long long h, long long w) {
  const auto clamp0 = [](long long n) { return std::max(n, 0LL); };
  switch (s) {
    case Stencil::Forward: return h * clamp0(w - 1);
    case Stencil::Central: return h * clamp0(w - 2);
    case Stencil::Sobel: return clamp0(h - 2) * clamp0(w - 2);
  }
  return -1;
}

template <Stencil S>
void test_taps() {
  const std::string prefix = std::string("taps ") + stencil_name(S);
  bool x_ok = true, y_ok = true;
  double x_sum = 0.0, y_sum = 0.0;
  for (int u = -1; u <= 1; ++u) {
    for (int v = -1; v <= 1; ++v) {
      x_ok = x_ok && hgloss::x_tap<S>(u, v) == expected_x_tap(S, u, v);
      y_ok = y_ok && hgloss::y_tap<S>(u, v) == expected_x_tap(S, v, u);
      x_sum += hgloss::x_tap<S>(u, v);
      y_sum += hgloss::y_tap<S>(u, v);
    }
  }
  check(x_ok, prefix + " x_tap table matches spec");
  check(y_ok, prefix + " y_tap table matches spec");
  // Zero sum means a constant plane has zero gradient; the taps are dyadic, so the sum is exact.
  check(x_sum == 0.0, prefix + " x_tap sums to 0");
  check(y_sum == 0.0, prefix + " y_tap sums to 0");
}

// Individual coefficients quoted in the spec, as literals.
void test_tap_spot_values() {
  using hgloss::x_tap;
  using hgloss::y_tap;
  check(x_tap<Stencil::Forward>(0, 1) == 1.0 && x_tap<Stencil::Forward>(0, 0) == -1.0 &&
            x_tap<Stencil::Forward>(0, -1) == 0.0,
        "taps forward x spot values");
  check(y_tap<Stencil::Forward>(1, 0) == 1.0 && y_tap<Stencil::Forward>(0, 0) == -1.0 &&
            y_tap<Stencil::Forward>(0, 1) == 0.0,
        "taps forward y spot values");
  check(x_tap<Stencil::Central>(0, -1) == -0.5 && x_tap<Stencil::Central>(0, 1) == 0.5 &&
            x_tap<Stencil::Central>(0, 0) == 0.0 && x_tap<Stencil::Central>(1, 1) == 0.0,
        "taps central x spot values");
  check(y_tap<Stencil::Central>(-1, 0) == -0.5 && y_tap<Stencil::Central>(1, 0) == 0.5 &&
            y_tap<Stencil::Central>(0, 1) == 0.0,
        "taps central y spot values");
  check(x_tap<Stencil::Sobel>(0, 1) == 2.0 / 8 && x_tap<Stencil::Sobel>(-1, 1) == 1.0 / 8 &&
            x_tap<Stencil::Sobel>(1, -1) == -1.0 / 8 && x_tap<Stencil::Sobel>(0, -1) == -2.0 / 8 &&
            x_tap<Stencil::Sobel>(1, 0) == 0.0,
        "taps sobel x spot values");
  check(y_tap<Stencil::Sobel>(1, 0) == 2.0 / 8 && y_tap<Stencil::Sobel>(1, -1) == 1.0 / 8 &&
            y_tap<Stencil::Sobel>(-1, 1) == -1.0 / 8 && y_tap<Stencil::Sobel>(0, 1) == 0.0,
        "taps sobel y spot values");
}

template <Stencil S>
void test_ranges(Size size) {
  const long long h = size.height, w = size.width;
  const std::string prefix = std::string("range ") + stencil_name(S) + " " + size_name(size);
  const ValidRange xr = hgloss::x_range<S>(h, w);
  const ValidRange yr = hgloss::y_range<S>(h, w);
  // Probe a margin around the plane too: a range reaching outside it would read out of bounds.
  bool x_ok = true, y_ok = true;
  for (long long i = -2; i < h + 2; ++i) {
    for (long long j = -2; j < w + 2; ++j) {
      x_ok = x_ok && xr.contains(i, j) == expected_in_x_range(S, h, w, i, j);
      y_ok = y_ok && yr.contains(i, j) == expected_in_x_range(S, w, h, j, i);
    }
  }
  check(x_ok, prefix + " x_range membership");
  check(y_ok, prefix + " y_range membership");
  const long long nx = expected_x_count(S, h, w), ny = expected_x_count(S, w, h);
  check(xr.count() == nx, prefix + " Nx == " + std::to_string(nx));
  check(yr.count() == ny, prefix + " Ny == " + std::to_string(ny));
  check(hgloss::gradient_count<S>(h, w) == nx + ny,
        prefix + " gradient_count == " + std::to_string(nx + ny));
}

// Counts quoted as literals, so a mistake shared by expected_x_count and the header still fails.
void test_count_spot_values() {
  using hgloss::gradient_count;
  using hgloss::x_range;
  using hgloss::y_range;
  check(x_range<Stencil::Forward>(7, 5).count() == 28 && y_range<Stencil::Forward>(7, 5).count() == 30,
        "count forward 7x5 Nx=28 Ny=30");
  check(x_range<Stencil::Central>(7, 5).count() == 21 && y_range<Stencil::Central>(7, 5).count() == 25,
        "count central 7x5 Nx=21 Ny=25");
  check(x_range<Stencil::Sobel>(7, 5).count() == 15 && y_range<Stencil::Sobel>(7, 5).count() == 15,
        "count sobel 7x5 Nx=15 Ny=15");
  check(gradient_count<Stencil::Sobel>(2, 2) == 0, "count sobel 2x2 == 0");
  check(gradient_count<Stencil::Forward>(1, 1) == 0, "count forward 1x1 == 0");
  check(gradient_count<Stencil::Forward>(1, 5) == 4, "count forward 1x5 == 4");
  check(gradient_count<Stencil::Central>(5, 1) == 3, "count central 5x1 == 3");
  check(gradient_count<Stencil::Sobel>(16, 12) == 280, "count sobel 16x12 == 280");
}

// <A D, Y> over the valid range against <D, A^T Y> over the whole plane, for random D and Y.
template <Stencil S, bool IsX>
void test_adjoint(Size size, std::mt19937_64& rng) {
  const long long h = size.height, w = size.width;
  const std::string name = std::string("adjoint ") + stencil_name(S) + (IsX ? " x " : " y ") +
                           size_name(size);
  const ValidRange range = IsX ? hgloss::x_range<S>(h, w) : hgloss::y_range<S>(h, w);
  // Y is stored on the plane's grid, so a range reaching outside it would corrupt memory below;
  // test_ranges reports which bound is wrong.
  const bool inside = range.count() == 0 || (range.row_begin >= 0 && range.row_end <= h &&
                                             range.col_begin >= 0 && range.col_end <= w);
  check(inside, name + " valid range lies inside the plane");
  if (!inside) return;

  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  Grid d(h, w), y(h, w);
  for (double& value : d.values) value = uniform(rng);
  y.readable = range;
  for (long long i = range.row_begin; i < range.row_end; ++i)
    for (long long j = range.col_begin; j < range.col_end; ++j) y.at(i, j) = uniform(rng);

  // The tolerance is relative to the sum of |terms| rather than the result, which may cancel.
  double lhs = 0.0, rhs = 0.0, scale = 0.0;
  for (long long i = range.row_begin; i < range.row_end; ++i) {
    for (long long j = range.col_begin; j < range.col_end; ++j) {
      const double term = hgloss::apply_at<S, IsX, double>(d, i, j) * y.at(i, j);
      lhs += term;
      scale += std::fabs(term);
    }
  }
  for (long long i = 0; i < h; ++i) {
    for (long long j = 0; j < w; ++j) {
      const double term = d.at(i, j) * hgloss::adjoint_at<S, IsX, double>(y, range, i, j);
      rhs += term;
      scale += std::fabs(term);
    }
  }
  check_near(lhs, rhs, 1e-12 * scale, name + " <AD,Y> == <D,A^T Y>");
  check(!d.read_outside, name + " apply_at reads only inside the plane");
  check(!y.read_outside, name + " adjoint_at reads Y only on its valid range");
}

template <Stencil S>
void run_generic_tests(std::mt19937_64& rng) {
  test_taps<S>();
  for (const Size size : kSizes) {
    test_ranges<S>(size);
    test_adjoint<S, true>(size, rng);
    test_adjoint<S, false>(size, rng);
  }
}

// Compares Ax (or Ay) over the whole valid range against `expected`, one inner vector per row of
// the range, written as literals computed by hand.
template <Stencil S, bool IsX>
void check_hand_values(const Grid& d, const std::vector<std::vector<double>>& expected,
                       const std::string& name) {
  const ValidRange range =
      IsX ? hgloss::x_range<S>(d.height, d.width) : hgloss::y_range<S>(d.height, d.width);
  bool ok = range.rows() == static_cast<long long>(expected.size());
  for (long long r = 0; ok && r < range.rows(); ++r) {
    const std::vector<double>& row = expected[static_cast<size_t>(r)];
    ok = range.cols() == static_cast<long long>(row.size());
    for (long long c = 0; ok && c < range.cols(); ++c) {
      const double actual =
          hgloss::apply_at<S, IsX, double>(d, range.row_begin + r, range.col_begin + c);
      // Every input and coefficient is dyadic, so the result is exact.
      ok = actual == row[static_cast<size_t>(c)];
      if (!ok) std::printf("  at (%lld, %lld): got %.17g, expected %.17g\n", range.row_begin + r,
                           range.col_begin + c, actual, row[static_cast<size_t>(c)]);
    }
  }
  check(ok, "values " + name);
}

void test_hand_values() {
  // D[i, j] = 2^(3i + j): every weighted sum of its entries is distinct, so a wrong weight or a
  // swapped row/column offset changes the result.
  //    1    2    4
  //    8   16   32
  //   64  128  256
  Grid p(3, 3);
  for (long long i = 0; i < 3; ++i)
    for (long long j = 0; j < 3; ++j) p.at(i, j) = std::ldexp(1.0, static_cast<int>(3 * i + j));

  check_hand_values<Stencil::Forward, true>(p, {{1, 2}, {8, 16}, {64, 128}}, "forward x 3x3 powers of 2");
  check_hand_values<Stencil::Forward, false>(p, {{7, 14, 28}, {56, 112, 224}}, "forward y 3x3 powers of 2");
  check_hand_values<Stencil::Central, true>(p, {{1.5}, {12}, {96}}, "central x 3x3 powers of 2");
  check_hand_values<Stencil::Central, false>(p, {{31.5, 63, 126}}, "central y 3x3 powers of 2");
  // (1/8) [(4-1) + 2 (32-8) + (256-64)] = 243/8 and (1/8) [(64-1) + 2 (128-2) + (256-4)] = 567/8.
  check_hand_values<Stencil::Sobel, true>(p, {{30.375}}, "sobel x 3x3 powers of 2");
  check_hand_values<Stencil::Sobel, false>(p, {{70.875}}, "sobel y 3x3 powers of 2");

  // D[i, j] = i*i + 3j on 4x5: the x difference of every stencil is 3; the y differences are
  // (i+1)^2 - i^2 = 2i + 1 (forward) and ((i+1)^2 - (i-1)^2) / 2 = 2i (central, sobel).
  Grid q(4, 5);
  for (long long i = 0; i < 4; ++i)
    for (long long j = 0; j < 5; ++j) q.at(i, j) = static_cast<double>(i * i + 3 * j);

  check_hand_values<Stencil::Forward, true>(
      q, {{3, 3, 3, 3}, {3, 3, 3, 3}, {3, 3, 3, 3}, {3, 3, 3, 3}}, "forward x 4x5 i*i+3j");
  check_hand_values<Stencil::Forward, false>(
      q, {{1, 1, 1, 1, 1}, {3, 3, 3, 3, 3}, {5, 5, 5, 5, 5}}, "forward y 4x5 i*i+3j");
  check_hand_values<Stencil::Central, true>(
      q, {{3, 3, 3}, {3, 3, 3}, {3, 3, 3}, {3, 3, 3}}, "central x 4x5 i*i+3j");
  check_hand_values<Stencil::Central, false>(q, {{2, 2, 2, 2, 2}, {4, 4, 4, 4, 4}},
                                             "central y 4x5 i*i+3j");
  check_hand_values<Stencil::Sobel, true>(q, {{3, 3, 3}, {3, 3, 3}}, "sobel x 4x5 i*i+3j");
  check_hand_values<Stencil::Sobel, false>(q, {{2, 2, 2}, {4, 4, 4}}, "sobel y 4x5 i*i+3j");
}

}  // namespace

int main() {
  std::mt19937_64 rng(20240611);  // fixed seed: failures must reproduce
  test_tap_spot_values();
  test_count_spot_values();
  test_hand_values();
  run_generic_tests<Stencil::Forward>(rng);
  run_generic_tests<Stencil::Central>(rng);
  run_generic_tests<Stencil::Sobel>(rng);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
