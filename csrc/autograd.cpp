// Autograd kernels of the differentiable moe_kernels ops, for every device (dispatch key Autograd).
//
// Each is a torch::autograd::Function: its forward calls the op below autograd (the CPU or CUDA kernel, or
// the fake kernel of moe_kernels/native.py under torch.compile) and saves what the backward op reads; its
// backward calls that backward op. Differentiable: route_forward (w.r.t. logits), gather_rows,
// scatter_rows_sum, combine (y_sorted and weights), expert_mlp_forward and grouped_mlp_forward (x, w1, w2,
// the biases and the routing weights). The row moves' backward is the other row move, itself differentiable; every
// other backward op is not, so those gradients are first-order only (first_order_only below).
//
// Why C++ and not torch.library.register_autograd: the Python formula costs a call of the expert ops about
// 80 microseconds in grad mode (torch rebuilds the 17-18 schema defaults in Python on every call) and each
// other op 10-25, which is the whole GPU time of a small training step; here the same bookkeeping costs a few.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace moe_kernels {
namespace autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The op's typed handle, looked up once. Called below autograd (the caller holds AutoDispatchBelowADInplaceOrView).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using OptDtype = std::optional<at::ScalarType>;
using RouteForward = std::tuple<Tensor, Tensor>(const Tensor&, int64_t, bool, bool, bool, const OptTensor&, int64_t,
                                                int64_t, double, OptDtype, OptDtype);
using RouteBackward = Tensor(const Tensor&, const Tensor&, const Tensor&, bool, bool, bool, double);
using Rows = Tensor(const Tensor&, const Tensor&, int64_t);
using Combine = Tensor(const Tensor&, const Tensor&, const Tensor&);
using CombineBackward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&);
using Grads6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using ExpertForward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                 const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                                                 const Tensor&, c10::string_view, bool, bool, std::optional<double>,
                                                 double, bool, double, double);
using ExpertBackward = Grads6(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                              const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, c10::string_view, bool, bool, std::optional<double>, double, double,
                              double);
using GroupedForward = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                          const OptTensor&, const OptTensor&, const Tensor&,
                                                          const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                          c10::string_view, bool, bool, std::optional<double>, double,
                                                          bool, double, double);
using GroupedBackward = Grads6(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                               const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                               const Tensor&, const Tensor&, c10::string_view, bool, bool, std::optional<double>,
                               double, double, double);

// A backward formula that is not differentiable itself: `compute` runs without grad, and under create_graph (grad
// mode on during the backward) its gradients come back through an Error node that raises when they are
// differentiated, so a second differentiation cannot silently take them for constants. The node's edges lead to
// everything the gradients depend on (the saved tensors and the incoming gradients), so differentiating with
// respect to any of them reaches it. Same contract and message as moe_kernels/first_order.py.
template <typename Compute>
variable_list first_order_only(const char* name, AutogradContext* ctx, const variable_list& grad_outputs,
                               Compute&& compute) {
  const bool create_graph = at::GradMode::is_enabled();
  variable_list grads;
  {
    at::NoGradGuard no_grad;
    grads = compute();
  }
  if (!create_graph) return grads;
  auto differentiable = [](const Tensor& t) { return t.defined() && t.is_floating_point(); };
  variable_list inputs;
  std::vector<size_t> where;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (differentiable(grads[i])) {
      inputs.push_back(grads[i].detach().requires_grad_(true));
      where.push_back(i);
    }
  }
  if (where.empty()) return grads;
  for (const variable_list& links : {ctx->get_saved_variables(), grad_outputs}) {
    for (const Tensor& t : links) {
      if (differentiable(t) && t.requires_grad()) inputs.push_back(t);
    }
  }
  const std::string message =
      std::string(name) +
      ": moe_kernels computes first-order gradients only; these were asked for with create_graph=True and cannot "
      "be differentiated again (no double backward). Use backend='reference' for higher-order derivatives.";
  auto error = std::make_shared<torch::autograd::DelayedError>(message, static_cast<int64_t>(inputs.size()));
  variable_list guarded = (*error)(std::move(inputs));
  for (size_t j = 0; j < where.size(); ++j) grads[where[j]] = guarded[j];
  return grads;
}

