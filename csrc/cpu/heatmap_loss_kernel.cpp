// CPU kernels of hgloss::heatmap_loss and hgloss::scale_gradient_.
//
// One thread owns one plane (b, k) at a time (at::parallel_for over the B*K planes) and stages it
// in a private scratch the size of one plane: pass 1 builds D = P - ((1 - a) G + a S) and sums
// D^2, pass 2 builds Ax and Ay, pass 3 sums their squares and gathers dL/dD through the adjoint.
// G is read from the target tensor, or evaluated from its separable factors (float32 of
// rows[i] * cols[j], hgloss/targets.py), in which case no target is read at all.
// At 64x48 the scratch (D, Ax and Ay, 38 KiB in float32) stays in L2, so per
// pixel the kernel reads P, G (and S) from memory once and writes dL/dD once; T, D and the
// gradient maps never reach a full-size tensor. A pixel weight M is staged in a fourth plane of
// the scratch, converted once from any dtype and strides (stride 0 where it is broadcast);
// weighing the sums and the maps is one more pass over the staged plane. Sums run in a fixed
// order inside each plane and the plane losses are added in index order, so results are
// bit-identical whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "../heatmap_loss.h"
#include "hgloss/stencil.h"

namespace hgloss {
namespace {

// A strided 4-D input, addressed in elements.
struct StridedInput {
  const void* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t stride_b = 0, stride_k = 0, stride_h = 0, stride_w = 0;

