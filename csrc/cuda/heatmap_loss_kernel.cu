// The host side of the CUDA loss: planning from the device's limits, the final reduction and the
// in-place backward scaling. Torch-free, like the kernels (heatmap_loss_kernel.cuh).
#include <algorithm>
#include <cstdint>

#include "heatmap_loss_kernel.cuh"

namespace hgloss {
namespace cuda {

extern template cudaError_t launch_loss_tiles<Stencil::Forward>(const LossProblem&, const LossPlan&, void*,
                                                               cudaStream_t);
extern template cudaError_t launch_loss_tiles<Stencil::Central>(const LossProblem&, const LossPlan&, void*,
                                                               cudaStream_t);
extern template cudaError_t launch_loss_tiles<Stencil::Sobel>(const LossProblem&, const LossPlan&, void*,
                                                             cudaStream_t);

namespace {

constexpr int kFinishThreads = 1024;
constexpr int kScaleThreads = 256;
// Shared memory a block keeps for itself beyond the dynamic allocation: the reduction's warp sums
// and what the hardware reserves per block (1 KiB on sm_80 and sm_90).
constexpr int64_t kSharedReserve = 2048;

int64_t dtype_bytes(DType dtype) {
  switch (dtype) {
    case DType::Half:
    case DType::BFloat16: return 2;
    case DType::Float: return 4;
    default: return 8;
  }
}

// Whether every plane of `input` can be read kVector elements at a time: flat planes whose
// starts are all aligned to kVector elements.
bool vector_readable(const InputView& input, const LossProblem& problem) {
  const int64_t alignment = kVector * dtype_bytes(input.dtype);
  const bool flat_rows = problem.height == 1 || input.stride_h == problem.width;
  const bool aligned_planes = (problem.batch <= 1 || input.stride_b % kVector == 0) &&
                              (problem.joints <= 1 || input.stride_k % kVector == 0);
  return input.stride_w == 1 && flat_rows && aligned_planes &&
         reinterpret_cast<uintptr_t>(input.data) % static_cast<uintptr_t>(alignment) == 0;
}

template <typename acc_t>
struct FinishArgs {
  int64_t planes, tiles;
  const acc_t* partials;  // (planes * tiles, 2), when tiles > 1
  const acc_t* weight;    // (planes,) or null
  acc_t value_scale, map_scale;
  acc_t* terms;
  acc_t* plane_losses;
  acc_t* loss;  // null for Reduction::None
  bool mean;
};

// One block: adds each plane's tile sums in tile order (tiled planes), then the plane losses in a
// fixed order (sum and mean). Deterministic, no atomics.
template <typename acc_t>
__global__ void __launch_bounds__(kFinishThreads) finish_kernel(const FinishArgs<acc_t> args) {
  acc_t total = 0;
  for (int64_t plane = threadIdx.x; plane < args.planes; plane += kFinishThreads) {
    acc_t plane_loss;
    if (args.tiles > 1) {
      acc_t sum_d2 = 0, sum_map2 = 0;
      for (int64_t tile = 0; tile < args.tiles; ++tile) {
        sum_d2 += args.partials[2 * (plane * args.tiles + tile)];
        sum_map2 += args.partials[2 * (plane * args.tiles + tile) + 1];
      }
      const acc_t terms = args.value_scale * sum_d2 + args.map_scale * sum_map2;
      args.terms[plane] = terms;
      plane_loss = (args.weight != nullptr ? args.weight[plane] : acc_t(1)) * terms;
      args.plane_losses[plane] = plane_loss;
    } else {
      plane_loss = args.plane_losses[plane];
    }
    total += plane_loss;
  }
  if (args.loss == nullptr) return;
  acc_t unused = 0;
  block_sum2<kFinishThreads>(total, unused);
  if (threadIdx.x == 0) {
    *args.loss = args.mean ? (args.planes > 0 ? total / static_cast<acc_t>(args.planes) : acc_t(0)) : total;
  }
}

template <typename acc_t>
cudaError_t launch_finish(const LossProblem& problem, const LossPlan& plan, const void* partials,
                          cudaStream_t stream) {
  FinishArgs<acc_t> args;
  args.planes = problem.planes();
  args.tiles = plan.tiles.tiles();
  args.partials = static_cast<const acc_t*>(partials);
  args.weight = static_cast<const acc_t*>(problem.weight);
  plane_scales(problem, &args.value_scale, &args.map_scale);
  args.terms = static_cast<acc_t*>(problem.terms);
  args.plane_losses = static_cast<acc_t*>(problem.plane_losses);
  args.loss = static_cast<acc_t*>(problem.loss);
  args.mean = problem.reduction == Reduction::Mean;
  finish_kernel<acc_t><<<1, kFinishThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

// grad[n] *= factor of n's plane. With plane_size % kVector == 0 and an aligned grad, kVector
// values at a time: a group never straddles two planes. A single factor of exactly 1 returns at
// once; per-plane factors of 1 skip their plane's reads and writes.
template <typename value_t, typename factor_t, bool Vectorized>
__global__ void __launch_bounds__(kScaleThreads)
    scale_gradient_kernel(value_t* grad, const factor_t* factors, bool per_plane, int64_t planes, int64_t plane_size) {
  if (!per_plane && factors[0] == factor_t(1)) return;
  constexpr int width = Vectorized ? kVector : 1;
  const int64_t groups = planes * plane_size / width;
  for (int64_t group = static_cast<int64_t>(blockIdx.x) * kScaleThreads + threadIdx.x; group < groups;
       group += static_cast<int64_t>(gridDim.x) * kScaleThreads) {
    const int64_t first = group * width;
    const factor_t factor = factors[per_plane ? first / plane_size : 0];
    if (factor == factor_t(1)) continue;
    auto* values = reinterpret_cast<Packed<value_t, width>*>(grad + first);
    Packed<value_t, width> scaled = *values;
#pragma unroll
    for (int e = 0; e < width; ++e) {
      scaled.values[e] = from_acc<value_t>(to_acc<factor_t>(scaled.values[e]) * factor);
    }
    *values = scaled;
  }
}

template <typename value_t, typename factor_t>
cudaError_t launch_scale(void* grad, const void* factors, bool per_plane, int64_t planes, int64_t plane_size,
                         cudaStream_t stream) {
  int device = 0, multiprocessors = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
  if (error != cudaSuccess) return error;
  const bool vectorized = plane_size % kVector == 0 &&
                          reinterpret_cast<uintptr_t>(grad) % (kVector * sizeof(value_t)) == 0;
  const int64_t groups = planes * plane_size / (vectorized ? kVector : 1);
  // A grid-stride loop over enough blocks to fill every multiprocessor a few times over.
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((groups + kScaleThreads - 1) / kScaleThreads,
                                                                int64_t(multiprocessors) * 8));
  auto* values = static_cast<value_t*>(grad);
  const auto* typed_factors = static_cast<const factor_t*>(factors);
  if (vectorized) {
    scale_gradient_kernel<value_t, factor_t, true>
        <<<static_cast<unsigned int>(blocks), kScaleThreads, 0, stream>>>(values, typed_factors, per_plane, planes,
                                                                          plane_size);
  } else {
    scale_gradient_kernel<value_t, factor_t, false>
        <<<static_cast<unsigned int>(blocks), kScaleThreads, 0, stream>>>(values, typed_factors, per_plane, planes,
                                                                          plane_size);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t plan_heatmap_loss(const LossProblem& problem, LossPlan* plan) {
  int device = 0, per_block = 0, per_multiprocessor = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&per_multiprocessor, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  }
  if (error != cudaSuccess) return error;
  const int64_t value_bytes = problem.accumulates_in_double() ? 8 : 4;
  // Whole planes while three blocks still fit on a multiprocessor, tiles while six do: enough
  // resident blocks that one block's loads overlap another's shared-memory phases.
  const int64_t whole_plane_bytes = std::min<int64_t>(per_block, per_multiprocessor / 3) - kSharedReserve;
  const int64_t tile_bytes = std::min<int64_t>(per_block, per_multiprocessor / 6) - kSharedReserve;
  plan->tiles = plan_tiles(problem.height, problem.width, value_bytes, whole_plane_bytes, tile_bytes);

  // A separable target's factors are read one at a time, so they need no alignment: its planes are
  // vectorised exactly when those of a contiguous float32 target would be, and give the same bits.
  // A pixel weight is read on the strided path only (heatmap_loss_kernel.cuh).
  const int64_t grad_alignment = kVector * dtype_bytes(problem.grad_dtype);
  plan->vectorized = plan->tiles.whole_plane() && !problem.pixel_weighted() && same_type_inputs(problem) &&
                     (problem.height * problem.width) % kVector == 0 && vector_readable(problem.pred, problem) &&
                     (problem.separable_target() || vector_readable(problem.target, problem)) &&
                     (problem.teacher.data == nullptr || vector_readable(problem.teacher, problem)) &&
                     reinterpret_cast<uintptr_t>(problem.grad) % static_cast<uintptr_t>(grad_alignment) == 0;
  plan->workspace_bytes = plan->tiles.whole_plane() ? 0 : problem.planes() * plan->tiles.tiles() * 2 * value_bytes;
  return cudaSuccess;
}

cudaError_t heatmap_loss(const LossProblem& problem, const LossPlan& plan, void* workspace, cudaStream_t stream) {
  if (problem.planes() > 0) {
    cudaError_t error = cudaSuccess;
    switch (problem.stencil) {
      case Stencil::Forward: error = launch_loss_tiles<Stencil::Forward>(problem, plan, workspace, stream); break;
      case Stencil::Central: error = launch_loss_tiles<Stencil::Central>(problem, plan, workspace, stream); break;
      case Stencil::Sobel: error = launch_loss_tiles<Stencil::Sobel>(problem, plan, workspace, stream); break;
    }
    if (error != cudaSuccess) return error;
  }
  if (plan.tiles.whole_plane() && problem.reduction == Reduction::None) return cudaSuccess;
  return problem.accumulates_in_double() ? launch_finish<double>(problem, plan, workspace, stream)
                                         : launch_finish<float>(problem, plan, workspace, stream);
}

cudaError_t scale_gradient(void* grad, DType grad_dtype, const void* factors, bool factor_per_plane, int64_t planes,
                           int64_t plane_size, cudaStream_t stream) {
  if (planes * plane_size == 0) return cudaSuccess;
  switch (grad_dtype) {
    case DType::BFloat16:
      return launch_scale<__nv_bfloat16, float>(grad, factors, factor_per_plane, planes, plane_size, stream);
    case DType::Float: return launch_scale<float, float>(grad, factors, factor_per_plane, planes, plane_size, stream);
    case DType::Double: return launch_scale<double, double>(grad, factors, factor_per_plane, planes, plane_size, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace hgloss
