// Registration of the native ops with the torch dispatcher: `torch.ops.thinkless.*` on CPU tensors. Their fake
// (meta) implementations, for torch.compile, are in thinkless/kernels/_native.py.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

#ifndef THINKLESS_CPU_CAPABILITY
#define THINKLESS_CPU_CAPABILITY "DEFAULT"
#endif

TORCH_LIBRARY(thinkless, m) {
  m.def("group_advantages(Tensor rewards, Tensor group_ids, bool normalize_std, float eps) -> Tensor");
  m.def(
      "degrpo_forward(Tensor logp, Tensor old_logp, Tensor advantages, Tensor response_mask, Tensor? ref_logp, "
      "Tensor? control_mask, Tensor? token_weights, float clip_low, float clip_high, int kl_type, float kl_clamp) "
      "-> Tensor");
  m.def(
      "degrpo_backward(Tensor logp, Tensor old_logp, Tensor advantages, Tensor response_mask, Tensor? ref_logp, "
      "Tensor? control_mask, Tensor? token_weights, Tensor weights, float clip_low, float clip_high, int kl_type, "
      "float kl_clamp, bool has_kl) -> Tensor");
  m.def("row_stats(Tensor logits, Tensor targets, float inv_temp, bool want_entropy) -> (Tensor, Tensor, Tensor)");
  m.def(
      "row_grad_(Tensor(a!) logits, Tensor targets, Tensor lse, Tensor grad, float inv_temp, Tensor? entropy, "
      "Tensor? entropy_grad) -> ()");
}

TORCH_LIBRARY_IMPL(thinkless, CPU, m) {
  m.impl("group_advantages", &thinkless::group_advantages);
  m.impl("degrpo_forward", &thinkless::degrpo_forward);
  m.impl("degrpo_backward", &thinkless::degrpo_backward);
  m.impl("row_stats", &thinkless::row_stats);
  m.impl("row_grad_", &thinkless::row_grad_);
}

// A Python module, so that `import thinkless._C` loads the library (and with it the registrations above).
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "thinkless._C",
                             "Native CPU kernels of thinkless, as torch.ops.thinkless.*", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr) PyModule_AddStringConstant(m, "cpu_capability", THINKLESS_CPU_CAPABILITY);
  return m;
}