  static StridedInput of(const at::Tensor& t) {
    return {t.data_ptr(), t.scalar_type(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  }

  // Whether each H x W plane is one contiguous run of elements.
  bool plane_is_flat(int64_t height, int64_t width) const {
    return stride_w == 1 && (stride_h == width || height == 1);
  }
};

// out[i * W + j] (+)= scale * plane[i, j], converting from the input dtype. A plane stored
// contiguously is one long vectorisable loop; any other layout goes row by row.
template <typename acc_t, typename in_t>
void scaled_plane_typed(const in_t* plane, int64_t stride_h, int64_t stride_w, bool contiguous, int64_t height,
                        int64_t width, acc_t scale, bool accumulate, acc_t* out) {
  const int64_t rows = contiguous ? 1 : height;
  const int64_t cols = contiguous ? height * width : width;
  for (int64_t i = 0; i < rows; ++i) {
    const in_t* row = plane + i * stride_h;
    acc_t* dst = out + i * cols;
    if (contiguous) {
      if (accumulate) {
        for (int64_t j = 0; j < cols; ++j) dst[j] += scale * static_cast<acc_t>(row[j]);
      } else {
        for (int64_t j = 0; j < cols; ++j) dst[j] = scale * static_cast<acc_t>(row[j]);
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) {
        const acc_t value = scale * static_cast<acc_t>(row[j * stride_w]);
        dst[j] = accumulate ? dst[j] + value : value;
      }
    }
  }
}

template <typename acc_t>
void scaled_plane(const StridedInput& in, int64_t b, int64_t k, int64_t height, int64_t width,
                  acc_t scale, bool accumulate, acc_t* out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.dtype, "hgloss_load_plane", [&] {
    const scalar_t* plane = static_cast<const scalar_t*>(in.data) + b * in.stride_b + k * in.stride_k;
    scaled_plane_typed<acc_t, scalar_t>(plane, in.stride_h, in.stride_w, in.plane_is_flat(height, width), height,
                                        width, scale, accumulate, out);
  });
}

template <typename acc_t>
acc_t sum_of_squares(const acc_t* x, int64_t n) {
  acc_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) total += x[j] * x[j];
  return total;
}

template <typename acc_t>
struct PlaneProblem {
  StridedInput pred, target, teacher;  // target.data is null for a separable target
  StridedInput pixel_weight;           // (B, K, H, W) strides, 0 where broadcast; data null for none
  const double* target_rows = nullptr;  // (B*K, H) factors of a separable target, else null
  const double* target_cols = nullptr;  // (B*K, W)
  bool has_teacher = false;
  const acc_t* alpha = nullptr;  // (B,), only with a teacher
  int64_t num_joints = 0, height = 0, width = 0;
  acc_t mse_weight = 0, grad_weight = 0;
  const acc_t* weight = nullptr;  // (B*K,) target weights, or null for 1
  acc_t reduction_scale = 1;      // 1 / (B*K) for "mean", else 1
  acc_t* terms = nullptr;         // (B*K,) mse_weight * V + grad_weight * R
  acc_t* plane_losses = nullptr;  // (B*K,) weight * terms
  void* grad = nullptr;           // (B*K*H*W,) contiguous dL/dD, or null when not wanted
  at::ScalarType grad_dtype = at::kFloat;  // acc_t's dtype, or bfloat16 for a bfloat16 pred
};

// D = P - ((1 - a) G + a S) (D = P - G without a teacher) for inputs that share one dtype, in a
// single pass that also returns sum D^2. Planes that are all contiguous run as one flat loop,
// others row by row.
template <typename acc_t, typename in_t, bool HasTeacher>
acc_t load_difference_same_dtype(const PlaneProblem<acc_t>& p, int64_t b, int64_t k, acc_t alpha,
                                 acc_t* diff) {
  const int64_t H = p.height, W = p.width;
  auto plane_of = [&](const StridedInput& in) {
    return static_cast<const in_t*>(in.data) + b * in.stride_b + k * in.stride_k;
  };
  const in_t* pred = plane_of(p.pred);
  const in_t* target = plane_of(p.target);
  const in_t* teacher = HasTeacher ? plane_of(p.teacher) : nullptr;
  const acc_t target_scale = 1 - alpha;
  auto difference = [&](const in_t* pred_at, const in_t* target_at, const in_t* teacher_at) {
    if constexpr (HasTeacher) {
      return static_cast<acc_t>(*pred_at) -
             (target_scale * static_cast<acc_t>(*target_at) + alpha * static_cast<acc_t>(*teacher_at));
    } else {
      return static_cast<acc_t>(*pred_at) - static_cast<acc_t>(*target_at);
    }
  };
  acc_t sum_sq = 0;
  if (p.pred.plane_is_flat(H, W) && p.target.plane_is_flat(H, W) && (!HasTeacher || p.teacher.plane_is_flat(H, W))) {
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t n = 0; n < H * W; ++n) {
      const acc_t d = difference(pred + n, target + n, HasTeacher ? teacher + n : nullptr);
      diff[n] = d;
      sum_sq += d * d;
    }
    return sum_sq;
  }
  const int64_t sp = p.pred.stride_w, sg = p.target.stride_w, ss = HasTeacher ? p.teacher.stride_w : 0;
  for (int64_t i = 0; i < H; ++i) {
    const in_t* pred_row = pred + i * p.pred.stride_h;
    const in_t* target_row = target + i * p.target.stride_h;
    const in_t* teacher_row = HasTeacher ? teacher + i * p.teacher.stride_h : nullptr;
    for (int64_t j = 0; j < W; ++j) {
      const acc_t d = difference(pred_row + j * sp, target_row + j * sg, HasTeacher ? teacher_row + j * ss : nullptr);
      diff[i * W + j] = d;
      sum_sq += d * d;
    }
  }
  return sum_sq;
}

// G[i, j] of a separable target: the factors' product rounded to float32, as the codecs store it.
template <typename acc_t>
inline acc_t separable_target(double row_factor, double col_factor) {
  return static_cast<acc_t>(static_cast<float>(row_factor * col_factor));
}

// diff[i * W + j] += scale * G[i, j] for a separable target, in the order scaled_plane adds a
// float32 target tensor, so that both give the same bits.
template <typename acc_t>
void add_separable_target(const PlaneProblem<acc_t>& p, int64_t plane, acc_t scale, acc_t* diff) {
  const int64_t H = p.height, W = p.width;
  const double* rows = p.target_rows + plane * H;
  const double* cols = p.target_cols + plane * W;
  for (int64_t i = 0; i < H; ++i) {
    const double row_factor = rows[i];
    // A row outside the Gaussian's window adds scale * 0, which changes no value.
    if (row_factor == 0) continue;
    acc_t* dst = diff + i * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) dst[j] += scale * separable_target<acc_t>(row_factor, cols[j]);
  }
}

