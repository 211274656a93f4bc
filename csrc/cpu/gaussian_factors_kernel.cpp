// CPU kernel of hgloss::gaussian_factors: the separable Gaussian targets of keypoints
// (docs/spec.md section 7) as the (B, K, H) and (B, K, W) float64 factors hgloss::heatmap_loss
// takes, and which planes' windows reach the heatmap.
//
// One pass over the planes: a plane writes only its window (2 int(3 sigma) + 1 values per
// axis) into zeroed factors. With the MSRA encoding every peak sits on a pixel, so the window's
// values are the same for every plane and are computed once per call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <sstream>
#include <vector>

#include "../heatmap_loss.h"
#include "hgloss/gaussian_target.h"

namespace hgloss {
namespace {

void check_gaussian_factors_arguments(const at::Tensor& keypoints, const std::optional<at::Tensor>& weights,
                                      int64_t height, int64_t width, double sigma, c10::string_view encoding) {
  check_dtype(keypoints, "keypoints");
  TORCH_CHECK_VALUE(keypoints.dim() == 3 && keypoints.size(2) == 2, "keypoints must have shape (B, K, 2), got shape ",
                    shape_string(keypoints.sizes()));
  if (weights) {
    check_dtype(*weights, "keypoint_weights");
    TORCH_CHECK_VALUE(weights->numel() == keypoints.size(0) * keypoints.size(1) && weights->dim() >= 2 &&
                          weights->size(0) == keypoints.size(0) && weights->size(1) == keypoints.size(1),
                      "keypoint_weights shape ", shape_string(weights->sizes()), " does not match keypoints shape ",
                      shape_string(keypoints.sizes()));
    TORCH_CHECK_VALUE(weights->device() == keypoints.device(), "all tensors must be on one device, got keypoints on ",
                      keypoints.device(), ", keypoint_weights on ", weights->device());
  }
  TORCH_CHECK_VALUE(height >= 1 && width >= 1, "height and width must be >= 1, got ", height, " and ", width);
  TORCH_CHECK_VALUE(sigma > 0 && std::isfinite(sigma), "sigma must be a positive finite number, got ",
                    float_string(sigma));
  TORCH_CHECK_VALUE(encoding == "msra" || encoding == "udp", "unknown encoding '", std::string(encoding),
                    "'; expected one of ['msra', 'udp']");
}

// hgloss.targets.check_finite_where_weighted, with its message.
void check_finite_where_weighted(const double* keypoints, const double* weights, int64_t planes, int64_t joints) {
  std::vector<int64_t> bad;
  for (int64_t plane = 0; plane < planes && bad.size() < 5; ++plane) {
    const bool weighted = weights == nullptr || weights[plane] != 0;
    if (weighted && !(std::isfinite(keypoints[2 * plane]) && std::isfinite(keypoints[2 * plane + 1]))) {
      bad.push_back(plane);
    }
  }
  if (bad.empty()) return;
  std::ostringstream listed;
  for (size_t n = 0; n < bad.size(); ++n) listed << (n ? ", " : "") << "(" << bad[n] / joints << ", " << bad[n] % joints << ")";
  TORCH_CHECK_VALUE(false, "keypoints must be finite where the keypoint weight is not 0; (b, k) = [", listed.str(),
                    "] are not");
}

// factors[begin, end) of one axis: the window's values, from the per-call table when the peak
// is on a pixel (MSRA), else computed.
void write_axis(const GaussianAxis& axis, const std::vector<double>& table, long long radius, double two_sigma_squared,
                bool exact_peak, double* factors) {
  for (long long pixel = axis.begin; pixel < axis.end; ++pixel) {
    factors[pixel] = exact_peak ? gaussian_factor(pixel, axis.peak, two_sigma_squared)
                                : table[static_cast<size_t>(pixel - static_cast<long long>(axis.peak) + radius)];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_factors_cpu(const at::Tensor& keypoints,
                                                                    const std::optional<at::Tensor>& weights,
                                                                    int64_t height, int64_t width, double sigma,
                                                                    c10::string_view encoding) {
  check_gaussian_factors_arguments(keypoints, weights, height, width, sigma, encoding);
  const int64_t batch = keypoints.size(0), joints = keypoints.size(1), planes = batch * joints;
  const at::Tensor points = keypoints.to(at::kDouble).contiguous();
  const at::Tensor plane_weights = weights ? weights->to(at::kDouble).reshape({batch, joints}).contiguous() : at::Tensor();
  const double* weight = weights ? plane_weights.data_ptr<double>() : nullptr;
  check_finite_where_weighted(points.data_ptr<double>(), weight, planes, joints);

  const auto options = keypoints.options().dtype(at::kDouble);
  at::Tensor rows = at::zeros({batch, joints, height}, options);
  at::Tensor cols = at::zeros({batch, joints, width}, options);
  at::Tensor reaches = at::empty({batch, joints}, options);
  const bool exact_peak = encoding == "udp";
  const long long radius = static_cast<long long>(3.0 * sigma);
  const double two_sigma_squared = 2.0 * (sigma * sigma);
  std::vector<double> table;
  if (!exact_peak) {
    for (long long offset = -radius; offset <= radius; ++offset) table.push_back(gaussian_factor(offset, 0.0, two_sigma_squared));
  }
  const double* point = points.data_ptr<double>();
  double* row_factors = rows.data_ptr<double>();
  double* col_factors = cols.data_ptr<double>();
  double* reached = reaches.data_ptr<double>();
  at::parallel_for(0, planes, 64, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      // Keypoints of weight-0 planes may be anything (NaN for a missing joint): never read.
      const bool painted = weight == nullptr || weight[plane] != 0;
      const double x = painted ? point[2 * plane] : 0.0, y = painted ? point[2 * plane + 1] : 0.0;
      const GaussianAxis along_x = gaussian_axis(x, width, radius, exact_peak);
      const GaussianAxis along_y = gaussian_axis(y, height, radius, exact_peak);
      const bool reach = along_x.reaches && along_y.reaches;
      reached[plane] = reach ? 1.0 : 0.0;
      if (!(reach && painted)) continue;
      write_axis(along_x, table, radius, two_sigma_squared, exact_peak, col_factors + plane * width);
      write_axis(along_y, table, radius, two_sigma_squared, exact_peak, row_factors + plane * height);
    }
  });
  return {rows, cols, reaches};
}

}  // namespace

TORCH_LIBRARY_IMPL(hgloss, CPU, m) { m.impl("gaussian_factors", &gaussian_factors_cpu); }

}  // namespace hgloss
