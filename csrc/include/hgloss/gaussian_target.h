// The Gaussian heatmap target of a keypoint along one axis (docs/spec.md section 7), the rule of
// the codecs of hgloss.pose.codecs: a window of int(3 sigma) pixels on either side of the rounded
// keypoint int(x + 0.5) (truncated towards zero, as Python's int), clipped to the axis, with the
// Gaussian peaking at the rounded position (MSRA) or at the keypoint itself (UDP). A target plane
// is the product of its row and column factors, rounded to float32.
//
// No torch and no STL, so that host and device code can share it. hgloss/targets.py states the
// same rule in PyTorch for the reference backend; tests/test_keypoint_loss.py checks both
// against the codecs.
#pragma once

#include <math.h>

#include "stencil.h"  // HGLOSS_HOST_DEVICE

namespace hgloss {

struct GaussianAxis {
  double peak;               // where the Gaussian peaks
  long long begin, end;      // the painted pixels [begin, end), clipped to the axis
  bool reaches;              // the window (start < size and exclusive end >= 0): the codecs' weight rule
};

// `radius` is int(3 sigma); `exact_peak` is UDP's peak at the keypoint rather than the rounded one.
// A position of any size (1e300 included) is compared as a double, so nothing overflows.
HGLOSS_HOST_DEVICE GaussianAxis gaussian_axis(double position, long long size, long long radius, bool exact_peak) {
  const double rounded = trunc(position + 0.5);
  const double start = rounded - static_cast<double>(radius), stop = rounded + static_cast<double>(radius) + 1.0;
  GaussianAxis axis;
  axis.reaches = start < static_cast<double>(size) && stop >= 0.0;
  axis.begin = axis.reaches ? static_cast<long long>(start > 0.0 ? start : 0.0) : 0;
  axis.end = axis.reaches ? static_cast<long long>(stop < static_cast<double>(size) ? stop : static_cast<double>(size)) : 0;
  axis.peak = exact_peak ? position : rounded;
  return axis;
}

// exp(-(pixel - peak)^2 / two_sigma_squared), two_sigma_squared = 2 * (sigma * sigma), in the
// order of operations the codecs use, so that the values agree to the last bit of a correctly
// rounded exp.
HGLOSS_HOST_DEVICE double gaussian_factor(long long pixel, double peak, double two_sigma_squared) {
  const double offset = static_cast<double>(pixel) - peak;
  return exp(-(offset * offset) / two_sigma_squared);
}

}  // namespace hgloss