// D = P - ((1 - a) G + a S) (D = P - G without a teacher) for a separable G and a pred (and
// teacher) of one dtype, row by row; returns sum D^2, added over the flattened plane as the
// same-dtype path adds it for a contiguous target, so that both give the same bits. UnitStride:
// rows of pred (and teacher) are contiguous, which lets the compiler vectorise the loads.
template <typename acc_t, typename in_t, bool HasTeacher, bool UnitStride>
acc_t load_difference_separable(const PlaneProblem<acc_t>& p, int64_t b, int64_t k, acc_t alpha, acc_t* diff) {
  const int64_t H = p.height, W = p.width, plane = b * p.num_joints + k;
  const in_t* pred = static_cast<const in_t*>(p.pred.data) + b * p.pred.stride_b + k * p.pred.stride_k;
  const in_t* teacher =
      HasTeacher ? static_cast<const in_t*>(p.teacher.data) + b * p.teacher.stride_b + k * p.teacher.stride_k : nullptr;
  const double* rows = p.target_rows + plane * H;
  const double* cols = p.target_cols + plane * W;
  const acc_t target_scale = 1 - alpha;
  const int64_t sp = UnitStride ? 1 : p.pred.stride_w, ss = UnitStride || !HasTeacher ? 1 : p.teacher.stride_w;
  for (int64_t i = 0; i < H; ++i) {
    const in_t* pred_row = pred + i * p.pred.stride_h;
    const in_t* teacher_row = HasTeacher ? teacher + i * p.teacher.stride_h : nullptr;
    const double row_factor = rows[i];
    acc_t* dst = diff + i * W;
    if (row_factor == 0) {
      // Outside the Gaussian's window G = 0, and (1 - a) * 0 + a S = a S and P - 0 = P exactly,
      // so skipping the target here gives the bits of the full expression.
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) {
        if constexpr (HasTeacher) {
          dst[j] = static_cast<acc_t>(pred_row[j * sp]) - alpha * static_cast<acc_t>(teacher_row[j * ss]);
        } else {
          dst[j] = static_cast<acc_t>(pred_row[j * sp]);
        }
      }
      continue;
    }
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      const acc_t target = separable_target<acc_t>(row_factor, cols[j]);
      if constexpr (HasTeacher) {
        dst[j] = static_cast<acc_t>(pred_row[j * sp]) -
                 (target_scale * target + alpha * static_cast<acc_t>(teacher_row[j * ss]));
      } else {
        dst[j] = static_cast<acc_t>(pred_row[j * sp]) - target;
      }
    }
  }
  return sum_of_squares(diff, H * W);
}

template <typename acc_t, typename in_t, bool HasTeacher>
acc_t load_difference_separable(const PlaneProblem<acc_t>& p, int64_t b, int64_t k, acc_t alpha, acc_t* diff) {
  const bool unit_stride = p.pred.stride_w == 1 && (!HasTeacher || p.teacher.stride_w == 1);
  return unit_stride ? load_difference_separable<acc_t, in_t, HasTeacher, true>(p, b, k, alpha, diff)
                     : load_difference_separable<acc_t, in_t, HasTeacher, false>(p, b, k, alpha, diff);
}

// The same for inputs of different dtypes: one converting pass per input, then the sum.
template <typename acc_t>
acc_t load_difference_mixed(const PlaneProblem<acc_t>& p, int64_t b, int64_t k, acc_t alpha, acc_t* diff) {
  const int64_t H = p.height, W = p.width;
  scaled_plane<acc_t>(p.pred, b, k, H, W, acc_t(1), false, diff);
  if (p.target_rows != nullptr) {
    add_separable_target(p, b * p.num_joints + k, alpha - acc_t(1), diff);
  } else {
    scaled_plane<acc_t>(p.target, b, k, H, W, alpha - acc_t(1), true, diff);
  }
  if (p.has_teacher) scaled_plane<acc_t>(p.teacher, b, k, H, W, -alpha, true, diff);
  return sum_of_squares(diff, H * W);
}

