// The op schemas of moe_kernels (namespace torch.ops.moe_kernels) and the Python module `moe_kernels._C`.
//
// Every schema is defined here and only here; the implementation files register kernels for them with
// TORCH_LIBRARY_IMPL, under the same op names for each device:
//   CPU:       csrc/cpu/*.cpp (routing.cpp, dispatch.cpp, experts.cpp)
//   CUDA:      csrc/cuda/*.cu (routing.cu, dispatch.cu)
//   CPU+CUDA:  csrc/grouped_experts.cpp (one implementation; its row kernels are csrc/cpu/grouped_rows.cpp
//              and csrc/cuda/grouped_rows.cu), csrc/decode_experts.cpp (its CUDA kernels: csrc/cuda/decode.cu)
//   Autograd:  csrc/autograd.cpp (every device; the differentiable ops' backward formulas)
// expert_mlp_forward / expert_mlp_backward have CPU kernels only. Slot conventions follow
// moe_kernels/reference.py: slot s = t*k + j, ids int32, routing weights float32. Python wrappers and fake
// kernels: moe_kernels/native.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(moe_kernels, m) {
  // logits [T,E] fp32/fp16/bf16 -> weights [T,k] in weights_dtype (fp32 when None; or fp16/bf16, one rounding of the
  // fp32 weight), ids [T,k] in ids_dtype (int32 when None, or int64). n_group = 0 (spec.NO_GROUP): no grouping.
  m.def("route_forward(Tensor logits, int k, bool use_sigmoid, bool topk_first, bool renormalize, Tensor? bias, "
        "int n_group, int topk_group, float scale, ScalarType? weights_dtype=None, ScalarType? ids_dtype=None) -> "
        "(Tensor weights, Tensor ids)");
  // grad_weights [T,k] (any float dtype), ids [T,k] int32/int64 -> grad_logits [T,E] fp32 (recomputed from logits
  // and ids).
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
  // grad_out [T,H] -> grad_y_sorted [T*k,H] = w[t,j] * grad_out[t], grad_weights [T,k] fp32 = <grad_out[t], y row>.
  m.def("combine_backward(Tensor grad_out, Tensor y_sorted, Tensor slot_positions, Tensor weights) -> "
        "(Tensor grad_y_sorted, Tensor grad_weights)");
  // CPU only. x [T,H], w1 [E,M1,H], w2 [E,H,M2] (M1 = 2*M2 gated), weights [T,k] fp32 -> out [T,H], hidden [T*k|0,M1].
  m.def("expert_mlp_forward(Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, Tensor weights, "
        "Tensor expert_offsets, Tensor sorted_slots, Tensor slot_positions, str activation, bool gated, "
        "bool interleaved, float? limit, float scale, bool keep_hidden, float gate_cap=0., float up_cap=0.) -> "
        "(Tensor out, Tensor hidden)");
  // CPU only. grad_out [T,H] -> grads of x, w1, w2, b1 ([0] without b1), b2 ([0] without b2), weights [T,k].
  m.def("expert_mlp_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, "
        "Tensor weights, Tensor expert_offsets, Tensor sorted_slots, Tensor slot_positions, Tensor hidden, "
        "str activation, bool gated, bool interleaved, float? limit, float scale, float gate_cap=0., "
        "float up_cap=0.) -> "
        "(Tensor grad_x, Tensor grad_w1, Tensor grad_w2, Tensor grad_b1, Tensor grad_b2, Tensor grad_weights)");
  // As expert_mlp_forward plus ids [T,k] -> out [T,H], xs [T*k|0, H], hidden [T*k|0, M1] (rows padded to 16 bytes).
  m.def("grouped_mlp_forward(Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, Tensor weights, Tensor ids, "
        "Tensor expert_offsets, Tensor sorted_slots, Tensor slot_positions, str activation, bool gated, "
        "bool interleaved, float? limit, float scale, bool keep, float gate_cap=0., float up_cap=0.) -> "
        "(Tensor out, Tensor xs, Tensor hidden)");
  // grad_out [T,H], the forward's xs and hidden -> grads of x, w1, w2, b1 ([0] without), b2 ([0] without), weights.
  m.def("grouped_mlp_backward(Tensor grad_out, Tensor xs, Tensor hidden, Tensor w1, Tensor w2, Tensor? b1, "
        "Tensor? b2, Tensor weights, Tensor ids, Tensor expert_offsets, Tensor sorted_slots, Tensor slot_positions, "
        "str activation, bool gated, bool interleaved, float? limit, float scale, float gate_cap=0., "
        "float up_cap=0.) -> "
        "(Tensor grad_x, Tensor grad_w1, Tensor grad_w2, Tensor grad_b1, Tensor grad_b2, Tensor grad_weights)");
  // Decode path (no plan, no gradient): x [T,H], w1 [E,M1,H], w2 [E,H,M2], weights [T,k] fp32, ids [T,k] int32 ->
  // out [T,H]; per slot GEMVs in slot order (csrc/decode_experts.h).
  m.def("decode_mlp_forward(Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, Tensor weights, Tensor ids, "
        "str activation, bool gated, bool interleaved, float? limit, float scale, float gate_cap=0., "
        "float up_cap=0.) -> Tensor");
}

// An empty Python module, so that `from moe_kernels import _C` loads this library (and registers the ops).
static struct PyModuleDef moe_kernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&moe_kernels_module); }