// An optional bias as saved (an undefined tensor when absent) and back.
Tensor saved(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The expert ops' activation options, kept between forward and backward.
struct ActivationOptions {
  std::string activation;
  bool gated;
  bool interleaved;
  std::optional<double> limit;
  double scale, gate_cap, up_cap;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["gated"] = gated;
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["limit"] = limit;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["gate_cap"] = gate_cap;
    ctx->saved_data["up_cap"] = up_cap;
  }
  static ActivationOptions load(AutogradContext* ctx) {
    const auto& d = ctx->saved_data;
    return {d.at("activation").toStringRef(), d.at("gated").toBool(), d.at("interleaved").toBool(),
            d.at("limit").toOptional<double>(), d.at("scale").toDouble(), d.at("gate_cap").toDouble(),
            d.at("up_cap").toDouble()};
  }
};

// The gradients of an expert op's differentiable inputs (x, w1, w2, b1, b2, weights), in forward-argument order,
// padded with undefined tensors for the options; a bias the forward did not get has no gradient.
variable_list expert_input_grads(const Grads6& g, bool has_b1, bool has_b2, size_t num_inputs) {
  variable_list grads = {std::get<0>(g), std::get<1>(g), std::get<2>(g), has_b1 ? std::get<3>(g) : Tensor(),
                         has_b2 ? std::get<4>(g) : Tensor(), std::get<5>(g)};
  grads.resize(num_inputs);
  return grads;
}

// ---- route_forward: d logits = route_backward (recomputed from logits and the chosen ids) -----------------

struct Route : torch::autograd::Function<Route> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, int64_t k, bool use_sigmoid,
                               bool topk_first, bool renormalize, const OptTensor& bias, int64_t n_group,
                               int64_t topk_group, double scale, OptDtype weights_dtype, OptDtype ids_dtype) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto route = op<RouteForward>("moe_kernels::route_forward");
    auto [weights, ids] = route.call(logits, k, use_sigmoid, topk_first, renormalize, bias, n_group, topk_group,
                                     scale, weights_dtype, ids_dtype);
    ctx->mark_non_differentiable({ids});
    ctx->save_for_backward({logits, ids});
    ctx->saved_data["flags"] = std::vector<bool>{use_sigmoid, topk_first, renormalize};
    ctx->saved_data["scale"] = scale;
    return {weights, ids};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto route_backward = op<RouteBackward>("moe_kernels::route_backward");
    return first_order_only("route (native)", ctx, grads, [&]() -> variable_list {
      const auto saved_tensors = ctx->get_saved_variables();
      const Tensor& logits = saved_tensors[0];
      const auto flags = ctx->saved_data["flags"].toBoolList();
      Tensor grad_logits = route_backward.call(grads[0].contiguous(), logits, saved_tensors[1], flags.get(0),
                                               flags.get(1), flags.get(2), ctx->saved_data["scale"].toDouble());
      // The bias only chooses (DeepSeek-V3's correction bias): no gradient, as in the reference.
      return {grad_logits.to(logits.scalar_type()), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
              Tensor(), Tensor(), Tensor(), Tensor()};
    });
  }
};

std::tuple<Tensor, Tensor> route_forward(const Tensor& logits, int64_t k, bool use_sigmoid, bool topk_first,
                                         bool renormalize, const OptTensor& bias, int64_t n_group,
                                         int64_t topk_group, double scale, OptDtype weights_dtype,
                                         OptDtype ids_dtype) {
  auto out = Route::apply(logits, k, use_sigmoid, topk_first, renormalize, bias, n_group, topk_group, scale,
                          weights_dtype, ids_dtype);
  return {out[0], out[1]};
}

// ---- gather_rows / scatter_rows_sum: each is the other's backward over the inverse permutation --------------

// sorted_slots <-> slot_positions (int32): each is the inverse permutation of the other. (Sizes stay SymInts: the
// backward is traced with symbolic shapes under torch.compile.)
Tensor inverse_permutation(const Tensor& perm) {
  const Tensor positions = at::arange(c10::Scalar(perm.sym_numel()), perm.options());
  return at::empty_like(perm).scatter_(0, perm.to(at::kLong), positions);
}

template <const char* Forward, const char* Adjoint>
struct RowMove : torch::autograd::Function<RowMove<Forward, Adjoint>> {
  static Tensor forward(AutogradContext* ctx, const Tensor& rows, const Tensor& index, int64_t k) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto move = op<Rows>(Forward);
    ctx->save_for_backward({index});
    ctx->saved_data["k"] = k;
    return move.call(rows, index, k);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto adjoint = op<Rows>(Adjoint);
    const Tensor index = ctx->get_saved_variables()[0];
    return {adjoint.call(grads[0].contiguous(), inverse_permutation(index), ctx->saved_data["k"].toInt()), Tensor(),
            Tensor()};
  }
};