// sum_{u,v} tap(u, v) * x[n + Sign * (u W + v)] over the nonzero taps. Sign = +1 applies the
// stencil, (A D)[n]; Sign = -1 gathers its adjoint, (A^T map)[n].
template <typename acc_t, Stencil S, bool IsX, int Sign>
inline acc_t sum_taps(const acc_t* x, int64_t n, int64_t width) {
  acc_t value = 0;
  for_each_tap<S, IsX>([&](int u, int v, double tap) {
    value += static_cast<acc_t>(tap) * x[n + Sign * (u * width + v)];
  });
  return value;
}

// One thread's staging area for a plane: D, Ax and Ay, each H*W values in row-major order with a
// zero guard of W+1 values on both sides, so that every 3x3 tap of every position reads inside
// the buffer and the loops run over the whole flattened plane without branches; and, with a
// pixel weight, M (no guard: it is read at the pixel itself only).
template <typename acc_t>
struct PlaneScratch {
  PlaneScratch(int64_t height, int64_t width, bool pixel_weighted)
      : size(height * width),
        guard(width + 1),
        storage(3 * static_cast<size_t>(size + 2 * guard) + (pixel_weighted ? size : 0), acc_t(0)) {
    const int64_t pitch = size + 2 * guard;
    diff = storage.data() + guard;
    map_x = diff + pitch;
    map_y = diff + 2 * pitch;
    pixel_weight = pixel_weighted ? storage.data() + 3 * pitch : nullptr;
  }
  int64_t size, guard;
  std::vector<acc_t> storage;
  acc_t* diff;
  acc_t* map_x;
  acc_t* map_y;
  acc_t* pixel_weight;  // null without a pixel weight
};

// Zeroes a gradient map outside its valid range. The flattened pass computed every position;
// those outside the range read across row ends or into the guards and must not count.
template <typename acc_t>
void zero_outside(acc_t* map, const ValidRange& range, int64_t height, int64_t width) {
  if (range.count() == 0) {
    std::fill(map, map + height * width, acc_t(0));
    return;
  }
  std::fill(map, map + range.row_begin * width, acc_t(0));
  std::fill(map + range.row_end * width, map + height * width, acc_t(0));
  for (int64_t i = range.row_begin; i < range.row_end; ++i) {
    std::fill(map + i * width, map + i * width + range.col_begin, acc_t(0));
    std::fill(map + i * width + range.col_end, map + (i + 1) * width, acc_t(0));
  }
}

// Pass 3 with a gradient: returns sum Ax^2 + Ay^2 and writes
// out = value_coef D + map_coef (Ax^T Ax D + Ay^T Ay D), converted to out_t.
template <typename acc_t, Stencil S, typename out_t>
acc_t gradient_pass(const PlaneScratch<acc_t>& scratch, int64_t size, int64_t width, acc_t value_coef,
                    acc_t map_coef, out_t* out) {
  const acc_t* diff = scratch.diff;
  const acc_t* map_x = scratch.map_x;
  const acc_t* map_y = scratch.map_y;
  acc_t sum_map2 = 0;
#pragma omp simd reduction(+ : sum_map2)
  for (int64_t n = 0; n < size; ++n) {
    sum_map2 += map_x[n] * map_x[n] + map_y[n] * map_y[n];
    const acc_t back = sum_taps<acc_t, S, true, -1>(map_x, n, width) + sum_taps<acc_t, S, false, -1>(map_y, n, width);
    out[n] = static_cast<out_t>(value_coef * diff[n] + map_coef * back);
  }
  return sum_map2;
}

