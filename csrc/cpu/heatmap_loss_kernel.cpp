// CPU kernel of hgloss::heatmap_loss_forward.
//
// Each plane (b, k) is owned by one thread (at::parallel_for over B*K planes) and streamed row by
// row: a ring of three rows of D = P - ((1 - a) G + a S) and three rows of the adjoint
// accumulator A^T A D stay in L1, so T, D and the gradient maps are never written to memory. Per
// pixel it reads P, G (and S) once and, when asked, writes d(terms)/dD once. Sums run in a fixed
// order inside each plane, so results are bit-identical whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

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
};

// out[j] (+)= scale * row[j * stride] for j < n, converting from the input dtype.
template <typename acc_t, typename in_t>
void scaled_row_typed(const in_t* row, int64_t stride, int64_t n, acc_t scale, bool accumulate,
                      acc_t* out) {
  if (stride == 1) {
    if (accumulate) {
      for (int64_t j = 0; j < n; ++j) out[j] += scale * static_cast<acc_t>(row[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) out[j] = scale * static_cast<acc_t>(row[j]);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const acc_t value = scale * static_cast<acc_t>(row[j * stride]);
      out[j] = accumulate ? out[j] + value : value;
    }
  }
}

template <typename acc_t>
void scaled_row(const StridedInput& in, int64_t offset, int64_t n, acc_t scale, bool accumulate,
                acc_t* out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.dtype, "hgloss_load_row", [&] {
    scaled_row_typed<acc_t, scalar_t>(static_cast<const scalar_t*>(in.data) + offset, in.stride_w,
                                      n, scale, accumulate, out);
  });
}

// Eight independent partial sums, added in a fixed order: vectorisable and deterministic.
template <typename acc_t>
acc_t sum_of_squares(const acc_t* x, int64_t n) {
  constexpr int kLanes = 8;
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) lanes[lane] += x[j + lane] * x[j + lane];
  }
  acc_t total = 0;
  for (; j < n; ++j) total += x[j] * x[j];
  for (int lane = 0; lane < kLanes; ++lane) total += lanes[lane];
  return total;
}

template <typename acc_t>
struct PlaneProblem {
  StridedInput pred, target, teacher;
  bool has_teacher = false;
  const acc_t* alpha = nullptr;  // (B,), only with a teacher
  int64_t num_joints = 0, height = 0, width = 0;
  acc_t mse_weight = 0, grad_weight = 0;
  acc_t* terms = nullptr;  // (B*K,)
  acc_t* grad = nullptr;   // (B*K*H*W,) contiguous, or null when no gradient is wanted
};

// Per-thread scratch: the row rings and one row of gradient-map values.
template <typename acc_t>
struct RowRing {
  explicit RowRing(int64_t width) : storage(7 * static_cast<size_t>(width)) {
    for (int slot = 0; slot < 3; ++slot) {
      difference[slot] = storage.data() + slot * width;
      adjoint[slot] = storage.data() + (3 + slot) * width;
    }
    map_row = storage.data() + 6 * width;
  }
  acc_t* d(int64_t row) const { return difference[row % 3]; }
  acc_t* adj(int64_t row) const { return adjoint[row % 3]; }

  std::vector<acc_t> storage;
  acc_t* difference[3];
  acc_t* adjoint[3];
  acc_t* map_row;
};

// Computes one row of Ax (IsX) or Ay at row i over `range`, adds its squares to `sum_sq` and,
// when `with_grad`, scatters it through the adjoint into the accumulator rows.
template <typename acc_t, Stencil S, bool IsX>
void gradient_map_row(const RowRing<acc_t>& ring, const ValidRange& range, int64_t i,
                      bool with_grad, acc_t& sum_sq) {
  const int64_t c0 = range.col_begin, n = range.cols();
  acc_t* map = ring.map_row;
  for (int64_t j = 0; j < n; ++j) map[j] = 0;
  for (int u = -1; u <= 1; ++u) {
    for (int v = -1; v <= 1; ++v) {
      const acc_t tap = static_cast<acc_t>(IsX ? x_tap<S>(u, v) : y_tap<S>(u, v));
      if (tap == 0) continue;
      const acc_t* src = ring.d(i + u) + c0 + v;
      for (int64_t j = 0; j < n; ++j) map[j] += tap * src[j];
    }
  }
  sum_sq += sum_of_squares(map, n);
  if (!with_grad) return;
  for (int u = -1; u <= 1; ++u) {
    for (int v = -1; v <= 1; ++v) {
      const acc_t tap = static_cast<acc_t>(IsX ? x_tap<S>(u, v) : y_tap<S>(u, v));
      if (tap == 0) continue;
      acc_t* dst = ring.adj(i + u) + c0 + v;
      for (int64_t j = 0; j < n; ++j) dst[j] += tap * map[j];
    }
  }
}

