// CUDA kernels of hgloss::heatmap_loss: raw pointers, no torch headers.
//
// One block of kThreads threads owns one tile of one plane (b, k). A plane whose D, Ax and Ay fit
// the shared-memory budget (tile_plan.h) is one tile: the block stages it whole. Larger planes are
// cut into tiles that stage D with a halo of 2 pixels and the maps with a ring of 1, so no block
// waits for another. The block works in three phases separated by barriers:
//   1. D = P - ((1 - a) G + a S) into shared memory, sum D^2 over the tile;
//   2. Ax, Ay over the tile and its ring into shared memory (0 where undefined, inside the plane
//      or not), sum Ax^2 + Ay^2 over the tile;
//   3. dL/dD = c w (2 mu/(H W) D + 2 lambda/(Nx+Ny) (Ax^T Ax + Ay^T Ay) D) over the tile,
//      gathered through the adjoint taps of stencil.h, written once.
// Per pixel the kernel reads P, G (and S) from global memory once, plus the halo for tiled
// planes, and writes dL/dD once; T, D, Ax and Ay only ever live in shared memory. A separable
// target has no G to read: phase 1 evaluates G[i, j] = float32(rows[i] * cols[j]) from the plane's
// H + W float64 factors, which stay in cache, so per pixel only P (and S) are read. The tile's sums
// are reduced in a fixed order inside the block. A whole-plane block writes the plane's terms
// directly; tiles write their partial sums, which finish_kernel adds in tile order. Nothing uses
// floating-point atomics, so results are bit-identical run to run.
//
// A per-pixel weight M has kernels of its own (the PixelWeighted flag), so the kernels without one
// are unchanged. M has a dtype of its own and any strides (stride 0 where broadcast), so these
// kernels read every input on the strided path with a per-load dtype switch. Phase 2 also reads M
// at each map cell it weighs (a defined Ax or Ay entry or a pixel of the tile, all inside the
// plane), stores M Ax and M Ay, and sums M (Ax^2 + Ay^2) and M D^2 over the tile, the latter in
// place of phase 1's sum of D^2; phase 3 gathers the weighted maps and weights the value part by
// M read again at the pixel. Per pixel such a block reads P, G (and S) once and M twice, the
// second time from a line it has just read, plus M on the ring of a tiled plane's tile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <type_traits>

#include "heatmap_loss_kernel.h"

namespace hgloss {
namespace cuda {

constexpr int kThreads = 256;
// Five blocks per multiprocessor is what shared memory allows for a COCO plane in float32
// (tile_plan.h); registers must not allow fewer.
constexpr int kMinBlocksPerMultiprocessor = 5;
// Pixels per thread per step on the vectorised path: 16 bytes of float32, 8 of half, 32 of double.
constexpr int kVector = 4;

template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T values[N];
};

template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(float x) {
  return static_cast<acc_t>(x);
}
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(double x) {
  return static_cast<acc_t>(x);
}
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__half x) {
  return static_cast<acc_t>(__half2float(x));
}
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__nv_bfloat16 x) {
  return static_cast<acc_t>(__bfloat162float(x));
}

