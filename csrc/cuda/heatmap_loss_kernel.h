// The torch-free interface of the CUDA kernels of hgloss::heatmap_loss and
// hgloss::scale_gradient_: raw pointers, element strides and a stream. heatmap_loss_cuda.cu binds
// it to torch; CMake compiles everything behind it with nvcc alone.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "hgloss/stencil.h"
#include "tile_plan.h"

namespace hgloss {
namespace cuda {

enum class DType : int { Half, BFloat16, Float, Double };
enum class Reduction : int { None, Sum, Mean };

// A (B, K, H, W) input with strides in elements.
struct InputView {
  const void* data = nullptr;
  DType dtype = DType::Float;
  int64_t stride_b = 0, stride_k = 0, stride_h = 0, stride_w = 0;
};

// One evaluation of the loss of docs/spec.md section 1. Every per-plane array is in the accumulation
// dtype: double for a double pred, else float. The target is a tensor, or separable: G[i, j] =
// float32(target_rows[i] * target_cols[j]) per plane, the product taken in double and rounded to
// float32 as the pose codecs store it (hgloss/targets.py); the kernels then read only the factors.
struct LossProblem {
  // target.data is null for a separable target, teacher.data without a teacher.
  InputView pred, target, teacher;
  // The per-pixel weight M expanded to (B, K, H, W), stride 0 along its broadcast dimensions, in
  // a floating dtype of its own; data is null without one (M = 1).
  InputView pixel_weight;
  const double* target_rows = nullptr;  // contiguous (B*K, H) row factors of a separable target, else null
  const double* target_cols = nullptr;  // contiguous (B*K, W) column factors, with target_rows
  const void* alpha = nullptr;          // (B,), with a teacher
  const void* weight = nullptr;         // (B*K,) target weights, or null for 1
  int64_t batch = 0, joints = 0, height = 0, width = 0;
  double mse_weight = 1, grad_weight = 1;
  Stencil stencil = Stencil::Forward;
  Reduction reduction = Reduction::Mean;
  void* grad = nullptr;  // contiguous (B, K, H, W) dL/dD for an upstream gradient of 1, or null
  DType grad_dtype = DType::Float;
  void* terms = nullptr;         // (B*K,) mse_weight * V + grad_weight * R
  void* plane_losses = nullptr;  // (B*K,) weight * terms
  void* loss = nullptr;          // the 0-dim sum or mean; null for Reduction::None

  bool accumulates_in_double() const { return pred.dtype == DType::Double; }
  bool separable_target() const { return target_rows != nullptr; }
  bool pixel_weighted() const { return pixel_weight.data != nullptr; }
  // A separable target's values are float32, so it counts as a float32 target when the kernels
  // pick between their same-dtype and mixed-dtype paths: the bits match a float32 target tensor's.
  DType target_dtype() const { return separable_target() ? DType::Float : target.dtype; }
  int64_t planes() const { return batch * joints; }
};

// How a problem runs on the current device, and the scratch it needs.
struct LossPlan {
  TilePlan tiles;
  bool vectorized = false;      // whole planes read and written 16 bytes (float32) at a time
  int64_t workspace_bytes = 0;  // per-tile partial sums, when planes span several tiles
};

// Reads the current device's shared-memory limits; no device work, no synchronisation.
cudaError_t plan_heatmap_loss(const LossProblem& problem, LossPlan* plan);

// Writes terms, plane_losses, loss and (when problem.grad is set) dL/dD, enqueued on `stream`
// with no host synchronisation, so the call can be captured in a CUDA graph. `workspace` holds
// plan.workspace_bytes. Deterministic: the same inputs give bit-identical outputs.
cudaError_t heatmap_loss(const LossProblem& problem, const LossPlan& plan, void* workspace, cudaStream_t stream);

// grad *= factor in place, with one factor or one per plane (in the accumulation dtype). Planes
// whose factor is exactly 1 are not touched; the kernel reads the factors, the host never does.
cudaError_t scale_gradient(void* grad, DType grad_dtype, const void* factors, bool factor_per_plane, int64_t planes,
                           int64_t plane_size, cudaStream_t stream);

}  // namespace cuda
}  // namespace hgloss
