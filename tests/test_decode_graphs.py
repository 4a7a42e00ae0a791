"""moe_kernels/decode_graphs.py's bookkeeping without a GPU: the capture is replaced by a stand-in that, like a CUDA
graph, reruns the captured call on the buffers it was captured with, so the real ops (cpu backend) check that each
call's inputs reach the replay and that the caller gets its own output. tests/test_gpu_no_sync.py runs the real
capture on a GPU."""

import pytest
import torch

import moe_kernels
from moe_kernels import decode_graphs


def _stand_in_capture(log):
    def capture(fn, statics):
        output = fn(*statics)
        log.append(len(statics))

        def replay():
            output.copy_(fn(*statics))
        return replay, output
    return capture


@pytest.fixture
def graphs(monkeypatch):
    """Decode graphs on for CPU tensors, with the stand-in capture; yields the list of captures made."""
    log = []
    monkeypatch.setattr(decode_graphs, "_capture", _stand_in_capture(log))
    monkeypatch.setenv(decode_graphs.ENV, "1")
    real_wanted = decode_graphs.wanted

    def wanted(device, slots, tensors):  # the real rules, as if the CPU were a CUDA device
        return real_wanted(torch.device("cuda"), slots, tensors)
    monkeypatch.setattr(decode_graphs, "wanted", wanted)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    decode_graphs.clear()
    yield log
    decode_graphs.clear()


def _expert_weights(E=5, H=16, I=8, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g),
            torch.randn(E, r, H, generator=g), torch.randn(E, H, r, generator=g))


def _routing(T, E, k, g):
    return moe_kernels.route(torch.randn(T, E, generator=g), k, backend="cpu")


def test_first_call_eager_second_captured_then_replayed_with_each_calls_inputs(graphs):
    gate_up, down, a_down, a_up = _expert_weights()
    g = torch.Generator().manual_seed(1)
    outputs = []
    for call in range(4):
        x = torch.randn(2, 16, generator=g)
        weights, ids = _routing(2, 5, 2, g)
        y = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend="cpu")
        z = moe_kernels.adapter_moe(x, a_down, a_up, weights, ids, backend="cpu")
        with torch.no_grad():
            torch.testing.assert_close(y, moe_kernels.reference.moe_mlp(x, gate_up, down, weights, ids))
            torch.testing.assert_close(z, moe_kernels.reference.adapter_moe(x, a_down, a_up, weights, ids))
        assert len(graphs) == (0 if call == 0 else 2)  # captured at the second call, once per op
        outputs.append(y)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(outputs, outputs[1:]))  # each caller owns its output
    assert torch.isfinite(outputs[1]).all() and not torch.equal(outputs[1], outputs[2])  # a replay left it alone


def test_a_new_shape_option_or_weight_tensor_makes_a_new_graph(graphs, monkeypatch):
    gate_up, down, _, _ = _expert_weights()
    g = torch.Generator().manual_seed(2)

    def call(T=1, gate_up=gate_up, activation="silu"):
        x = torch.randn(T, 16, generator=g)
        weights, ids = _routing(T, 5, 2, g)
        y = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, activation=activation, backend="cpu")
        torch.testing.assert_close(y, moe_kernels.reference.moe_mlp(x, gate_up, down, weights, ids,
                                                                    activation=activation))

    for _ in range(2):
        call()
    assert len(graphs) == 1
    for _ in range(2):
        call(T=3)
    assert len(graphs) == 2
    for _ in range(2):
        call(activation="gelu")
    assert len(graphs) == 3
    replaced = gate_up.clone()  # a new tensor (another address): the old graph would read the old one
    for _ in range(2):
        call(gate_up=replaced)
    assert len(graphs) == 4
    with torch.no_grad():
        gate_up.mul_(2)  # changed in place: the graph reads it where it is, no new graph
    call()
    assert len(graphs) == 4
    monkeypatch.setenv("MOE_KERNELS_CUDA_DECODE", "grouped")  # a path switch: the old graph holds the other path
    for _ in range(2):
        call()
    assert len(graphs) == 5


def test_no_graph_with_a_gradient_above_the_decode_size_or_when_off(graphs, monkeypatch):
    gate_up, down, _, _ = _expert_weights()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, generator=g, requires_grad=True)
    weights, ids = _routing(1, 5, 2, g)
    for _ in range(3):
        moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend="cpu")
    big = torch.randn(40, 16, generator=g)
    weights40, ids40 = _routing(40, 5, 2, g)  # 80 slots > MAX_SLOTS
    for _ in range(3):
        moe_kernels.moe_mlp(big, gate_up, down, weights40, ids40, backend="cpu")
    monkeypatch.setenv(decode_graphs.ENV, "0")
    for _ in range(3):
        moe_kernels.moe_mlp(x.detach(), gate_up, down, weights, ids, backend="cpu")
    assert graphs == [] and not decode_graphs._cache


def test_a_failed_capture_warns_once_and_the_call_stays_eager(graphs, monkeypatch):
    def failing(fn, statics):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(decode_graphs, "_capture", failing)
    gate_up, down, _, _ = _expert_weights()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, generator=g)
    weights, ids = _routing(1, 5, 2, g)
    expected = moe_kernels.reference.moe_mlp(x, gate_up, down, weights, ids)
    moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend="cpu")
    with pytest.warns(RuntimeWarning, match="no CUDA graph"):
        y = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend="cpu")
    torch.testing.assert_close(y, expected)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend="cpu"), expected)


def test_the_cache_keeps_the_most_recent_graphs(graphs, monkeypatch):
    monkeypatch.setattr(decode_graphs, "MAX_GRAPHS", 3)
    gate_up, down, _, _ = _expert_weights()
    g = torch.Generator().manual_seed(5)
    for T in (1, 2, 3, 4, 5):
        for _ in range(2):
            x = torch.randn(T, 16, generator=g)
            weights, ids = _routing(T, 5, 2, g)
            moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend="cpu")
    assert len(decode_graphs._cache) == 3
    assert [key[-3][1][0] for key in decode_graphs._cache] == [3, 4, 5]  # x's (device, shape, strides, dtype)


def test_hf_style_routing_int64_ids_and_bf16_weights_is_converted_inside_the_graph(graphs, monkeypatch):
    """Hugging Face passes int64 ids and routing weights in the model's dtype: the graph is keyed on those layouts,
    copies them in as they are and holds the conversion to int32 / float32 itself."""
    gate_up, down, _, _ = (t.to(torch.bfloat16) for t in _expert_weights())
    g = torch.Generator().manual_seed(6)
    for call in range(3):
        x = torch.randn(2, 16, generator=g).to(torch.bfloat16)
        weights, ids = _routing(2, 5, 2, g)
        weights, ids = weights.to(torch.bfloat16), ids.long()
        y = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend="cpu")
        monkeypatch.setenv(decode_graphs.ENV, "0")
        expected = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend="cpu")  # the eager call
        monkeypatch.setenv(decode_graphs.ENV, "1")
        assert torch.equal(y, expected)
    assert graphs == [3]  # one capture, of (x, weights, ids)
    (key,) = [key for key in decode_graphs._cache if key[0] == "moe_mlp" and key[1] == "cpu"]
    assert [layout[3] for layout in key[-2:]] == [torch.bfloat16, torch.int64]
