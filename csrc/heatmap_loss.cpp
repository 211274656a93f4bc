// The schema of the hgloss operators. The math lives in the per-backend kernels; fake (meta)
// implementations and autograd are registered in Python (hgloss/ops.py).
#include <Python.h>
#include <torch/library.h>

// An importable, empty Python module, so that `import hgloss._C` loads this library and runs
// the TORCH_LIBRARY registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(hgloss, m) {
  // The loss of docs/spec.md section 1 and what its backward needs. Returns
  //   loss:  the reduced loss, a 0-dim tensor ((B, K) plane losses for reduction "none");
  //   terms: (B, K) mse_weight * V + grad_weight * R, before the weight (for dL/dweight);
  //   grad:  dL/dD for an upstream gradient of 1, (B, K, H, W), when compute_grad; else empty.
  // All three in the accumulation dtype: float64 for a float64 pred, else float32. `weight` is
  // (B, K); `alpha` is (B,) and required with a teacher.
  // The target is either `target` or separable: G[i, j] = float32(target_rows[b, k, i] *
  // target_cols[b, k, j]), float64 factors (B, K, H) and (B, K, W) (hgloss/targets.py), which
  // the kernels evaluate in registers so that no target tensor is read. `pixel_weight` is M,
  // broadcastable to (B, K, H, W), any strides; no gradient flows to it from these operators.
  m.def(
      "heatmap_loss(Tensor pred, Tensor? target, Tensor? teacher, Tensor? alpha, Tensor? weight, "
      "float mse_weight, float grad_weight, str stencil, str reduction, bool compute_grad, "
      "Tensor? target_rows=None, Tensor? target_cols=None, Tensor? pixel_weight=None) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // The separable targets of keypoints (B, K, 2) for an H x W heatmap, docs/spec.md section 7:
  // (rows (B, K, H), cols (B, K, W), reaches (B, K)), all float64; the factors are zero for planes
  // of weight 0 or whose window misses the heatmap. Raises for non-finite keypoints of weighted
  // planes. The reference of this rule is hgloss/targets.py.
  m.def(
      "gaussian_factors(Tensor keypoints, Tensor? weights, int height, int width, float sigma, str encoding) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // grad *= scale in place: the backward of heatmap_loss. `scale` holds one value (the upstream
  // gradient of a reduced loss) or one per plane, (B, K). Planes whose scale is exactly 1 are
  // left untouched, which the kernel decides without a host round trip.
  m.def("scale_gradient_(Tensor(a!) grad, Tensor scale) -> ()", {at::Tag::pt2_compliant_tag});
}