template <typename acc_t, Stencil S>
void plane_loss(const PlaneProblem<acc_t>& p, int64_t plane, RowRing<acc_t>& ring) {
  const int64_t H = p.height, W = p.width;
  const int64_t b = plane / p.num_joints, k = plane % p.num_joints;
  const ValidRange xr = x_range<S>(H, W), yr = y_range<S>(H, W);
  const int64_t grad_count = xr.count() + yr.count();
  const acc_t value_scale = p.mse_weight / static_cast<acc_t>(H * W);
  const acc_t map_scale = grad_count > 0 ? p.grad_weight / static_cast<acc_t>(grad_count) : 0;
  const bool with_grad = p.grad != nullptr;
  const acc_t alpha = p.has_teacher ? p.alpha[b] : acc_t(0);

  auto offset = [&](const StridedInput& in, int64_t row) {
    return b * in.stride_b + k * in.stride_k + row * in.stride_h;
  };
  acc_t sum_d2 = 0, sum_map2 = 0;
  auto load_row = [&](int64_t row) {
    acc_t* d = ring.d(row);
    scaled_row<acc_t>(p.pred, offset(p.pred, row), W, acc_t(1), false, d);
    scaled_row<acc_t>(p.target, offset(p.target, row), W, alpha - acc_t(1), true, d);
    if (p.has_teacher) scaled_row<acc_t>(p.teacher, offset(p.teacher, row), W, -alpha, true, d);
    sum_d2 += sum_of_squares(d, W);
    if (with_grad) {
      acc_t* adj = ring.adj(row);
      for (int64_t j = 0; j < W; ++j) adj[j] = 0;
    }
  };
  // Row `row` of d(terms)/dD once every gradient-map row touching it has been scattered.
  auto finish_row = [&](int64_t row) {
    if (!with_grad) return;
    const acc_t* d = ring.d(row);
    const acc_t* adj = ring.adj(row);
    acc_t* out = p.grad + (plane * H + row) * W;
    for (int64_t j = 0; j < W; ++j) out[j] = 2 * value_scale * d[j] + 2 * map_scale * adj[j];
  };

  load_row(0);
  if (H > 1) load_row(1);
  for (int64_t i = 0; i < H; ++i) {
    // Gradient-map row i reads D rows i-1..i+1 and scatters into the same rows.
    if (i >= 1 && i + 1 < H) load_row(i + 1);
    if (i >= xr.row_begin && i < xr.row_end && xr.cols() > 0) {
      gradient_map_row<acc_t, S, true>(ring, xr, i, with_grad, sum_map2);
    }
    if (i >= yr.row_begin && i < yr.row_end && yr.cols() > 0) {
      gradient_map_row<acc_t, S, false>(ring, yr, i, with_grad, sum_map2);
    }
    if (i >= 1) finish_row(i - 1);
  }
  finish_row(H - 1);
  p.terms[plane] = value_scale * sum_d2 + map_scale * sum_map2;
}

template <typename acc_t, Stencil S>
void run_planes(const PlaneProblem<acc_t>& problem, int64_t num_planes) {
  const int64_t plane_size = problem.height * problem.width;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(plane_size, 1));
  at::parallel_for(0, num_planes, grain, [&](int64_t begin, int64_t end) {
    RowRing<acc_t> ring(problem.width);
    for (int64_t plane = begin; plane < end; ++plane) plane_loss<acc_t, S>(problem, plane, ring);
  });
}

Stencil parse_stencil(c10::string_view name) {
  if (name == "forward") return Stencil::Forward;
  if (name == "central") return Stencil::Central;
  if (name == "sobel") return Stencil::Sobel;
  TORCH_CHECK_VALUE(false, "hgloss: unknown stencil '", std::string(name),
                    "'; expected 'forward', 'central' or 'sobel'");
}

std::tuple<at::Tensor, at::Tensor> heatmap_loss_forward_cpu(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& teacher,
    const std::optional<at::Tensor>& alpha, double mse_weight, double grad_weight,
    c10::string_view stencil, bool compute_grad) {
  TORCH_CHECK(pred.dim() == 4, "hgloss: pred must be (B, K, H, W), got ", pred.sizes());
  TORCH_CHECK(target.sizes() == pred.sizes(), "hgloss: target ", target.sizes(),
              " does not match pred ", pred.sizes());
  const bool has_teacher = teacher.has_value();
  if (has_teacher) {
    TORCH_CHECK(teacher->sizes() == pred.sizes(), "hgloss: teacher ", teacher->sizes(),
                " does not match pred ", pred.sizes());
    TORCH_CHECK(alpha.has_value() && alpha->dim() == 1 && alpha->size(0) == pred.size(0),
                "hgloss: a teacher needs a (B,) alpha tensor");
  }
  const Stencil stencil_kind = parse_stencil(stencil);
  const auto acc_type = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = pred.size(0), K = pred.size(1), H = pred.size(2), W = pred.size(3);
  at::Tensor terms = at::empty({B, K}, pred.options().dtype(acc_type));
  at::Tensor grad = compute_grad ? at::empty({B, K, H, W}, pred.options().dtype(acc_type))
                                 : at::empty({0}, pred.options().dtype(acc_type));
  if (B * K == 0) return {terms, grad};
  at::Tensor alpha_acc = has_teacher ? alpha->to(acc_type).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(acc_type, "hgloss_heatmap_loss_forward_cpu", [&] {
    PlaneProblem<scalar_t> problem;
    problem.pred = StridedInput::of(pred);
    problem.target = StridedInput::of(target);
    problem.has_teacher = has_teacher;
    if (has_teacher) {
      problem.teacher = StridedInput::of(*teacher);
      problem.alpha = alpha_acc.data_ptr<scalar_t>();
    }
    problem.num_joints = K;
    problem.height = H;
    problem.width = W;
    problem.mse_weight = static_cast<scalar_t>(mse_weight);
    problem.grad_weight = static_cast<scalar_t>(grad_weight);
    problem.terms = terms.data_ptr<scalar_t>();
    problem.grad = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    switch (stencil_kind) {
      case Stencil::Forward: run_planes<scalar_t, Stencil::Forward>(problem, B * K); break;
      case Stencil::Central: run_planes<scalar_t, Stencil::Central>(problem, B * K); break;
      case Stencil::Sobel: run_planes<scalar_t, Stencil::Sobel>(problem, B * K); break;
    }
  });
  return {terms, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(hgloss, CPU, m) {
  m.impl("heatmap_loss_forward", &heatmap_loss_forward_cpu);
}

}  // namespace hgloss