// With a pixel weight M: returns (sum M D^2, sum M (Ax^2 + Ay^2)) and leaves M D, M Ax and M Ay in
// the scratch, which is what the gradient pass needs: its value part is then M D, and the
// adjoint gathers the weighted map entries (docs/spec.md section 1). Without WithMaps (no map
// was built) only D is weighed and the second sum is 0.
template <typename acc_t, bool WithMaps>
std::pair<acc_t, acc_t> weigh_by_pixel(PlaneScratch<acc_t>& scratch, int64_t size) {
  acc_t* diff = scratch.diff;
  acc_t* map_x = scratch.map_x;
  acc_t* map_y = scratch.map_y;
  const acc_t* pixel = scratch.pixel_weight;
  acc_t sum_d2 = 0, sum_map2 = 0;
#pragma omp simd reduction(+ : sum_d2, sum_map2)
  for (int64_t n = 0; n < size; ++n) {
    const acc_t m = pixel[n];
    sum_d2 += m * diff[n] * diff[n];
    diff[n] *= m;
    if constexpr (WithMaps) {
      sum_map2 += m * (map_x[n] * map_x[n] + map_y[n] * map_y[n]);
      map_x[n] *= m;
      map_y[n] *= m;
    }
  }
  return {sum_d2, sum_map2};
}

// out = value_coef D, converted to out_t: dL/dD when grad_weight is 0.
template <typename acc_t, typename out_t>
void value_gradient_pass(const acc_t* diff, int64_t size, acc_t value_coef, out_t* out) {
#pragma omp simd
  for (int64_t n = 0; n < size; ++n) out[n] = static_cast<out_t>(value_coef * diff[n]);
}

template <typename acc_t, Stencil S>
void plane_loss(const PlaneProblem<acc_t>& p, int64_t plane, bool same_dtype, PlaneScratch<acc_t>& scratch) {
  const int64_t H = p.height, W = p.width, size = H * W;
  const int64_t b = plane / p.num_joints, k = plane % p.num_joints;
  const int64_t grad_count = gradient_count<S>(H, W);
  const acc_t value_scale = p.mse_weight / static_cast<acc_t>(size);
  const acc_t map_scale = grad_count > 0 ? p.grad_weight / static_cast<acc_t>(grad_count) : 0;
  const acc_t alpha = p.has_teacher ? p.alpha[b] : acc_t(0);
  const acc_t weight = p.weight != nullptr ? p.weight[plane] : acc_t(1);
  acc_t* diff = scratch.diff;
  acc_t* map_x = scratch.map_x;
  acc_t* map_y = scratch.map_y;

  // Pass 1: D, and sum D^2.
  acc_t sum_d2 = 0;
  if (same_dtype) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.pred.dtype, "hgloss_load_difference", [&] {
      if (p.target_rows != nullptr) {
        sum_d2 = p.has_teacher ? load_difference_separable<acc_t, scalar_t, true>(p, b, k, alpha, diff)
                               : load_difference_separable<acc_t, scalar_t, false>(p, b, k, alpha, diff);
      } else {
        sum_d2 = p.has_teacher ? load_difference_same_dtype<acc_t, scalar_t, true>(p, b, k, alpha, diff)
                               : load_difference_same_dtype<acc_t, scalar_t, false>(p, b, k, alpha, diff);
      }
    });
  } else {
    sum_d2 = load_difference_mixed<acc_t>(p, b, k, alpha, diff);
  }
  const bool pixel_weighted = scratch.pixel_weight != nullptr;
  if (pixel_weighted) scaled_plane<acc_t>(p.pixel_weight, b, k, H, W, acc_t(1), false, scratch.pixel_weight);

  if (p.grad_weight == 0) {
    // R counts for nothing (the MSE of HRNet and mmpose through hgloss.compat): no gradient map
    // is built. For finite inputs this gives the bits of the full computation, whose map terms
    // add exactly 0; an Inf in D gives an Inf loss here, where mu V + 0 R would be NaN.
    if (pixel_weighted) sum_d2 = weigh_by_pixel<acc_t, false>(scratch, size).first;
    if (p.grad != nullptr) {
      const acc_t value_coef = 2 * value_scale * p.reduction_scale * weight;
      if (p.grad_dtype == at::kBFloat16) {
        value_gradient_pass(diff, size, value_coef, static_cast<c10::BFloat16*>(p.grad) + plane * size);
      } else {
        value_gradient_pass(diff, size, value_coef, static_cast<acc_t*>(p.grad) + plane * size);
      }
    }
    p.terms[plane] = value_scale * sum_d2;
    p.plane_losses[plane] = weight * p.terms[plane];
    return;
  }

  // Pass 2: Ax and Ay at every position of the flattened plane, then 0 outside the valid ranges.
