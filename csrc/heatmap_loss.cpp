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
  // Per plane (b, k): terms[b, k] = mse_weight * V + grad_weight * R (SPEC section 1, before the
  // target weight), and, when compute_grad, d(terms[b, k])/dD for every pixel, in the
  // accumulation dtype (float64 for a float64 pred, else float32). Without compute_grad the
  // second output is an empty tensor.
  m.def(
      "heatmap_loss_forward(Tensor pred, Tensor target, Tensor? teacher, Tensor? alpha, "
      "float mse_weight, float grad_weight, str stencil, bool compute_grad) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}
