// Prints what csrc/include/hgloss/stencil.h defines, one fact a line, for tests/test_stencils.py
// to compare with the table of hgloss/stencils.py:
//   tap STENCIL AXIS u v coefficient          every nonzero tap
//   range STENCIL AXIS H W row_begin row_end col_begin col_end
//   count STENCIL H W gradient_count
//   adjoint STENCIL AXIS H W pi pj qi qj value  (A^T e_p)[q] for a unit map at a valid p, nonzero only
#include <cstdio>

#include "hgloss/stencil.h"

using hgloss::Stencil;

namespace {

const long long kSizes[][2] = {{1, 1}, {1, 9}, {9, 1}, {2, 2}, {3, 3}, {5, 6}, {64, 48}};

template <Stencil S, bool IsX>
void dump_axis(const char* name) {
  const char axis = IsX ? 'x' : 'y';
  for (int u = -1; u <= 1; ++u) {
    for (int v = -1; v <= 1; ++v) {
      const double tap = IsX ? hgloss::x_tap<S>(u, v) : hgloss::y_tap<S>(u, v);
      if (tap != 0.0) std::printf("tap %s %c %d %d %.17g\n", name, axis, u, v, tap);
    }
  }
  for (const auto& size : kSizes) {
    const long long height = size[0], width = size[1];
    const hgloss::ValidRange range = IsX ? hgloss::x_range<S>(height, width) : hgloss::y_range<S>(height, width);
    std::printf("range %s %c %lld %lld %lld %lld %lld %lld\n", name, axis, height, width, range.rows() ? range.row_begin : 0,
                range.rows() ? range.row_end : 0, range.cols() ? range.col_begin : 0, range.cols() ? range.col_end : 0);
  }
  // The adjoint on a 5 x 6 plane, applied to each unit map e_p.
  const long long height = 5, width = 6;
  const hgloss::ValidRange range = IsX ? hgloss::x_range<S>(height, width) : hgloss::y_range<S>(height, width);
  for (long long pi = range.row_begin; pi < range.row_end; ++pi) {
    for (long long pj = range.col_begin; pj < range.col_end; ++pj) {
      const auto unit = [&](long long r, long long c) { return r == pi && c == pj ? 1.0 : 0.0; };
      for (long long qi = 0; qi < height; ++qi) {
        for (long long qj = 0; qj < width; ++qj) {
          const double value = hgloss::adjoint_at<S, IsX, double>(unit, range, qi, qj);
          if (value != 0.0) {
            std::printf("adjoint %s %c %lld %lld %lld %lld %lld %lld %.17g\n", name, axis, height, width, pi, pj, qi, qj,
                        value);
          }
        }
      }
    }
  }
}

template <Stencil S>
void dump(const char* name) {
  dump_axis<S, true>(name);
  dump_axis<S, false>(name);
  for (const auto& size : kSizes) {
    std::printf("count %s %lld %lld %lld\n", name, size[0], size[1], hgloss::gradient_count<S>(size[0], size[1]));
  }
}

}  // namespace

int main() {
  dump<Stencil::Forward>("forward");
  dump<Stencil::Central>("central");
  dump<Stencil::Sobel>("sobel");
  return 0;
}