#pragma omp simd
  for (int64_t n = 0; n < size; ++n) {
    map_x[n] = sum_taps<acc_t, S, true, 1>(diff, n, W);
    map_y[n] = sum_taps<acc_t, S, false, 1>(diff, n, W);
  }
  zero_outside(map_x, x_range<S>(H, W), H, W);
  zero_outside(map_y, y_range<S>(H, W), H, W);

  // Pass 3: sum Ax^2 + Ay^2 and, when wanted,
  // dL/dD = c w (2 value_scale D + 2 map_scale (Ax^T Ax D + Ay^T Ay D)), c the reduction's scale.
  // Both forms add the squares in the same vectorised order, so the loss does not depend on
  // whether a gradient was asked for. A pixel weight replaces D, Ax and Ay by M D, M Ax and M Ay
  // first, so the same gradient pass gives its dL/dD; its sums are the weighted ones.
  acc_t sum_map2 = 0;
  if (pixel_weighted) std::tie(sum_d2, sum_map2) = weigh_by_pixel<acc_t, true>(scratch, size);
  if (p.grad == nullptr) {
    if (!pixel_weighted) {
#pragma omp simd reduction(+ : sum_map2)
      for (int64_t n = 0; n < size; ++n) sum_map2 += map_x[n] * map_x[n] + map_y[n] * map_y[n];
    }
  } else {
    const acc_t plane_scale = p.reduction_scale * weight;
    const acc_t value_coef = 2 * value_scale * plane_scale, map_coef = 2 * map_scale * plane_scale;
    // The pass also sums the squares of the maps it gathers; with a pixel weight those are the
    // weighted maps, whose squares count for nothing: the weighted sum is already taken.
    const acc_t gathered_map2 =
        p.grad_dtype == at::kBFloat16
            ? gradient_pass<acc_t, S>(scratch, size, W, value_coef, map_coef,
                                      static_cast<c10::BFloat16*>(p.grad) + plane * size)
            : gradient_pass<acc_t, S>(scratch, size, W, value_coef, map_coef,
                                      static_cast<acc_t*>(p.grad) + plane * size);
    if (!pixel_weighted) sum_map2 = gathered_map2;
  }
  const acc_t terms = value_scale * sum_d2 + map_scale * sum_map2;
  p.terms[plane] = terms;
  p.plane_losses[plane] = weight * terms;
}