constexpr char kGatherRows[] = "moe_kernels::gather_rows";
constexpr char kScatterRowsSum[] = "moe_kernels::scatter_rows_sum";

Tensor gather_rows(const Tensor& x, const Tensor& sorted_slots, int64_t k) {
  return RowMove<kGatherRows, kScatterRowsSum>::apply(x, sorted_slots, k);
}

Tensor scatter_rows_sum(const Tensor& grad_rows, const Tensor& slot_positions, int64_t k) {
  return RowMove<kScatterRowsSum, kGatherRows>::apply(grad_rows, slot_positions, k);
}

// ---- combine: d y_sorted and d weights from combine_backward ------------------------------------------------

struct Combine_ : torch::autograd::Function<Combine_> {
  static Tensor forward(AutogradContext* ctx, const Tensor& y_sorted, const Tensor& slot_positions,
                        const Tensor& weights) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto combine = op<Combine>("moe_kernels::combine");
    ctx->save_for_backward({y_sorted, slot_positions, weights});
    return combine.call(y_sorted, slot_positions, weights);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto combine_backward = op<CombineBackward>("moe_kernels::combine_backward");
    return first_order_only("combine (native)", ctx, grads, [&]() -> variable_list {
      const auto s = ctx->get_saved_variables();
      auto [grad_y, grad_weights] = combine_backward.call(grads[0].contiguous(), s[0], s[1], s[2]);
      return {grad_y, Tensor(), grad_weights};
    });
  }
};

Tensor combine(const Tensor& y_sorted, const Tensor& slot_positions, const Tensor& weights) {
  return Combine_::apply(y_sorted, slot_positions, weights);
}

// ---- expert_mlp_forward (CPU expert path): expert_mlp_backward from the kept hidden rows --------------------

struct ExpertMLP : torch::autograd::Function<ExpertMLP> {
  static constexpr size_t kInputs = 17;

  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w1, const Tensor& w2,
                               const OptTensor& b1, const OptTensor& b2, const Tensor& weights,
                               const Tensor& expert_offsets, const Tensor& sorted_slots, const Tensor& slot_positions,
                               c10::string_view activation, bool gated, bool interleaved, std::optional<double> limit,
                               double scale, bool keep_hidden, double gate_cap, double up_cap) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto expert_forward = op<ExpertForward>("moe_kernels::expert_mlp_forward");
    auto [out, hidden] = expert_forward.call(x, w1, w2, b1, b2, weights, expert_offsets, sorted_slots, slot_positions,
                                             activation, gated, interleaved, limit, scale, keep_hidden, gate_cap,
                                             up_cap);
    ctx->mark_non_differentiable({hidden});
    ctx->save_for_backward({x, w1, w2, saved(b1), saved(b2), weights, expert_offsets, sorted_slots, slot_positions,
                            hidden});
    ActivationOptions{std::string(activation), gated, interleaved, limit, scale, gate_cap, up_cap}.save(ctx);
    return {out, hidden};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto expert_backward = op<ExpertBackward>("moe_kernels::expert_mlp_backward");
    return first_order_only("moe_mlp / adapter_moe (native)", ctx, grads, [&]() -> variable_list {
      const auto s = ctx->get_saved_variables();
      const ActivationOptions o = ActivationOptions::load(ctx);
      const Grads6 g = expert_backward.call(grads[0].contiguous(), s[0], s[1], s[2], optional(s[3]), optional(s[4]),
                                            s[5], s[6], s[7], s[8], s[9], o.activation, o.gated, o.interleaved,
                                            o.limit, o.scale, o.gate_cap, o.up_cap);
      return expert_input_grads(g, s[3].defined(), s[4].defined(), kInputs);
    });
  }
};

std::tuple<Tensor, Tensor> expert_mlp_forward(const Tensor& x, const Tensor& w1, const Tensor& w2, const OptTensor& b1,
                                              const OptTensor& b2, const Tensor& weights, const Tensor& expert_offsets,
                                              const Tensor& sorted_slots, const Tensor& slot_positions,
                                              c10::string_view activation, bool gated, bool interleaved,
                                              std::optional<double> limit, double scale, bool keep_hidden,
                                              double gate_cap, double up_cap) {
  auto out = ExpertMLP::apply(x, w1, w2, b1, b2, weights, expert_offsets, sorted_slots, slot_positions, activation,
                              gated, interleaved, limit, scale, keep_hidden, gate_cap, up_cap);
  return {out[0], out[1]};
}

