// The autograd of hgloss::heatmap_loss, in C++ so that a forward+backward costs no Python beyond
// the public function's checks: one kernel for every device the op has one for.
//
// The forward returns dL/dD for an upstream gradient of 1 (when asked), and the backward only
// scales it by the upstream gradient, in place (hgloss::scale_gradient_ leaves it untouched for a
// factor of exactly 1, the usual loss.backward()). That buffer then becomes dL/dpred, so one
// forward+backward allocates one heatmap-sized tensor. A second backward through the same graph
// (retain_graph=True, as gradcheck does) finds the buffer consumed and recomputes it with one more
// forward pass, as does the backward of a call made with compute_grad=false. When the backward is
// traced (torch.compile, AOTAutograd, opcheck) the scaling is a functional multiply instead: a
// traced graph must not mutate a saved forward output. Double backward raises a clear error.
//
// The Triton operator has the same autograd in Python (hgloss/ops.py), so that it works without
// this extension; the two decide "traced" by the same dispatch keys and raise the same message,
// and tests/test_operators.py runs both through the same backward scenarios.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>

namespace hgloss {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using HeatmapLossResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

using OptionalTensor = std::optional<at::Tensor>;

// hgloss.contract.PIXEL_WEIGHT_GRAD_MESSAGE.
constexpr const char* PIXEL_WEIGHT_GRAD_MESSAGE =
    "pixel_weight requires grad, and only the reference backend differentiates it; "
    "use backend='reference', or pass pixel_weight.detach()";

HeatmapLossResult call_heatmap_loss(const at::Tensor& pred, const OptionalTensor& target, const OptionalTensor& teacher,
                                    const OptionalTensor& alpha, const OptionalTensor& weight, double mse_weight,
                                    double grad_weight, c10::string_view stencil, c10::string_view reduction,
                                    bool compute_grad, const OptionalTensor& target_rows,
                                    const OptionalTensor& target_cols, const OptionalTensor& pixel_weight) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("hgloss::heatmap_loss", "")
          .typed<HeatmapLossResult(const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                                   const OptionalTensor&, const OptionalTensor&, double, double, c10::string_view,
                                   c10::string_view, bool, const OptionalTensor&, const OptionalTensor&,
                                   const OptionalTensor&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction, compute_grad,
                 target_rows, target_cols, pixel_weight);
}

