// The torch binding of the CUDA kernels: TORCH_LIBRARY_IMPL(hgloss, CUDA). It checks and
// allocates through the helpers the CPU kernel uses (../heatmap_loss.h), turns tensors into the
// raw views of heatmap_loss_kernel.h and enqueues on the current stream. No host synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../heatmap_loss.h"
#include "heatmap_loss_kernel.h"

namespace hgloss {
namespace {

cuda::DType dtype_of(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kHalf: return cuda::DType::Half;
    case at::kBFloat16: return cuda::DType::BFloat16;
    case at::kFloat: return cuda::DType::Float;
    case at::kDouble: return cuda::DType::Double;
    default: TORCH_CHECK_TYPE(false, "hgloss: unsupported dtype ", tensor.scalar_type());
  }
}

cuda::InputView view_of(const at::Tensor& tensor) {
  return {tensor.data_ptr(), dtype_of(tensor), tensor.stride(0), tensor.stride(1), tensor.stride(2), tensor.stride(3)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> heatmap_loss_cuda(
    const at::Tensor& pred, const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& teacher,
    const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& weight, double mse_weight,
    double grad_weight, c10::string_view stencil, c10::string_view reduction, bool compute_grad,
    const std::optional<at::Tensor>& target_rows, const std::optional<at::Tensor>& target_cols,
    const std::optional<at::Tensor>& pixel_weight) {
  // Checked before the guard, which needs pred on a CUDA device.
  check_heatmap_loss_arguments(pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction,
                               target_rows, target_cols, pixel_weight);
  const c10::cuda::CUDAGuard device_guard(pred.device());
  HeatmapLossOutputs out = prepare_heatmap_loss(pred, alpha, weight, pixel_weight, stencil, reduction, compute_grad);

  cuda::LossProblem problem;
  problem.pred = view_of(pred);
  if (target.has_value()) {
    problem.target = view_of(*target);
  } else {  // separable: the checks made both factors contiguous float64 on pred's device
    problem.target_rows = target_rows->data_ptr<double>();
    problem.target_cols = target_cols->data_ptr<double>();
  }
  if (teacher.has_value()) {
    problem.teacher = view_of(*teacher);
    problem.alpha = out.alpha.data_ptr();
  }
  problem.weight = weight.has_value() ? out.weight.data_ptr() : nullptr;
  if (out.pixel_weight.defined()) problem.pixel_weight = view_of(out.pixel_weight);
  problem.batch = pred.size(0);
  problem.joints = pred.size(1);
  problem.height = pred.size(2);
  problem.width = pred.size(3);
  problem.mse_weight = mse_weight;
  problem.grad_weight = grad_weight;
  problem.stencil = out.stencil;
  problem.reduction = out.mean ? cuda::Reduction::Mean : (out.reduce ? cuda::Reduction::Sum : cuda::Reduction::None);
  problem.grad = compute_grad ? out.grad.data_ptr() : nullptr;
  problem.grad_dtype = dtype_of(out.grad);
  problem.terms = out.terms.data_ptr();
  problem.plane_losses = out.plane_losses.data_ptr();
  problem.loss = out.reduce ? out.loss.data_ptr() : nullptr;

  cuda::LossPlan plan;
  C10_CUDA_CHECK(cuda::plan_heatmap_loss(problem, &plan));
  const at::Tensor workspace = at::empty({plan.workspace_bytes}, pred.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::heatmap_loss(problem, plan, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return {out.loss, out.terms, out.grad};
}

void scale_gradient_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  check_scale_gradient_arguments(grad, scale);
  const int64_t planes = grad.size(0) * grad.size(1), plane_size = grad.size(2) * grad.size(3);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  // Factors in the dtype the kernel multiplies in: float32 for a bfloat16 or float32 gradient.
  const auto factor_type = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor factors = scale.to(factor_type).contiguous();
  C10_CUDA_CHECK(cuda::scale_gradient(grad.data_ptr(), dtype_of(grad), factors.data_ptr(), factors.numel() != 1, planes,
                                      plane_size, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(hgloss, CUDA, m) {
  m.impl("heatmap_loss", &heatmap_loss_cuda);
  m.impl("scale_gradient_", &scale_gradient_cuda);
}

}  // namespace hgloss
