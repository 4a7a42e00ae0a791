// Elementwise activations of the expert paths (moe_kernels/reference.py: apply_activation,
// gated_activation), forward and derivative, in fp32; MOE_HOST_DEVICE so CPU and CUDA code share them.
#pragma once

#include <math.h>

#include "common/routing_row.h"  // MOE_HOST_DEVICE

namespace moe_kernels {
namespace act {

enum Activation : int {
  kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kIdentity = 4, kGptOss = 5, kRelu2 = 6, kSoftcapSwiglu = 7
};

constexpr float kGptOssAlpha = 1.702f;  // reference.GPT_OSS_ALPHA
constexpr float kSqrtHalf = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kGeluTanhKappa = 0.044715f;

// The activation of one call: Activation code, gated (moe_mlp) or plain (adapter_moe), the gated
// layout (gate rows then up rows, or interleaved gate/up), the optional clamp limit of gated ones, and the
// soft caps of kSoftcapSwiglu (Inkling2: gate_cap tanh(g / gate_cap) * sigmoid(g) * up_cap tanh(u / up_cap)).
struct ActSpec {
  int code;
  bool gated;
  bool interleaved;
  bool has_limit;
  float limit;
  float gate_cap;
  float up_cap;
};

// Columns of the pre-activation row read for output column i (half = width of the activation output).
MOE_HOST_DEVICE inline int64_t gate_column(const ActSpec& s, int64_t i) { return s.interleaved ? 2 * i : i; }
MOE_HOST_DEVICE inline int64_t up_column(const ActSpec& s, int64_t i, int64_t half) {
  return s.interleaved ? 2 * i + 1 : half + i;
}

MOE_HOST_DEVICE inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// act(x) of the ungated activations (also the gate half of gated ones; kGptOss is gated only).
MOE_HOST_DEVICE inline float forward(int a, float x) {
  switch (a) {
    case kSilu: return x / (1.0f + expf(-x));
    case kGelu: return 0.5f * x * (1.0f + erff(x * kSqrtHalf));
    case kGeluTanh: return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kGeluTanhKappa * x * x * x)));
    case kRelu: return x > 0.0f ? x : 0.0f;
    case kRelu2: return x > 0.0f ? x * x : 0.0f;
    default: return x;  // identity
  }
}

// d act(x) / dx, the convention of torch's own backward kernels (relu: 0 at x = 0).
MOE_HOST_DEVICE inline float derivative(int a, float x) {
  switch (a) {
    case kSilu: {
      const float s = sigmoid(x);
      return s * (1.0f + x * (1.0f - s));
    }
    case kGelu: return 0.5f * (1.0f + erff(x * kSqrtHalf)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
    case kGeluTanh: {
      const float t = tanhf(kSqrt2OverPi * (x + kGeluTanhKappa * x * x * x));
      return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhKappa * x * x);
    }
    case kRelu: return x > 0.0f ? 1.0f : 0.0f;
    case kRelu2: return x > 0.0f ? 2.0f * x : 0.0f;
    default: return 1.0f;
  }
}

// Gated: act(gate) * up, or GPT-OSS's (up + 1) * g * sigmoid(1.702 g), g = gate. With a limit, first
// gate = min(gate, limit) and up = clamp(up, -limit, limit), for every activation (moe_kernels/reference.py).
// kSoftcapSwiglu: s.gate_cap tanh(gate / s.gate_cap) * sigmoid(gate) * s.up_cap tanh(up / s.up_cap).
MOE_HOST_DEVICE inline float gated_forward(const ActSpec& s, float gate, float up) {
  const int a = s.code;
  if (a == kSoftcapSwiglu) {
    return s.gate_cap * tanhf(gate / s.gate_cap) * sigmoid(gate) * (s.up_cap * tanhf(up / s.up_cap));
  }
  const bool has_limit = s.has_limit;
  const float limit = s.limit;
  if (has_limit) {
    gate = gate < limit ? gate : limit;
    up = up < -limit ? -limit : (up > limit ? limit : up);
  }
  if (a == kGptOss) return (up + 1.0f) * (gate * sigmoid(gate * kGptOssAlpha));
  return forward(a, gate) * up;
}

// Gradients of gated_forward w.r.t. gate and up, given the output gradient `grad`; also returns the
// forward value (the backward needs both).
MOE_HOST_DEVICE inline float gated_backward(const ActSpec& s, float gate, float up, float grad, float* grad_gate,
                                            float* grad_up) {
  const int a = s.code;
  if (a == kSoftcapSwiglu) {
    const float tg = tanhf(gate / s.gate_cap), tu = tanhf(up / s.up_cap);
    const float sg = sigmoid(gate);
    const float capped_gate = s.gate_cap * tg, capped_up = s.up_cap * tu;
    // d/dg [cg tanh(g/cg) sigmoid(g)] = (1 - tanh^2) sigmoid + cg tanh sigmoid (1 - sigmoid)
    *grad_gate = grad * capped_up * ((1.0f - tg * tg) * sg + capped_gate * sg * (1.0f - sg));
    *grad_up = grad * capped_gate * sg * (1.0f - tu * tu);
    return capped_gate * sg * capped_up;
  }
  const bool has_limit = s.has_limit;
  const float limit = s.limit;
  // torch's clamp passes the gradient where min <= x <= max.
  const bool gate_passes = !has_limit || gate <= limit;
  const bool up_passes = !has_limit || (up >= -limit && up <= limit);
  if (has_limit) {
    gate = gate < limit ? gate : limit;
    up = up < -limit ? -limit : (up > limit ? limit : up);
  }
  if (a == kGptOss) {
    const float s = sigmoid(gate * kGptOssAlpha);
    const float glu = gate * s;
    *grad_up = up_passes ? grad * glu : 0.0f;
    *grad_gate = gate_passes ? grad * (up + 1.0f) * (s + gate * kGptOssAlpha * s * (1.0f - s)) : 0.0f;
    return (up + 1.0f) * glu;
  }
  const float act = forward(a, gate);
  *grad_up = up_passes ? grad * act : 0.0f;
  *grad_gate = gate_passes ? grad * up * derivative(a, gate) : 0.0f;
  return act * up;
}

}  // namespace act
}  // namespace moe_kernels
