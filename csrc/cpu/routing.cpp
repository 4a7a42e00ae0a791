// CPU route_forward / route_backward: one token per loop iteration (OpenMP via at::parallel_for),
// each running the shared per-row code of csrc/common/routing_row.h (the forward's softmax/sigmoid
// runs first over the whole [T, E] block in ATen).
#include <type_traits>
#include <vector>

#include <torch/library.h>

#include "common/op_args.h"
#include "cpu/common.h"

namespace moe_kernels {
namespace cpu {
namespace {

using routing::make_params;

std::tuple<at::Tensor, at::Tensor> route_forward(const at::Tensor& logits_in, int64_t k, bool use_sigmoid,
                                                 bool topk_first, bool renormalize,
                                                 const std::optional<at::Tensor>& bias_in, int64_t n_group,
                                                 int64_t topk_group, double scale,
                                                 std::optional<at::ScalarType> weights_dtype_in,
                                                 std::optional<at::ScalarType> ids_dtype_in) {
  check_cpu(logits_in, "logits", 2);
  const at::ScalarType weights_dtype = routing::route_weights_dtype(weights_dtype_in);
  const at::ScalarType ids_dtype = routing::route_ids_dtype(ids_dtype_in);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  routing::check_route_forward_args(E, k, n_group, topk_group);
  at::Tensor bias;
  if (bias_in.has_value()) {
    check_cpu(*bias_in, "bias", 1);
    TORCH_CHECK(bias_in->size(0) == E, "bias must have E = ", E, " entries, got ", bias_in->size(0));
    bias = bias_in->to(at::kFloat).contiguous();
  }
  const routing::RouteParams p = make_params(E, k, use_sigmoid, topk_first, renormalize, n_group, topk_group, scale);
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(weights_dtype));
  at::Tensor ids = at::empty({T, k}, logits.options().dtype(ids_dtype));
  const float* bias_ptr = bias.defined() ? bias.data_ptr<float>() : nullptr;
  // The scores of every row in one vectorised ATen pass (the values of the reference's torch.softmax /
  // torch.sigmoid, and several times faster than a scalar expf per element), then per row the choice.
  const at::Tensor logits_f = logits.to(at::kFloat);
  const at::Tensor scores = topk_first ? logits_f.contiguous()
                            : use_sigmoid ? at::sigmoid(logits_f).contiguous()
                                          : at::softmax(logits_f, 1).contiguous();
  const float* scores_ptr = scores.data_ptr<float>();
  routing::dispatch_route_outputs(weights_dtype, ids_dtype, [&](auto w_type, auto i_type) {
    using W = decltype(w_type);
    using I = decltype(i_type);
    // fp32 weights and int32 ids are chosen in place; other storage types through one row of fp32/int32 scratch.
    constexpr bool in_place = std::is_same_v<W, float> && std::is_same_v<I, int32_t>;
    W* weights_ptr = weights.data_ptr<W>();
    I* ids_ptr = ids.data_ptr<I>();
    at::parallel_for(0, T, grain_rows(E * k / 8 + E), [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(2 * p.n_group + 1), row_weights(in_place ? 0 : k);
      std::vector<int32_t> candidates(E), row_ids(in_place ? 0 : k);
      for (int64_t t = begin; t < end; ++t) {
        if constexpr (in_place) {
          routing::route_row_choose(scores_ptr + t * E, bias_ptr, p, scratch.data(), weights_ptr + t * k,
                                    ids_ptr + t * k, candidates.data());
        } else {
          routing::route_row_choose(scores_ptr + t * E, bias_ptr, p, scratch.data(), row_weights.data(),
                                    row_ids.data(), candidates.data());
          routing::store_row(row_weights.data(), row_ids.data(), k, weights_ptr + t * k, ids_ptr + t * k);
        }
      }
    });
  });
  return {weights, ids};
}

at::Tensor route_backward(const at::Tensor& grad_weights_in, const at::Tensor& logits_in, const at::Tensor& ids_in,
                          bool use_sigmoid, bool topk_first, bool renormalize, double scale) {
  check_cpu(logits_in, "logits", 2);
  check_cpu(ids_in, "ids", 2);
  check_cpu(grad_weights_in, "grad_weights", 2);
  routing::check_route_ids(ids_in);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor grad_weights = grad_weights_in.to(at::kFloat).contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = ids.size(1);
  TORCH_CHECK(ids.size(0) == T && grad_weights.size(0) == T && grad_weights.size(1) == k,
              "route_backward: grad_weights ", grad_weights.sizes(), " and ids ", ids.sizes(),
              " must both be [T, k] with T = ", T);
  check_index_range(ids, "ids", E);
  const routing::RouteParams p = make_params(E, k, use_sigmoid, topk_first, renormalize, 0, 0, scale);
  at::Tensor grad_logits = at::empty({T, E}, logits.options().dtype(at::kFloat));
  const float* grad_w_ptr = grad_weights.data_ptr<float>();
  float* out_ptr = grad_logits.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "route_backward_cpu", [&] {
    const scalar_t* logits_ptr = logits.data_ptr<scalar_t>();
    auto run = [&](auto* ids_ptr) {
      at::parallel_for(0, T, grain_rows(E + k), [&](int64_t begin, int64_t end) {
        std::vector<float> scratch(routing::backward_scratch_floats(p));
        for (int64_t t = begin; t < end; ++t) {
          routing::route_row_backward(grad_w_ptr + t * k, logits_ptr + t * E, ids_ptr + t * k, p, scratch.data(),
                                      out_ptr + t * E);
        }
      });
    };
    ids.scalar_type() == at::kInt ? run(ids.data_ptr<int32_t>()) : run(ids.data_ptr<int64_t>());
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("route_forward", &route_forward);
  m.impl("route_backward", &route_backward);
}

}  // namespace cpu
}  // namespace moe_kernels
