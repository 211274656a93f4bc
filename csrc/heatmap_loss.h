// hgloss::heatmap_loss and hgloss::scale_gradient_ as every C++ binding sees them: the argument
// checks, the accumulation dtype and the output tensors, shared by the CPU and CUDA kernels.
//
// The checks are those of hgloss/contract.py (docs/spec.md section 2) with the same messages, so
// that a direct torch.ops call fails the same way on every backend and before any kernel reads
// memory; tests/test_operators.py calls every fused operator with the same bad arguments.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "hgloss/stencil.h"

namespace hgloss {

// A shape as Python prints a tuple: (2, 3, 6, 5), (2,), ().
inline std::string shape_string(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// A dtype as Python prints it: torch.float32.
inline std::string dtype_string(at::ScalarType type) {
  return "torch." + std::string(c10::getDtypeNames(type).first);
}

inline void check_dtype(const at::Tensor& tensor, const char* name) {
  const auto type = tensor.scalar_type();
  TORCH_CHECK_TYPE(type == at::kHalf || type == at::kBFloat16 || type == at::kFloat || type == at::kDouble, name,
                   " must have a floating dtype (float16, bfloat16, float32 or float64), got ", dtype_string(type));
}

// A float as Python prints it where the messages need it: -1.0, 0.5, nan, inf.
inline std::string float_string(double value) {
  std::ostringstream out;
  out << value;
  if (std::isfinite(value) && value == std::floor(value) && std::fabs(value) < 1e16) out << ".0";
  return out.str();
}

inline void check_term_weight(double value, const char* name) {
  // NaN fails the comparison too.
  TORCH_CHECK_VALUE(value >= 0 && std::isfinite(value), name, " must be finite and >= 0, got ", float_string(value));
}

inline Stencil parse_stencil(c10::string_view name) {
  if (name == "forward") return Stencil::Forward;
  if (name == "central") return Stencil::Central;
  if (name == "sobel") return Stencil::Sobel;
  TORCH_CHECK_VALUE(false, "unknown stencil '", std::string(name), "'; expected one of ['forward', 'central', 'sobel']");
}

struct HeatmapLossOutputs {
  Stencil stencil;
  bool mean, reduce;           // reduction "mean"; "mean" or "sum"
  at::ScalarType acc_type;     // float64 for a float64 pred, else float32
  at::Tensor loss;             // 0-dim for "mean" and "sum"; for "none", plane_losses itself
  at::Tensor plane_losses;     // (B, K) weight * terms
  at::Tensor terms;            // (B, K) mse_weight * V + grad_weight * R
  at::Tensor grad;             // (B, K, H, W) dL/dD when compute_grad, else (0,)
  at::Tensor alpha, weight;    // contiguous, in acc_type, weight as (B, K); undefined when not given
  at::Tensor pixel_weight;     // the pixel weight expanded to (B, K, H, W), a view (stride 0 where
                               // broadcast, never copied); undefined when not given
};

// hgloss.contract.check_operator_arguments, in the same order and with the same messages.
// hgloss.contract.check_separable_target: the target as a tensor, or as contiguous float64
// factors (B, K, H) and (B, K, W) on pred's device; exactly one of the two forms.
inline void check_separable_target(const at::Tensor& pred, const std::optional<at::Tensor>& target,
                                   const std::optional<at::Tensor>& target_rows,
                                   const std::optional<at::Tensor>& target_cols) {
  const bool separable = target_rows.has_value() || target_cols.has_value();
  TORCH_CHECK_VALUE(separable != target.has_value() && (!separable || (target_rows && target_cols)),
                    "give the target as a tensor, or as both target_rows and target_cols, not both");
  if (!separable || pred.dim() != 4) return;  // pred is checked with the other arguments
  const std::pair<const char*, const at::Tensor*> factors[] = {{"target_rows", &*target_rows},
                                                                {"target_cols", &*target_cols}};
  for (int axis = 0; axis < 2; ++axis) {
    const auto& [name, tensor] = factors[axis];
    const std::vector<int64_t> expected = {pred.size(0), pred.size(1), pred.size(axis == 0 ? 2 : 3)};
    TORCH_CHECK_TYPE(tensor->scalar_type() == at::kDouble, name, " must be float64, got ",
                     dtype_string(tensor->scalar_type()));
    TORCH_CHECK_VALUE(tensor->device() == pred.device(), "all tensors must be on one device, got pred on ",
                      pred.device(), ", ", name, " on ", tensor->device());
    TORCH_CHECK_VALUE(tensor->sizes() == at::IntArrayRef(expected) && tensor->is_contiguous(), name,
                      " must be a contiguous tensor of shape ", shape_string(expected), " for pred shape ",
                      shape_string(pred.sizes()), ", got shape ", shape_string(tensor->sizes()));
  }
}

inline void check_heatmap_loss_arguments(const at::Tensor& pred, const std::optional<at::Tensor>& target,
                                         const std::optional<at::Tensor>& teacher,
                                         const std::optional<at::Tensor>& alpha,
                                         const std::optional<at::Tensor>& weight, double mse_weight,
                                         double grad_weight, c10::string_view stencil, c10::string_view reduction,
                                         const std::optional<at::Tensor>& target_rows,
                                         const std::optional<at::Tensor>& target_cols,
                                         const std::optional<at::Tensor>& pixel_weight) {
  check_separable_target(pred, target, target_rows, target_cols);
  check_dtype(pred, "pred");
  if (target) check_dtype(*target, "target");
  if (teacher.has_value()) check_dtype(*teacher, "teacher");
  if (weight.has_value()) check_dtype(*weight, "weight");
  if (alpha.has_value()) check_dtype(*alpha, "alpha");
  if (pixel_weight.has_value()) check_dtype(*pixel_weight, "pixel_weight");

  const bool one_device = (!target || target->device() == pred.device()) &&
                          (!teacher || teacher->device() == pred.device()) &&
                          (!weight || weight->device() == pred.device()) &&
                          (!alpha || alpha->device() == pred.device()) &&
                          (!pixel_weight || pixel_weight->device() == pred.device());
  if (!one_device) {
    std::ostringstream listed;
    listed << "pred on " << pred.device();
    if (target) listed << ", target on " << target->device();
    if (teacher) listed << ", teacher on " << teacher->device();
    if (weight) listed << ", weight on " << weight->device();
    if (alpha) listed << ", alpha on " << alpha->device();
    if (pixel_weight) listed << ", pixel_weight on " << pixel_weight->device();
    TORCH_CHECK_VALUE(false, "all tensors must be on one device, got ", listed.str());
  }

  TORCH_CHECK_VALUE(pred.dim() == 4, "pred must be 4-D (B, K, H, W), got shape ", shape_string(pred.sizes()));
  const int64_t B = pred.size(0), K = pred.size(1), H = pred.size(2), W = pred.size(3);
  TORCH_CHECK_VALUE(K >= 1 && H >= 1 && W >= 1, "pred must have K, H, W >= 1, got shape ", shape_string(pred.sizes()));
  if (target) {
    TORCH_CHECK_VALUE(target->sizes() == pred.sizes(), "target shape ", shape_string(target->sizes()),
                      " differs from pred shape ", shape_string(pred.sizes()));
  }
  if (teacher) {
    TORCH_CHECK_VALUE(teacher->sizes() == pred.sizes(), "teacher shape ", shape_string(teacher->sizes()),
                      " differs from pred shape ", shape_string(pred.sizes()));
  }
  if (weight) {
    // (B, K), (B, K, 1) or (B, K, 1, 1), as the public function takes it: passed on unreshaped, a
    // view made in Python per call would cost more than the check.
    bool accepted = weight->dim() >= 2 && weight->dim() <= 4 && weight->size(0) == B && weight->size(1) == K;
    for (int64_t d = 2; accepted && d < weight->dim(); ++d) accepted = weight->size(d) == 1;
    TORCH_CHECK_VALUE(accepted, "weight shape ", shape_string(weight->sizes()), " is not one of [(", B, ", ", K, "), (", B,
                      ", ", K, ", 1), (", B, ", ", K, ", 1, 1)] for pred shape ", shape_string(pred.sizes()));
  }
  if (pixel_weight) {
    // Broadcastable to (B, K, H, W): right-aligned, each size equal or 1, at most 4 dimensions.
    const int64_t dims = pixel_weight->dim();
    bool broadcasts = dims <= 4;
    for (int64_t d = 1; broadcasts && d <= dims; ++d) {
      const int64_t size = pixel_weight->size(dims - d);
      broadcasts = size == 1 || size == pred.size(4 - d);
    }
    TORCH_CHECK_VALUE(broadcasts, "pixel_weight shape ", shape_string(pixel_weight->sizes()),
                      " does not broadcast to pred shape ", shape_string(pred.sizes()), " (B, K, H, W)");
  }
  if (alpha) {
    TORCH_CHECK_VALUE(alpha->dim() == 1 && alpha->size(0) == B, "alpha tensor must have shape (", B,
                      ",) for batch size ", B, ", got ", shape_string(alpha->sizes()));
  } else {
    TORCH_CHECK_VALUE(!teacher, "a teacher needs an alpha tensor of shape (", B, ",)");
  }
  check_term_weight(mse_weight, "mse_weight");
  check_term_weight(grad_weight, "grad_weight");
  parse_stencil(stencil);
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum" || reduction == "none", "unknown reduction '",
                    std::string(reduction), "'; expected one of ['mean', 'sum', 'none']");
}

// The outputs on pred's device, for arguments that passed check_heatmap_loss_arguments.
inline HeatmapLossOutputs prepare_heatmap_loss(const at::Tensor& pred, const std::optional<at::Tensor>& alpha,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& pixel_weight,
                                               c10::string_view stencil, c10::string_view reduction,
                                               bool compute_grad) {
  const int64_t B = pred.size(0), K = pred.size(1), H = pred.size(2), W = pred.size(3);
  HeatmapLossOutputs out;
  out.mean = reduction == "mean";
  out.reduce = out.mean || reduction == "sum";
  out.stencil = parse_stencil(stencil);

  // hgloss.contract.accumulation_dtype and saved_gradient_dtype; the fake implementation
  // allocates by those, and opcheck compares it with this.
  out.acc_type = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = pred.options().dtype(out.acc_type);
  out.terms = at::empty({B, K}, acc_options);
  out.plane_losses = at::empty({B, K}, acc_options);
  out.loss = out.reduce ? at::empty({}, acc_options) : out.plane_losses;
  const auto grad_type = pred.scalar_type() == at::kBFloat16 ? at::kBFloat16 : out.acc_type;
  out.grad = at::empty(compute_grad ? at::IntArrayRef{B, K, H, W} : at::IntArrayRef{0}, pred.options().dtype(grad_type));
  if (alpha) out.alpha = alpha->to(out.acc_type).contiguous();
  if (weight) out.weight = weight->reshape({B, K}).to(out.acc_type).contiguous();
  if (pixel_weight) out.pixel_weight = pixel_weight->expand(pred.sizes());
  return out;
}

// hgloss.contract.check_scale_arguments.
inline void check_scale_gradient_arguments(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.is_contiguous(), "grad must be a contiguous (B, K, H, W) tensor, got shape ",
                    shape_string(grad.sizes()));
  const auto type = grad.scalar_type();
  TORCH_CHECK_TYPE(type == at::kBFloat16 || type == at::kFloat || type == at::kDouble,
                   "grad must be bfloat16, float32 or float64, got ", dtype_string(type));
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()), "scale must have a floating dtype, got ",
                   dtype_string(scale.scalar_type()));
  const int64_t planes = grad.size(0) * grad.size(1);
  TORCH_CHECK_VALUE(scale.numel() == 1 || scale.numel() == planes, "scale must hold 1 or B*K = ", planes,
                    " values, got ", scale.numel());
  TORCH_CHECK_VALUE(scale.device() == grad.device(), "all tensors must be on one device, got grad on ", grad.device(),
                    ", scale on ", scale.device());
}

}  // namespace hgloss
