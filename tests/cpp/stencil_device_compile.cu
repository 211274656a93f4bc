// Compile-only check that hgloss/stencil.h is valid device code: the CUDA kernels share it with
// the CPU kernel, and a host-only construct in it would otherwise surface only in a CUDA build of
// the extension. Built as a CMake OBJECT library; nothing links or launches this kernel.
#include "hgloss/stencil.h"

namespace hgloss_device_compile {

template <typename T>
struct PlaneView {
  const T* data;
  long long width;
  __device__ T operator()(long long r, long long c) const { return data[r * width + c]; }
};

// Sums every entry point so none of them can be discarded as dead code before codegen.
template <hgloss::Stencil S, typename T>
__device__ T exercise(const PlaneView<T>& plane, const PlaneView<T>& map, long long height,
                      long long width, long long i, long long j) {
  const hgloss::ValidRange xr = hgloss::x_range<S>(height, width);
  const hgloss::ValidRange yr = hgloss::y_range<S>(height, width);
  T sum = hgloss::apply_at<S, true, T>(plane, i, j) + hgloss::apply_at<S, false, T>(plane, i, j);
  sum += hgloss::adjoint_at<S, true, T>(map, xr, i, j) + hgloss::adjoint_at<S, false, T>(map, yr, i, j);
  return sum + T(hgloss::gradient_count<S>(height, width));
}

template <typename T>
__global__ void stencil_kernel(const T* d, const T* y, T* out, long long height, long long width) {
  const long long i = blockIdx.y;
  const long long j = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= height || j >= width) return;
  const PlaneView<T> plane{d, width};
  const PlaneView<T> map{y, width};
  out[i * width + j] = exercise<hgloss::Stencil::Forward>(plane, map, height, width, i, j) +
                       exercise<hgloss::Stencil::Central>(plane, map, height, width, i, j) +
                       exercise<hgloss::Stencil::Sobel>(plane, map, height, width, i, j);
}

template __global__ void stencil_kernel<float>(const float*, const float*, float*, long long, long long);
template __global__ void stencil_kernel<double>(const double*, const double*, double*, long long,
                                                long long);

}  // namespace hgloss_device_compile
