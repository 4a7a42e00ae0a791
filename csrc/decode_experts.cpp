// The decode expert path (csrc/decode_experts.h): op decode_mlp_forward, one implementation registered for CPU
// and CUDA tensors. The argument checks and the CPU loops live here (built by the C++ compiler); the CUDA
// kernels in csrc/cuda/decode.cu. Both run the per-element steps of csrc/common/grouped_rows.h, so the CPU tests
// of this op exercise the arithmetic the GPU runs; only the order of the fp32 dot products differs.
#include <algorithm>
#include <limits>
#include <string>

#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "cpu/common.h"
#include "decode_experts.h"

namespace moe_kernels {
namespace decode {
namespace {

using grouped::add_rn;
using grouped::combine_term;
using grouped::decode_act_column;

Call check_call(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const std::optional<at::Tensor>& b1,
                const std::optional<at::Tensor>& b2, const at::Tensor& weights, const at::Tensor& ids,
                const act::ActSpec& spec, double scale) {
  Call c;
  static_cast<experts::Dims&>(c) = experts::check_operands(x, w1, w2, b1, b2, weights, ids, spec,
                                                           "the decode expert path", /*routing_as_given=*/true);
  TORCH_CHECK(c.E >= 1 && c.M2 >= 1, "w1 must hold at least one expert, w2 at least one column");
  if (x.is_cuda()) {
    const int64_t widest = std::max(c.M2, c.H), max_widest = kCudaMaxGridY * kCudaColumnsPerBlock;
    TORCH_CHECK(widest <= max_widest && c.N <= std::numeric_limits<int32_t>::max(),
                "decode_mlp_forward on CUDA takes widths up to ", max_widest, " and fewer than 2^31 slots");
  }
  cpu::check_index_range(ids, "ids", c.E);  // debug mode only: the ids come validated from moe_kernels.ops
  c.x = x.contiguous();
  c.w1 = w1;
  c.w2 = w2;
  c.b1 = b1.has_value() ? b1->to(at::kFloat).contiguous() : at::Tensor();
  c.b2 = b2.has_value() ? b2->to(at::kFloat).contiguous() : at::Tensor();
  c.weights = weights.contiguous().view(-1);
  c.ids = ids.contiguous().view(-1);
  c.a = at::empty({c.N, c.M2}, x.options());
  c.out = at::empty({c.T, c.H}, x.options());
  c.spec = spec;
  c.scale = static_cast<float>(scale);
  return c;
}

// The two passes on the CPU: per slot, per activation column, then per token, per output column. W, I: the
// routing's storage (float or T weights, int32 or int64 ids), read as it is.
template <typename T, typename W, typename I>
void run_cpu(const Call& c) {
  const T* x = c.x.data_ptr<T>();
  const T* w1 = c.w1.data_ptr<T>();
  const T* w2 = c.w2.data_ptr<T>();
  const float* b1 = c.b1.defined() ? c.b1.data_ptr<float>() : nullptr;
  const float* b2 = c.b2.defined() ? c.b2.data_ptr<float>() : nullptr;
  const W* weights = c.weights.data_ptr<W>();
  const I* ids = c.ids.data_ptr<I>();
  T* a = c.a.data_ptr<T>();
  T* out = c.out.data_ptr<T>();
  const int64_t s1e = c.w1.stride(0), s1r = c.w1.stride(1), s1c = c.w1.stride(2);
  const int64_t s2e = c.w2.stride(0), s2r = c.w2.stride(1), s2c = c.w2.stride(2);
  auto dot = [](const T* u, const T* w, int64_t w_stride, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; ++i) acc += static_cast<float>(u[i]) * static_cast<float>(w[i * w_stride]);
    return acc;
  };
  at::parallel_for(0, c.T * c.k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t e = ids[s];
      const T* x_row = x + (s / c.k) * c.H;
      const float* bias = b1 != nullptr ? b1 + e * c.M1 : nullptr;
      for (int64_t i = 0; i < c.M2; ++i) {
        const int64_t gate_row = c.spec.gated ? act::gate_column(c.spec, i) : i;
        const float gate = dot(x_row, w1 + e * s1e + gate_row * s1r, s1c, c.H);
        const float up = c.spec.gated ? dot(x_row, w1 + e * s1e + act::up_column(c.spec, i, c.M2) * s1r, s1c, c.H)
                                      : 0.0f;
        a[s * c.M2 + i] = static_cast<T>(decode_act_column<T>(c.spec, gate, up, bias, i, c.M2));
      }
    }
  });
  at::parallel_for(0, c.T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t col = 0; col < c.H; ++col) {
        float acc = 0.0f;
        for (int64_t j = 0; j < c.k; ++j) {
          const int64_t s = t * c.k + j;
          const T* w2_row = w2 + static_cast<int64_t>(ids[s]) * s2e + col * s2r;
          const float y = static_cast<float>(static_cast<T>(dot(a + s * c.M2, w2_row, s2c, c.M2)));
          acc = add_rn(acc, combine_term(y, weights, s, c.scale, b2, c.H, ids, col));
        }
        out[t * c.H + col] = static_cast<T>(acc);
      }
    }
  });
}

at::Tensor decode_mlp_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                              const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& b2,
                              const at::Tensor& weights, const at::Tensor& ids, c10::string_view activation, bool gated,
                              bool interleaved, std::optional<double> limit, double scale, double gate_cap,
                              double up_cap) {
  const act::ActSpec spec =
      act::parse_activation(std::string(activation), gated, interleaved, limit, gate_cap, up_cap, scale);
  const c10::DeviceGuard guard(x.device());
  const Call call = check_call(x, w1, w2, b1, b2, weights, ids, spec, scale);
  if (call.out.numel() == 0) return call.out;
#ifdef MOE_KERNELS_WITH_CUDA
  if (x.is_cuda()) {
    run_cuda(call);
    return call.out;
  }
#endif
  TORCH_CHECK(x.device().is_cpu(), "decode_mlp_forward runs on CPU or CUDA tensors, got ", x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "decode_mlp_forward", [&] {
    dispatch_routing<scalar_t>(call, [&](auto weight_tag, auto id_tag) {
      run_cpu<scalar_t, decltype(weight_tag), decltype(id_tag)>(call);
    });
  });
  return call.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) { m.impl("decode_mlp_forward", &decode_mlp_forward); }

#ifdef MOE_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) { m.impl("decode_mlp_forward", &decode_mlp_forward); }
#endif

}  // namespace decode
}  // namespace moe_kernels