void call_scale_gradient_(const at::Tensor& grad, const at::Tensor& scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("hgloss::scale_gradient_", "")
                             .typed<void(const at::Tensor&, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.call(grad, scale);
}

// Whether a tensor is a tracing stand-in (fake, functional or meta) rather than data.
bool is_traced(const at::Tensor& tensor) {
  return tensor.is_meta() ||
         tensor.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

at::Tensor converted(const at::Tensor& tensor, at::ScalarType type) {
  return tensor.scalar_type() == type ? tensor : tensor.to(type);
}

std::optional<at::Tensor> optional_of(const at::Tensor& tensor) {
  return tensor.defined() ? std::optional<at::Tensor>(tensor) : std::nullopt;
}

class HeatmapLossFunction : public torch::autograd::Function<HeatmapLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, const OptionalTensor& target,
                               const OptionalTensor& teacher, const OptionalTensor& alpha, const OptionalTensor& weight,
                               double mse_weight, double grad_weight, c10::string_view stencil,
                               c10::string_view reduction, bool compute_grad, const OptionalTensor& target_rows,
                               const OptionalTensor& target_cols, const OptionalTensor& pixel_weight) {
    auto [loss, terms, grad] = call_heatmap_loss(pred, target, teacher, alpha, weight, mse_weight, grad_weight,
                                                 stencil, reduction, compute_grad, target_rows, target_cols,
                                                 pixel_weight);
    ctx->save_for_backward({grad, terms, pred, target.value_or(at::Tensor()), teacher.value_or(at::Tensor()),
                            alpha.value_or(at::Tensor()), weight.value_or(at::Tensor()),
                            target_rows.value_or(at::Tensor()), target_cols.value_or(at::Tensor()),
                            pixel_weight.value_or(at::Tensor())});
    ctx->saved_data.reserve(5);  // one allocation for the five settings, not a rehash per insert
    ctx->saved_data["mse_weight"] = mse_weight;
    ctx->saved_data["grad_weight"] = grad_weight;
    ctx->saved_data["stencil"] = std::string(stencil);
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["gradient_consumed"] = false;
    // terms and grad exist for the backward only: no gradient flows through them, and none is
    // materialised for them (one is heatmap-sized).
    ctx->mark_non_differentiable({terms, grad});
    ctx->set_materialize_grads(false);
    return {loss, terms, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "hgloss: double backward is not supported by the fused backends; "
                "use backend='reference' for higher-order gradients");
    variable_list grads(13);  // one per forward argument; none for the target's factors or pixel_weight
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return grads;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &terms = saved[1], &pred = saved[2], &target = saved[3];
    const at::Tensor &teacher = saved[4], &alpha = saved[5], &weight = saved[6];
    const bool per_plane = ctx->saved_data["reduction"].toStringRef() == "none";
    const bool mean = ctx->saved_data["reduction"].toStringRef() == "mean";
    // Conversions only where the dtypes differ: a no-op .to() still costs a dispatcher call.
    const at::Tensor upstream = converted(grad_loss, terms.scalar_type());
    // needs_input_grad counts the tensors passed, so absent optional ones shift the later ones.
    const size_t teacher_edge = 1 + target.defined(), alpha_edge = teacher_edge + teacher.defined();
    const size_t weight_edge = alpha_edge + alpha.defined();
    const bool needs_pred = ctx->needs_input_grad(0), needs_target = target.defined() && ctx->needs_input_grad(1);
    const bool needs_teacher = teacher.defined() && ctx->needs_input_grad(teacher_edge);
    const bool needs_weight = weight.defined() && ctx->needs_input_grad(weight_edge);

    if (needs_weight) {
      // For "mean" each plane's share of the upstream gradient is 1/(B*K) of it; with no plane
      // there is nothing to divide.
      const at::Tensor plane_upstream =
          mean ? upstream / c10::Scalar(std::max<c10::SymInt>(terms.sym_numel(), 1)) : upstream;
      grads[4] = (plane_upstream * terms).to(weight.scalar_type()).reshape(weight.sizes());
    }
    if (!(needs_pred || needs_target || needs_teacher)) return grads;

    const at::Tensor grad_diff = gradient_of_difference(ctx, saved, upstream, per_plane);
    if (needs_teacher) grads[2] = (grad_diff * -alpha.view({-1, 1, 1, 1})).to(teacher.scalar_type());
    if (needs_target) {
      grads[1] = (alpha.defined() ? grad_diff * (alpha - 1).view({-1, 1, 1, 1}) : -grad_diff).to(target.scalar_type());
    }
    if (needs_pred) grads[0] = converted(grad_diff, pred.scalar_type());
    return grads;
  }

 private:
  // dL/dD for this upstream gradient.
  static at::Tensor gradient_of_difference(AutogradContext* ctx, const variable_list& saved,
                                           const at::Tensor& upstream, bool per_plane) {
    at::Tensor grad = saved[0];
    if (is_traced(grad)) return grad * (per_plane ? upstream.unsqueeze(-1).unsqueeze(-1) : upstream);
    const at::Tensor& pred = saved[2];
    if (ctx->saved_data["gradient_consumed"].toBool() || grad.sizes() != pred.sizes()) {
      // Consumed by an earlier backward, or never computed: one more forward pass.
      grad = std::get<2>(call_heatmap_loss(pred, optional_of(saved[3]), optional_of(saved[4]), optional_of(saved[5]),
                                           optional_of(saved[6]), ctx->saved_data["mse_weight"].toDouble(),
                                           ctx->saved_data["grad_weight"].toDouble(),
                                           ctx->saved_data["stencil"].toStringRef(),
                                           ctx->saved_data["reduction"].toStringRef(), true, optional_of(saved[7]),
                                           optional_of(saved[8]), optional_of(saved[9])));
    }
    ctx->saved_data["gradient_consumed"] = true;
    call_scale_gradient_(grad, upstream);
    return grad;
  }
};

HeatmapLossResult heatmap_loss_autograd(const at::Tensor& pred, const OptionalTensor& target,
                                        const OptionalTensor& teacher, const OptionalTensor& alpha,
                                        const OptionalTensor& weight, double mse_weight, double grad_weight,
                                        c10::string_view stencil, c10::string_view reduction, bool compute_grad,
                                        const OptionalTensor& target_rows, const OptionalTensor& target_cols,
                                        const OptionalTensor& pixel_weight) {
  // Refused before any kernel runs: the backward has no gradient for M, and leaving it at none
  // would be a silent zero.
  TORCH_CHECK_VALUE(!(pixel_weight && pixel_weight->requires_grad() && at::GradMode::is_enabled()),
                    PIXEL_WEIGHT_GRAD_MESSAGE);
  const variable_list outputs =
      HeatmapLossFunction::apply(pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction,
                                 compute_grad, target_rows, target_cols, pixel_weight);
  return {outputs[0], outputs[1], outputs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(hgloss, Autograd, m) { m.impl("heatmap_loss", &heatmap_loss_autograd); }

}  // namespace hgloss
