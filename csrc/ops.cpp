// The op schemas of moe_kernels (namespace torch.ops.moe_kernels) and the Python module `moe_kernels._C`.
//
// CPU implementations: csrc/cpu/*.cpp; CUDA implementations: csrc/cuda/*.cu (same schemas). Slot
// conventions follow moe_kernels/reference.py: slot s = t*k + j, ids int32, routing weights float32.
// Python wrappers, fake kernels and autograd: moe_kernels/native.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(moe_kernels, m) {
  // logits [T,E] fp32/fp16/bf16 -> weights [T,k] fp32, ids [T,k] int32. n_group = 0: no grouping.
  m.def("route_forward(Tensor logits, int k, bool use_sigmoid, bool topk_first, bool renormalize, Tensor? bias, "
        "int n_group, int topk_group, float scale) -> (Tensor weights, Tensor ids)");
  // grad_weights [T,k] fp32 -> grad_logits [T,E] fp32 (recomputed from logits and ids).
  m.def("route_backward(Tensor grad_weights, Tensor logits, Tensor ids, bool use_sigmoid, bool topk_first, "
        "bool renormalize, float scale) -> Tensor");
  // ids [T,k] int32 -> expert_offsets [E+1], sorted_slots [T*k], slot_positions [T*k] (int32, stable counting sort).
  m.def("plan(Tensor ids, int num_experts) -> (Tensor expert_offsets, Tensor sorted_slots, Tensor slot_positions)");
  // out[p,:] = x[sorted_slots[p] / k, :]
  m.def("gather_rows(Tensor x, Tensor sorted_slots, int k) -> Tensor");
  // out[t,:] = sum_j grad_rows[slot_positions[t*k+j], :] (fp32 accumulation, j ascending): gather_rows' backward.
  m.def("scatter_rows_sum(Tensor grad_rows, Tensor slot_positions, int k) -> Tensor");
  // out[t,:] = sum_j weights[t,j] * y_sorted[slot_positions[t*k+j], :] (fp32 accumulation, j ascending).
  m.def("combine(Tensor y_sorted, Tensor slot_positions, Tensor weights) -> Tensor");
  m.def("combine_backward(Tensor grad_out, Tensor y_sorted, Tensor slot_positions, Tensor weights) -> "
        "(Tensor grad_y_sorted, Tensor grad_weights)");
}

// An empty Python module, so that `from moe_kernels import _C` loads this library (and registers the ops).
static struct PyModuleDef moe_kernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&moe_kernels_module); }