template <typename acc_t, Stencil S>
void run_planes(const PlaneProblem<acc_t>& problem, int64_t num_planes) {
  const int64_t plane_size = problem.height * problem.width;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(plane_size, 1));
  // A separable target counts as float32, the dtype its values are rounded to, so that a plane
  // takes the same path (and gives the same bits) as with the codecs' float32 target tensor.
  const at::ScalarType target_dtype = problem.target_rows != nullptr ? at::kFloat : problem.target.dtype;
  const bool same_dtype = target_dtype == problem.pred.dtype &&
                          (!problem.has_teacher || problem.teacher.dtype == problem.pred.dtype);
  at::parallel_for(0, num_planes, grain, [&](int64_t begin, int64_t end) {
    PlaneScratch<acc_t> scratch(problem.height, problem.width, problem.pixel_weight.data != nullptr);
    for (int64_t plane = begin; plane < end; ++plane) plane_loss<acc_t, S>(problem, plane, same_dtype, scratch);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> heatmap_loss_cpu(
    const at::Tensor& pred, const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& teacher,
    const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& weight,
    double mse_weight, double grad_weight, c10::string_view stencil, c10::string_view reduction,
    bool compute_grad, const std::optional<at::Tensor>& target_rows, const std::optional<at::Tensor>& target_cols,
    const std::optional<at::Tensor>& pixel_weight) {
  check_heatmap_loss_arguments(pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction,
                               target_rows, target_cols, pixel_weight);
  HeatmapLossOutputs out = prepare_heatmap_loss(pred, alpha, weight, pixel_weight, stencil, reduction, compute_grad);
  const int64_t B = pred.size(0), K = pred.size(1), H = pred.size(2), W = pred.size(3);
  const bool has_teacher = teacher.has_value();
  if (B * K > 0) {
    AT_DISPATCH_FLOATING_TYPES(out.acc_type, "hgloss_heatmap_loss_cpu", [&] {
      PlaneProblem<scalar_t> problem;
      problem.pred = StridedInput::of(pred);
      if (target.has_value()) {
        problem.target = StridedInput::of(*target);
      } else {
        problem.target_rows = target_rows->data_ptr<double>();
        problem.target_cols = target_cols->data_ptr<double>();
      }
      if (out.pixel_weight.defined()) problem.pixel_weight = StridedInput::of(out.pixel_weight);
      problem.has_teacher = has_teacher;
      if (has_teacher) {
        problem.teacher = StridedInput::of(*teacher);
        problem.alpha = out.alpha.data_ptr<scalar_t>();
      }
      problem.num_joints = K;
      problem.height = H;
      problem.width = W;
      problem.mse_weight = static_cast<scalar_t>(mse_weight);
      problem.grad_weight = static_cast<scalar_t>(grad_weight);
      problem.weight = weight.has_value() ? out.weight.data_ptr<scalar_t>() : nullptr;
      problem.reduction_scale = out.mean ? scalar_t(1) / static_cast<scalar_t>(B * K) : scalar_t(1);
      problem.terms = out.terms.data_ptr<scalar_t>();
      problem.plane_losses = out.plane_losses.data_ptr<scalar_t>();
      problem.grad = compute_grad ? out.grad.data_ptr() : nullptr;
      problem.grad_dtype = out.grad.scalar_type();
      switch (out.stencil) {
        case Stencil::Forward: run_planes<scalar_t, Stencil::Forward>(problem, B * K); break;
        case Stencil::Central: run_planes<scalar_t, Stencil::Central>(problem, B * K); break;
        case Stencil::Sobel: run_planes<scalar_t, Stencil::Sobel>(problem, B * K); break;
      }
    });
  }
  if (!out.reduce) return {out.loss, out.terms, out.grad};

  // The plane losses are added in index order by one thread: deterministic.
  AT_DISPATCH_FLOATING_TYPES(out.acc_type, "hgloss_reduce_cpu", [&] {
    const scalar_t* values = out.plane_losses.data_ptr<scalar_t>();
    scalar_t total = 0;
    for (int64_t i = 0; i < B * K; ++i) total += values[i];
    out.loss.fill_(out.mean ? (B * K > 0 ? total / static_cast<scalar_t>(B * K) : scalar_t(0)) : total);
  });
  return {out.loss, out.terms, out.grad};
}

template <typename value_t, typename factor_t>
void scale_planes(value_t* data, const factor_t* factors, bool per_plane, int64_t planes, int64_t plane_size) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(plane_size, 1));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const factor_t factor = factors[per_plane ? plane : 0];
      if (factor == factor_t(1)) continue;
      value_t* values = data + plane * plane_size;
#pragma omp simd
      for (int64_t n = 0; n < plane_size; ++n) values[n] = static_cast<value_t>(static_cast<factor_t>(values[n]) * factor);
    }
  });
}

void scale_gradient_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  check_scale_gradient_arguments(grad, scale);
  const int64_t planes = grad.size(0) * grad.size(1), plane_size = grad.size(2) * grad.size(3);
  if (planes == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "hgloss_scale_gradient_cpu", [&] {
    using factor_t = at::opmath_type<scalar_t>;
    const at::Tensor factors = scale.to(c10::CppTypeToScalarType<factor_t>::value).contiguous();
    scale_planes<scalar_t, factor_t>(grad.data_ptr<scalar_t>(), factors.data_ptr<factor_t>(), factors.numel() != 1,
                                     planes, plane_size);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(hgloss, CPU, m) {
  m.impl("heatmap_loss", &heatmap_loss_cpu);
  m.impl("scale_gradient_", &scale_gradient_cpu);
}

}  // namespace hgloss
