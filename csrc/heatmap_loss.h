// hgloss::heatmap_loss as every backend's binding sees it: the argument checks, the accumulation
// dtype and the output tensors, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "hgloss/stencil.h"

namespace hgloss {

inline Stencil parse_stencil(c10::string_view name) {
  if (name == "forward") return Stencil::Forward;
  if (name == "central") return Stencil::Central;
  if (name == "sobel") return Stencil::Sobel;
  TORCH_CHECK_VALUE(false, "hgloss: unknown stencil '", std::string(name),
                    "'; expected 'forward', 'central' or 'sobel'");
}

struct HeatmapLossOutputs {
  Stencil stencil;
  bool mean, reduce;           // reduction "mean"; "mean" or "sum"
  at::ScalarType acc_type;     // float64 for a float64 pred, else float32
  at::Tensor loss;             // 0-dim for "mean" and "sum"; for "none", plane_losses itself
  at::Tensor plane_losses;     // (B, K) weight * terms
  at::Tensor terms;            // (B, K) mse_weight * V + grad_weight * R
  at::Tensor grad;             // (B, K, H, W) dL/dD when compute_grad, else (0,)
  at::Tensor alpha, weight;    // contiguous, in acc_type; undefined when not given
};

// Checks what the Python front end guarantees but a direct torch.ops call may not, then allocates
// the outputs on pred's device.
inline HeatmapLossOutputs prepare_heatmap_loss(const at::Tensor& pred, const at::Tensor& target,
                                               const std::optional<at::Tensor>& teacher,
                                               const std::optional<at::Tensor>& alpha,
                                               const std::optional<at::Tensor>& weight, c10::string_view stencil,
                                               c10::string_view reduction, bool compute_grad) {
  TORCH_CHECK_VALUE(pred.dim() == 4, "hgloss: pred must be (B, K, H, W), got ", pred.sizes());
  TORCH_CHECK_VALUE(target.sizes() == pred.sizes(), "hgloss: target ", target.sizes(),
                    " does not match pred ", pred.sizes());
  const int64_t B = pred.size(0), K = pred.size(1), H = pred.size(2), W = pred.size(3);
  if (teacher.has_value()) {
    TORCH_CHECK_VALUE(teacher->sizes() == pred.sizes(), "hgloss: teacher ", teacher->sizes(),
                      " does not match pred ", pred.sizes());
    TORCH_CHECK_VALUE(alpha.has_value() && alpha->dim() == 1 && alpha->size(0) == B,
                      "hgloss: a teacher needs a (B,) alpha tensor");
  }
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->dim() == 2 && weight->size(0) == B && weight->size(1) == K,
                      "hgloss: weight must be (B, K), got ", weight->sizes());
  }
  HeatmapLossOutputs out;
  out.mean = reduction == "mean";
  out.reduce = out.mean || reduction == "sum";
  TORCH_CHECK_VALUE(out.reduce || reduction == "none", "hgloss: unknown reduction '", std::string(reduction), "'");
  out.stencil = parse_stencil(stencil);

  out.acc_type = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = pred.options().dtype(out.acc_type);
  out.terms = at::empty({B, K}, acc_options);
  out.plane_losses = at::empty({B, K}, acc_options);
  out.loss = out.reduce ? at::empty({}, acc_options) : out.plane_losses;
  // A bfloat16 pred gets its gradient in bfloat16, the dtype it is returned in, so no float32
  // copy is kept. A float16 one keeps float32: a loss-scaled (GradScaler) backward multiplies
  // it by up to 2^16, and float16 would have flushed the small values to zero before that.
  const auto grad_type = pred.scalar_type() == at::kBFloat16 ? at::kBFloat16 : out.acc_type;
  out.grad = at::empty(compute_grad ? at::IntArrayRef{B, K, H, W} : at::IntArrayRef{0}, pred.options().dtype(grad_type));
  if (teacher.has_value()) out.alpha = alpha->to(out.acc_type).contiguous();
  if (weight.has_value()) out.weight = weight->to(out.acc_type).contiguous();
  return out;
}

}  // namespace hgloss