// ---- grouped_mlp_forward (grouped-GEMM expert path): grouped_mlp_backward from the kept xs and hidden -------

struct GroupedMLP : torch::autograd::Function<GroupedMLP> {
  static constexpr size_t kInputs = 18;

  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w1, const Tensor& w2,
                               const OptTensor& b1, const OptTensor& b2, const Tensor& weights, const Tensor& ids,
                               const Tensor& expert_offsets, const Tensor& sorted_slots, const Tensor& slot_positions,
                               c10::string_view activation, bool gated, bool interleaved, std::optional<double> limit,
                               double scale, bool keep, double gate_cap, double up_cap) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto grouped_forward = op<GroupedForward>("moe_kernels::grouped_mlp_forward");
    auto [out, xs, hidden] = grouped_forward.call(x, w1, w2, b1, b2, weights, ids, expert_offsets, sorted_slots,
                                                  slot_positions, activation, gated, interleaved, limit, scale, keep,
                                                  gate_cap, up_cap);
    ctx->mark_non_differentiable({xs, hidden});
    // Without keep the forward kept nothing: the backward recomputes xs and hidden from x.
    ctx->save_for_backward({keep ? Tensor() : x, w1, w2, saved(b1), saved(b2), weights, ids, expert_offsets,
                            sorted_slots, slot_positions, xs, hidden});
    ActivationOptions{std::string(activation), gated, interleaved, limit, scale, gate_cap, up_cap}.save(ctx);
    return {out, xs, hidden};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto grouped_forward = op<GroupedForward>("moe_kernels::grouped_mlp_forward");
    static const auto grouped_backward = op<GroupedBackward>("moe_kernels::grouped_mlp_backward");
    return first_order_only("moe_mlp / adapter_moe (native grouped)", ctx, grads, [&]() -> variable_list {
      const auto s = ctx->get_saved_variables();
      const ActivationOptions o = ActivationOptions::load(ctx);
      const OptTensor b1 = optional(s[3]), b2 = optional(s[4]);
      Tensor xs = s[10], hidden = s[11];
      if (s[0].defined()) {
        std::tie(std::ignore, xs, hidden) =
            grouped_forward.call(s[0], s[1], s[2], b1, b2, s[5], s[6], s[7], s[8], s[9], o.activation, o.gated,
                                 o.interleaved, o.limit, o.scale, /*keep=*/true, o.gate_cap, o.up_cap);
      }
      const Grads6 g = grouped_backward.call(grads[0].contiguous(), xs, hidden, s[1], s[2], b1, b2, s[5], s[6],
                                             s[7], s[8], s[9], o.activation, o.gated, o.interleaved, o.limit, o.scale,
                                             o.gate_cap, o.up_cap);
      return expert_input_grads(g, b1.has_value(), b2.has_value(), kInputs);
    });
  }
};

std::tuple<Tensor, Tensor, Tensor> grouped_mlp_forward(const Tensor& x, const Tensor& w1, const Tensor& w2,
                                                       const OptTensor& b1, const OptTensor& b2,
                                                       const Tensor& weights, const Tensor& ids,
                                                       const Tensor& expert_offsets, const Tensor& sorted_slots,
                                                       const Tensor& slot_positions, c10::string_view activation,
                                                       bool gated, bool interleaved, std::optional<double> limit,
                                                       double scale, bool keep, double gate_cap, double up_cap) {
  auto out = GroupedMLP::apply(x, w1, w2, b1, b2, weights, ids, expert_offsets, sorted_slots, slot_positions,
                               activation, gated, interleaved, limit, scale, keep, gate_cap, up_cap);
  return {out[0], out[1], out[2]};
}

TORCH_LIBRARY_IMPL(moe_kernels, Autograd, m) {
  m.impl("route_forward", &route_forward);
  m.impl("gather_rows", &gather_rows);
  m.impl("scatter_rows_sum", &scatter_rows_sum);
  m.impl("combine", &combine);
  m.impl("expert_mlp_forward", &expert_mlp_forward);
  m.impl("grouped_mlp_forward", &grouped_mlp_forward);
}

}  // namespace autograd
}  // namespace moe_kernels