template <typename out_t, typename acc_t>
__device__ __forceinline__ out_t from_acc(acc_t x) {
  if constexpr (std::is_same<out_t, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else {
    return static_cast<out_t>(x);
  }
}

// Inputs that share one storage type: typed loads, vectorisable.
template <typename in_t, typename acc_t_>
struct SameTypeInputs {
  using acc_t = acc_t_;
  using storage_t = in_t;
  static constexpr bool kVectorizable = true;
  __device__ static acc_t load(const InputView& in, int64_t offset) {
    return to_acc<acc_t>(static_cast<const in_t*>(in.data)[offset]);
  }
};

// Inputs of different storage types (say a bfloat16 pred and a float32 target): the type is
// switched on per load, a branch every thread of the grid takes the same way.
template <typename acc_t_>
struct MixedTypeInputs {
  using acc_t = acc_t_;
  static constexpr bool kVectorizable = false;
  __device__ static acc_t load(const InputView& in, int64_t offset) {
    switch (in.dtype) {
      case DType::Half: return to_acc<acc_t>(static_cast<const __half*>(in.data)[offset]);
      case DType::BFloat16: return to_acc<acc_t>(static_cast<const __nv_bfloat16*>(in.data)[offset]);
      case DType::Float: return to_acc<acc_t>(static_cast<const float*>(in.data)[offset]);
      default: return to_acc<acc_t>(static_cast<const double*>(in.data)[offset]);
    }
  }
};

// What the loss kernel needs, with the scalars already in the accumulation dtype.
template <typename acc_t>
struct LossKernelArgs {
  InputView pred, target, teacher;
  InputView pixel_weight;     // M as (B, K, H, W); read by the pixel-weighted kernels only
  const double* target_rows;  // (B*K, H) factors of a separable target, else null
  const double* target_cols;  // (B*K, W)
  const acc_t* alpha;         // (B,), with a teacher
  const acc_t* weight;        // (B*K,) or null
  int64_t joints, height, width;
  acc_t value_scale;  // mse_weight / (H W)
  acc_t map_scale;    // grad_weight / (Nx + Ny), 0 when Nx + Ny = 0
  acc_t grad_scale;   // 1 / (B K) for "mean", else 1: dL/dD is for an upstream gradient of 1
  void* grad;         // contiguous (B*K*H*W,) in out_t, or null
  acc_t* terms;
  acc_t* plane_losses;
  acc_t* partials;  // (B*K*tiles, 2) sums of D^2 and of Ax^2 + Ay^2 per tile, when tiled
  TilePlan plan;
};

// Where phase 1 gets G: the kernel's Target, one of the two policies below. A template parameter
// rather than a branch, so that the kernels of a target tensor stay as they were. at(row, col)
// serves the strided path; vector_at(n) gives the vectorised path pixels n .. n + kVector - 1 of
// a whole plane, as values that to_acc converts, and kUnroll is how many of its steps that path
// interleaves within the register budget of __launch_bounds__.

// G read from the target tensor, through the inputs' loads.
template <class Inputs>
struct TensorTarget {
  using acc_t = typename Inputs::acc_t;
  static constexpr int kUnroll = 2;  // two steps' 16-byte loads in flight
  const InputView& view;
  int64_t base;       // offset of plane (b, k), for at
  const void* plane;  // its first element, for vector_at; null for inputs of mixed types

  __device__ TensorTarget(const LossKernelArgs<acc_t>& args, int64_t b, int64_t k)
      : view(args.target), base(b * view.stride_b + k * view.stride_k), plane(plane_start(view, b, k)) {}

  __device__ acc_t at(int64_t row, int64_t col) const {
    return Inputs::load(view, base + row * view.stride_h + col * view.stride_w);
  }

  __device__ auto vector_at(int n) const {
    using in_t = typename Inputs::storage_t;
    return *reinterpret_cast<const Packed<in_t, kVector>*>(static_cast<const in_t*>(plane) + n);
  }

 private:
  __device__ static const void* plane_start(const InputView& view, int64_t b, int64_t k) {
    if constexpr (Inputs::kVectorizable) {
      return static_cast<const typename Inputs::storage_t*>(view.data) + b * view.stride_b + k * view.stride_k;
    } else {
      return nullptr;  // inputs of mixed types are never read vectorised
    }
  }
};

// G of a separable target, evaluated from the plane's factors: no target tensor is read. The
// product is taken in double and rounded to float32, as the pose codecs store their heatmaps;
// handing out these float32 values lets every path convert them exactly as it converts a float32
// target tensor, so that both give the same bits.
template <class Inputs>
struct SeparableTarget {
  using acc_t = typename Inputs::acc_t;
  static constexpr int kUnroll = 1;  // eight float64 loads a step already; two steps would spill
  const double* rows;                // the plane's H row factors
  const double* cols;                // its W column factors
  int width;

  __device__ SeparableTarget(const LossKernelArgs<acc_t>& args, int64_t b, int64_t k)
      : rows(args.target_rows + (b * args.joints + k) * args.height),
        cols(args.target_cols + (b * args.joints + k) * args.width),
        width(static_cast<int>(args.width)) {}

  __device__ acc_t at(int64_t row, int64_t col) const { return to_acc<acc_t>(product(rows[row], cols[col])); }

  // Only the plane's size is a multiple of kVector, so the pixels may wrap a row (or several, in
  // a plane narrower than kVector). One division per kVector pixels.
  __device__ Packed<float, kVector> vector_at(int n) const {
    int row = n / width, col = n - row * width;
    Packed<float, kVector> g;
#pragma unroll
    for (int e = 0; e < kVector; ++e) {
      g.values[e] = product(rows[row], cols[col]);
      if (++col == width) {
        col = 0;
        ++row;
      }
    }
    return g;
  }

 private:
  __device__ static float product(double row_factor, double col_factor) {
    return static_cast<float>(row_factor * col_factor);
  }
};

// M at the pixels of plane (b, k), for the pixel-weighted kernels. M's dtype need not be any other
// input's, so each load switches on it, as MixedTypeInputs does.
template <typename acc_t>
struct PlanePixelWeight {
  const InputView& view;
  int64_t base;  // offset of plane (b, k)

  __device__ PlanePixelWeight(const InputView& view, int64_t b, int64_t k)
      : view(view), base(b * view.stride_b + k * view.stride_k) {}

  __device__ acc_t at(int64_t row, int64_t col) const {
    return MixedTypeInputs<acc_t>::load(view, base + row * view.stride_h + col * view.stride_w);
  }
};

// Calls visit(row, col) for the cells of a rows x cols block that this thread owns: cells
// first, first + step, ... in row-major order. One division to start, none per cell.
template <typename Visit>
__device__ __forceinline__ void for_each_cell(int rows, int cols, int first, int step, Visit&& visit) {
  int row = first / cols, col = first % cols;
  const int step_rows = step / cols, step_cols = step % cols;
  while (row < rows) {
    visit(row, col);
    row += step_rows;
    col += step_cols;
    if (col >= cols) {
      col -= cols;
      ++row;
    }
  }
}

// Two sums over a block of Threads threads, in a fixed order; the results are valid in thread 0.
template <int Threads, typename acc_t>
__device__ __forceinline__ void block_sum2(acc_t& first, acc_t& second) {
  static_assert(Threads % 32 == 0 && Threads <= 1024, "whole warps, at most 32 of them");
  __shared__ acc_t warp_sums[2][Threads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    first += __shfl_down_sync(0xffffffffu, first, offset);
    second += __shfl_down_sync(0xffffffffu, second, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_sums[0][warp] = first;
    warp_sums[1][warp] = second;
  }
  __syncthreads();
  if (warp == 0) {
    first = lane < Threads / 32 ? warp_sums[0][lane] : acc_t(0);
    second = lane < Threads / 32 ? warp_sums[1][lane] : acc_t(0);
    for (int offset = 16; offset > 0; offset /= 2) {
      first += __shfl_down_sync(0xffffffffu, first, offset);
      second += __shfl_down_sync(0xffffffffu, second, offset);
    }
  }
}

// A rectangle of plane positions in a block's local coordinates (0-based, clipped to
// [0, limit]), tested with two unsigned compares: the per-cell loops below avoid 64-bit
// arithmetic.
struct LocalRange {
  int row0, rows, col0, cols;

  __device__ LocalRange(const ValidRange& range, int64_t origin_row, int64_t origin_col, int row_limit,
                        int col_limit) {
    const int64_t first_row = clip(range.row_begin - origin_row, row_limit);
    const int64_t first_col = clip(range.col_begin - origin_col, col_limit);
    row0 = static_cast<int>(first_row);
    col0 = static_cast<int>(first_col);
    rows = static_cast<int>(max(clip(range.row_end - origin_row, row_limit) - first_row, int64_t(0)));
    cols = static_cast<int>(max(clip(range.col_end - origin_col, col_limit) - first_col, int64_t(0)));
  }

  __device__ bool contains(int row, int col) const {
    return static_cast<unsigned>(row - row0) < static_cast<unsigned>(rows) &&
           static_cast<unsigned>(col - col0) < static_cast<unsigned>(cols);
  }

 private:
  __device__ static int64_t clip(int64_t value, int limit) { return min(max(value, int64_t(0)), int64_t(limit)); }
};

// Phase 1 on any layout: D over the staged region, element by element through the strides.
template <class Inputs, template <class> class Target, bool HasTeacher>
__device__ typename Inputs::acc_t stage_difference(const LossKernelArgs<typename Inputs::acc_t>& args,
                                                   const TileGeometry& tile, int64_t b, int64_t k,
                                                   typename Inputs::acc_t alpha, typename Inputs::acc_t* diff) {
  using acc_t = typename Inputs::acc_t;
  const int64_t pred_base = b * args.pred.stride_b + k * args.pred.stride_k;
  const Target<Inputs> target(args, b, k);
  const int64_t teacher_base = HasTeacher ? b * args.teacher.stride_b + k * args.teacher.stride_k : 0;
  const LocalRange owned(ValidRange{tile.row0, tile.row0 + tile.rows, tile.col0, tile.col0 + tile.cols}, tile.diff_row0,
                         tile.diff_col0, tile.diff_rows, tile.diff_cols);
  acc_t sum_d2 = 0;
  for_each_cell(tile.diff_rows, tile.diff_cols, threadIdx.x, kThreads, [&](int r, int c) {
    const int64_t row = tile.diff_row0 + r, col = tile.diff_col0 + c;
    const acc_t pred = Inputs::load(args.pred, pred_base + row * args.pred.stride_h + col * args.pred.stride_w);
    acc_t soft_target = target.at(row, col);
    if constexpr (HasTeacher) {
      const acc_t teacher =
          Inputs::load(args.teacher, teacher_base + row * args.teacher.stride_h + col * args.teacher.stride_w);
      soft_target = (acc_t(1) - alpha) * soft_target + alpha * teacher;
    }
    const acc_t d = pred - soft_target;
    diff[r * tile.diff_cols + c] = d;
    if (owned.contains(r, c)) sum_d2 += d * d;
  });
  return sum_d2;
}

// Phase 1 on a whole contiguous plane whose base is aligned: kVector pixels per load.
template <class Inputs, template <class> class Target, bool HasTeacher>
__device__ typename Inputs::acc_t stage_difference_vectorized(const LossKernelArgs<typename Inputs::acc_t>& args,
                                                              int64_t b, int64_t k, typename Inputs::acc_t alpha,
                                                              typename Inputs::acc_t* diff) {
  using acc_t = typename Inputs::acc_t;
  using in_t = typename Inputs::storage_t;
  using Vec = Packed<in_t, kVector>;
  const int size = static_cast<int>(args.height * args.width);
  const in_t* pred = static_cast<const in_t*>(args.pred.data) + b * args.pred.stride_b + k * args.pred.stride_k;
  const Target<Inputs> target(args, b, k);
  const in_t* teacher =
      HasTeacher ? static_cast<const in_t*>(args.teacher.data) + b * args.teacher.stride_b + k * args.teacher.stride_k
                 : nullptr;
  acc_t sum_d2 = 0;
  constexpr int kUnroll = Target<Inputs>::kUnroll;
#pragma unroll kUnroll
  for (int n = threadIdx.x * kVector; n < size; n += kThreads * kVector) {
    const Vec p = *reinterpret_cast<const Vec*>(pred + n);
    const auto g = target.vector_at(n);
    Vec s;
    if constexpr (HasTeacher) s = *reinterpret_cast<const Vec*>(teacher + n);
    Packed<acc_t, kVector> d;
#pragma unroll
    for (int e = 0; e < kVector; ++e) {
      acc_t soft_target = to_acc<acc_t>(g.values[e]);
      if constexpr (HasTeacher) soft_target = (acc_t(1) - alpha) * soft_target + alpha * to_acc<acc_t>(s.values[e]);
      d.values[e] = to_acc<acc_t>(p.values[e]) - soft_target;
      sum_d2 += d.values[e] * d.values[e];
    }
    if constexpr (sizeof(acc_t) == 4) {
      *reinterpret_cast<Packed<acc_t, kVector>*>(diff + n) = d;  // n % kVector == 0: 16-byte aligned
    } else {
#pragma unroll
      for (int e = 0; e < kVector; ++e) diff[n + e] = d.values[e];
    }
  }
  return sum_d2;
}

// Phase 2: Ax and Ay over the tile and its ring, in map coordinates (origin one pixel up and left
// of the tile); 0 outside their valid ranges, which includes the ring cells outside the plane,
// so phase 3 gathers without bounds checks. Returns the tile's sum of Ax^2 + Ay^2.
//
// PixelWeighted: stores M Ax and M Ay instead, returns the sum of M (Ax^2 + Ay^2), and replaces
// `sum_d2` (phase 1's sum of D^2 over the tile) by the sum of M D^2, M taken at each map cell's
// own pixel. M is read only at the cells it weighs, a defined map entry or an owned pixel, which
// all lie inside the plane: the ring cells outside it hold zero maps and own no pixel.
template <Stencil S, bool PixelWeighted, typename acc_t>
__device__ acc_t stage_gradient_maps(const TileGeometry& tile, int64_t height, int64_t width, const acc_t* diff,
                                     const PlanePixelWeight<acc_t>& pixel_weight, acc_t* map_x, acc_t* map_y,
                                     acc_t& sum_d2) {
  const int64_t map_row0 = tile.row0 - kMapRing, map_col0 = tile.col0 - kMapRing;
  const LocalRange x_valid(x_range<S>(height, width), map_row0, map_col0, tile.map_rows, tile.map_cols);
  const LocalRange y_valid(y_range<S>(height, width), map_row0, map_col0, tile.map_rows, tile.map_cols);
  const LocalRange owned(ValidRange{tile.row0, tile.row0 + tile.rows, tile.col0, tile.col0 + tile.cols}, map_row0,
                         map_col0, tile.map_rows, tile.map_cols);
  const int diff_cols = tile.diff_cols, map_cols = tile.map_cols;
  // Index in the staged D of map cell (0, 0); with valid taps the sums only read inside D.
  const int diff_origin = static_cast<int>((map_row0 - tile.diff_row0) * diff_cols + (map_col0 - tile.diff_col0));
  acc_t sum_map2 = 0, weighted_sum_d2 = 0;
  for_each_cell(tile.map_rows, map_cols, threadIdx.x, kThreads, [&](int r, int c) {
    const int centre = diff_origin + r * diff_cols + c;
    acc_t ax = 0, ay = 0;
    if (x_valid.contains(r, c)) {
      for_each_tap<S, true>([&](int u, int v, double tap) { ax += acc_t(tap) * diff[centre + u * diff_cols + v]; });
    }
    if (y_valid.contains(r, c)) {
      for_each_tap<S, false>([&](int u, int v, double tap) { ay += acc_t(tap) * diff[centre + u * diff_cols + v]; });
    }
    if constexpr (PixelWeighted) {
      const bool x_defined = x_valid.contains(r, c), y_defined = y_valid.contains(r, c);
      const bool is_owned = owned.contains(r, c);
      const acc_t m = x_defined || y_defined || is_owned ? pixel_weight.at(map_row0 + r, map_col0 + c) : acc_t(0);
      // M weighs only the entries defined at the cell, as in the reference: a NaN or Inf in M
      // must not turn the zero of an undefined entry into a NaN that phase 3 would gather.
      const acc_t weighted_ax = x_defined ? m * ax : acc_t(0);
      const acc_t weighted_ay = y_defined ? m * ay : acc_t(0);
      map_x[r * map_cols + c] = weighted_ax;
      map_y[r * map_cols + c] = weighted_ay;
      if (is_owned) {  // an owned cell is a tile pixel, so its D is staged at `centre`
        const acc_t d = diff[centre];
        weighted_sum_d2 += m * (d * d);
        sum_map2 += weighted_ax * ax + weighted_ay * ay;
      }
    } else {
      map_x[r * map_cols + c] = ax;
      map_y[r * map_cols + c] = ay;
      if (owned.contains(r, c)) sum_map2 += ax * ax + ay * ay;
    }
  });
  if constexpr (PixelWeighted) sum_d2 = weighted_sum_d2;
  return sum_map2;
}

// Phase 3 at one pixel of the tile, (r, c) in tile coordinates: value_coef D + map_coef (A^T A D).
// `diff_origin` is the index in the staged D of the tile's first pixel.
template <Stencil S, typename acc_t>
__device__ __forceinline__ acc_t gradient_at(const TileGeometry& tile, int diff_origin, int r, int c,
                                             const acc_t* diff, const acc_t* map_x, const acc_t* map_y,
                                             acc_t value_coef, acc_t map_coef) {
  const int map_cols = tile.map_cols;
  const int map_centre = (r + static_cast<int>(kMapRing)) * map_cols + c + static_cast<int>(kMapRing);
  acc_t back = 0;
  for_each_tap<S, true>([&](int u, int v, double tap) { back += acc_t(tap) * map_x[map_centre - u * map_cols - v]; });
  for_each_tap<S, false>([&](int u, int v, double tap) { back += acc_t(tap) * map_y[map_centre - u * map_cols - v]; });
  return value_coef * diff[diff_origin + r * tile.diff_cols + c] + map_coef * back;
}

// PixelWeighted: with a pixel weight M, which only the strided path reads.
template <Stencil S, class Inputs, template <class> class Target, typename out_t, bool Vectorized, bool PixelWeighted>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerMultiprocessor) heatmap_loss_kernel(const LossKernelArgs<typename Inputs::acc_t> args) {
  static_assert(!(Vectorized && PixelWeighted), "a pixel weight is read on the strided path only");
  using acc_t = typename Inputs::acc_t;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const TilePlan& plan = args.plan;
  acc_t* diff = reinterpret_cast<acc_t*>(shared_bytes);
  acc_t* map_x = diff + plan.diff_rows * plan.diff_cols;
  acc_t* map_y = map_x + plan.map_rows * plan.map_cols;

  const int64_t work = blockIdx.x;
  const int64_t plane = work / plan.tiles(), tile_index = work % plan.tiles();
  const int64_t b = plane / args.joints, k = plane % args.joints;
  const int64_t height = args.height, width = args.width;
  const TileGeometry tile(plan, tile_index, height, width);
  const bool has_teacher = args.teacher.data != nullptr;
  const acc_t alpha = has_teacher ? args.alpha[b] : acc_t(0);
  const acc_t weight = args.weight != nullptr ? args.weight[plane] : acc_t(1);
  const PlanePixelWeight<acc_t> pixel_weight(args.pixel_weight, b, k);

  acc_t sum_d2;
  if constexpr (Vectorized) {
    sum_d2 = has_teacher ? stage_difference_vectorized<Inputs, Target, true>(args, b, k, alpha, diff)
                         : stage_difference_vectorized<Inputs, Target, false>(args, b, k, alpha, diff);
  } else {
    sum_d2 = has_teacher ? stage_difference<Inputs, Target, true>(args, tile, b, k, alpha, diff)
                         : stage_difference<Inputs, Target, false>(args, tile, b, k, alpha, diff);
  }
  __syncthreads();
  acc_t sum_map2 = stage_gradient_maps<S, PixelWeighted>(tile, height, width, diff, pixel_weight, map_x, map_y, sum_d2);
  __syncthreads();

  if (args.grad != nullptr) {
    const acc_t plane_scale = args.grad_scale * weight;
    const acc_t value_coef = 2 * args.value_scale * plane_scale, map_coef = 2 * args.map_scale * plane_scale;
    out_t* grad = static_cast<out_t*>(args.grad) + plane * height * width;
    const int diff_origin =
        static_cast<int>((tile.row0 - tile.diff_row0) * tile.diff_cols + (tile.col0 - tile.diff_col0));
    if constexpr (Vectorized) {
      // The whole plane, flat: kVector consecutive pixels per store, which may wrap a row.
      const int cols = static_cast<int>(width);
      for_each_cell(static_cast<int>(height), cols, threadIdx.x * kVector, kThreads * kVector, [&](int r, int c) {
        const int first = r * cols + c;
        Packed<out_t, kVector> out;
#pragma unroll
        for (int e = 0; e < kVector; ++e) {
          out.values[e] = from_acc<out_t>(gradient_at<S>(tile, diff_origin, r, c, diff, map_x, map_y, value_coef, map_coef));
          if (++c == cols) {
            c = 0;
            ++r;
          }
        }
        *reinterpret_cast<Packed<out_t, kVector>*>(grad + first) = out;
      });
    } else {
      for_each_cell(tile.rows, tile.cols, threadIdx.x, kThreads, [&](int r, int c) {
        acc_t pixel_value_coef = value_coef;
        // The maps are weighted already (phase 2); the value part takes M at the pixel.
        if constexpr (PixelWeighted) pixel_value_coef *= pixel_weight.at(tile.row0 + r, tile.col0 + c);
        grad[(tile.row0 + r) * width + tile.col0 + c] = from_acc<out_t>(
            gradient_at<S>(tile, diff_origin, r, c, diff, map_x, map_y, pixel_value_coef, map_coef));
      });
    }
  }

  block_sum2<kThreads>(sum_d2, sum_map2);
  if (threadIdx.x == 0) {
    if (plan.whole_plane()) {
      const acc_t terms = args.value_scale * sum_d2 + args.map_scale * sum_map2;
      args.terms[plane] = terms;
      args.plane_losses[plane] = weight * terms;
    } else {
      args.partials[2 * work] = sum_d2;
      args.partials[2 * work + 1] = sum_map2;
    }
  }
}

// mse_weight / (H W) and grad_weight / (Nx + Ny) (0 when Nx + Ny = 0) in the accumulation
// dtype. The loss kernel and the final pass both use these, so whole and tiled planes agree.
template <typename acc_t>
void plane_scales(const LossProblem& problem, acc_t* value_scale, acc_t* map_scale) {
  const int64_t height = problem.height, width = problem.width;
  int64_t grad_count = 0;
  switch (problem.stencil) {
    case Stencil::Forward: grad_count = gradient_count<Stencil::Forward>(height, width); break;
    case Stencil::Central: grad_count = gradient_count<Stencil::Central>(height, width); break;
    case Stencil::Sobel: grad_count = gradient_count<Stencil::Sobel>(height, width); break;
  }
  *value_scale = static_cast<acc_t>(problem.mse_weight) / static_cast<acc_t>(height * width);
  *map_scale = grad_count > 0 ? static_cast<acc_t>(problem.grad_weight) / static_cast<acc_t>(grad_count) : acc_t(0);
}

template <Stencil S, class Inputs, template <class> class Target, typename out_t, bool PixelWeighted = false>
cudaError_t launch_loss_kernel(const LossProblem& problem, const LossPlan& plan, void* partials,
                               cudaStream_t stream) {
  using acc_t = typename Inputs::acc_t;
  LossKernelArgs<acc_t> args;
  args.pred = problem.pred;
  args.target = problem.target;
  args.teacher = problem.teacher;
  args.pixel_weight = problem.pixel_weight;
  args.target_rows = problem.target_rows;
  args.target_cols = problem.target_cols;
  args.alpha = static_cast<const acc_t*>(problem.alpha);
  args.weight = static_cast<const acc_t*>(problem.weight);
  args.joints = problem.joints;
  args.height = problem.height;
  args.width = problem.width;
  plane_scales(problem, &args.value_scale, &args.map_scale);
  args.grad_scale =
      problem.reduction == Reduction::Mean ? acc_t(1) / static_cast<acc_t>(problem.planes()) : acc_t(1);
  args.grad = problem.grad;
  args.terms = static_cast<acc_t*>(problem.terms);
  args.plane_losses = static_cast<acc_t*>(problem.plane_losses);
  args.partials = static_cast<acc_t*>(partials);
  args.plan = plan.tiles;

  const int64_t blocks = problem.planes() * plan.tiles.tiles();
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  void (*kernel)(LossKernelArgs<acc_t>) = heatmap_loss_kernel<S, Inputs, Target, out_t, false, PixelWeighted>;
  if constexpr (Inputs::kVectorizable && !PixelWeighted) {
    if (plan.vectorized) kernel = heatmap_loss_kernel<S, Inputs, Target, out_t, true, false>;
  }
  const size_t shared = static_cast<size_t>(plan.tiles.shared_bytes);
  if (shared > 48 * 1024) {
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (error != cudaSuccess) return error;
  }
  kernel<<<static_cast<unsigned int>(blocks), kThreads, shared, stream>>>(args);
  return cudaGetLastError();
}

// Whether pred, the target and the teacher share one storage type, which the kernel then loads
// typed (and, on whole aligned planes, vectorised). plan_heatmap_loss and launch_loss_tiles agree.
inline bool same_type_inputs(const LossProblem& problem) {
  const DType pred = problem.pred.dtype;
  return problem.target_dtype() == pred && (problem.teacher.data == nullptr || problem.teacher.dtype == pred);
}

// The kernels for inputs of different storage types: the accumulation and gradient dtypes follow pred.
template <Stencil S, template <class> class Target, bool PixelWeighted = false>
cudaError_t launch_mixed_type(const LossProblem& problem, const LossPlan& plan, void* partials, cudaStream_t stream) {
  switch (problem.pred.dtype) {
    case DType::Double:
      return launch_loss_kernel<S, MixedTypeInputs<double>, Target, double, PixelWeighted>(problem, plan, partials,
                                                                                            stream);
    case DType::BFloat16:
      return launch_loss_kernel<S, MixedTypeInputs<float>, Target, __nv_bfloat16, PixelWeighted>(problem, plan,
                                                                                                 partials, stream);
    default:
      return launch_loss_kernel<S, MixedTypeInputs<float>, Target, float, PixelWeighted>(problem, plan, partials,
                                                                                          stream);
  }
}

// Launches the loss kernel for stencil S on every tile of every plane, picking the kernel for the
// inputs' dtypes and the target's form. Instantiated once per stencil, in heatmap_loss_<stencil>.cu,
// so that the three compile in parallel.
template <Stencil S>
cudaError_t launch_loss_tiles(const LossProblem& problem, const LossPlan& plan, void* partials, cudaStream_t stream) {
  if (problem.pixel_weighted()) {
    // M's loads switch on its dtype, so the other inputs' loads may as well: one kernel per pred
    // dtype and target form, whatever the dtypes of the target, teacher and M.
    return problem.separable_target() ? launch_mixed_type<S, SeparableTarget, true>(problem, plan, partials, stream)
                                      : launch_mixed_type<S, TensorTarget, true>(problem, plan, partials, stream);
  }
  const bool same_type = same_type_inputs(problem);
  if (problem.separable_target()) {
    // Its values are float32 (LossProblem::target_dtype): only a float32 pred (and teacher) shares their type.
    if (!same_type) return launch_mixed_type<S, SeparableTarget>(problem, plan, partials, stream);
    return launch_loss_kernel<S, SameTypeInputs<float, float>, SeparableTarget, float>(problem, plan, partials, stream);
  }
  if (same_type) {
    switch (problem.pred.dtype) {
      case DType::Half:
        return launch_loss_kernel<S, SameTypeInputs<__half, float>, TensorTarget, float>(problem, plan, partials,
                                                                                         stream);
      case DType::BFloat16:
        return launch_loss_kernel<S, SameTypeInputs<__nv_bfloat16, float>, TensorTarget, __nv_bfloat16>(
            problem, plan, partials, stream);
      case DType::Float:
        return launch_loss_kernel<S, SameTypeInputs<float, float>, TensorTarget, float>(problem, plan, partials,
                                                                                        stream);
      case DType::Double:
        return launch_loss_kernel<S, SameTypeInputs<double, double>, TensorTarget, double>(problem, plan, partials,
                                                                                           stream);
    }
  }
  return launch_mixed_type<S, TensorTarget>(problem, plan, partials, stream);
}

}  // namespace cuda
}  // namespace hgloss
