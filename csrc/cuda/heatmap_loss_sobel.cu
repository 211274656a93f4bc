// The loss kernels of the "sobel" stencil, in a file of their own so that nvcc builds the three
// stencils in parallel.
#include "heatmap_loss_kernel.cuh"

namespace hgloss {
namespace cuda {

template cudaError_t launch_loss_tiles<Stencil::Sobel>(const LossProblem&, const LossPlan&, void*, cudaStream_t);

}  // namespace cuda
}  // namespace hgloss
