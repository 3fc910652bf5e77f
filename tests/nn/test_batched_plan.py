"""How hk.nn.batched plans a module and reads its params: dict params never concatenated, flat buffer ranges, views
cut once, fused-MLP segments and their ranges, shared layers run dense, conversions and the printed plan."""
import importlib

import pytest
import torch
from torch import nn

import hyperkernels as hk
from conftest import (mixed_activations_mlp, ops_making_params_sized_tensors_in_backward, per_sample_params,
                      siren_two_w0_mlp)
from conftest import sequential_mlp as mlp

# the module, not the function hk.nn.batched that shadows it as an attribute of hk.nn
batched_module = importlib.import_module("hyperkernels.nn.batched")
plan_module = importlib.import_module("hyperkernels.nn._plan")


def _record(monkeypatch, name):
    seen, real = [], getattr(batched_module, name)
    monkeypatch.setattr(batched_module, name, lambda h, *a: seen.append(a) or real(h, *a))
    return seen


def test_dict_params_are_not_copied(monkeypatch):
    """At one point per sample on the torch backend (where flat params run the fused op), dict params run layer
    by layer on the given tensors themselves; with a faked kernel backend, the op reads views of one flat tensor
    in place and other dicts run layer by layer: never a torch.cat of the pieces."""
    net = hk.nn.batched(mlp("tanh", "relu", (3, 7, 5, 2)))
    x = torch.randn(4, 3, dtype=torch.float64)
    assert batched_module.fused_mlp_worth_it(net.backend, x, (3, 7, 5, 2))  # where a dict was concatenated
    params = per_sample_params(net.layout, 4, torch.float64)
    row = net.layout.flatten(params)
    expected = net(x, row)
    layers, ops = _record(monkeypatch, "run_kernel_layer"), _record(monkeypatch, "run_fused_mlp")
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("batched() concatenated the dict params"))
    torch.testing.assert_close(net(x, params), expected, rtol=1e-12, atol=1e-12)
    assert not ops and [(w, b) for w, b, *_ in layers] == [(params[f"{i}.weight"], params[f"{i}.bias"])
                                                           for i in (0, 2, 4)]
    assert all(w is params[f"{i}.weight"] and b is params[f"{i}.bias"] for (w, b, *_), i in zip(layers, (0, 2, 4)))
    monkeypatch.setattr(batched_module, "linear_is_composition", lambda backend, like: False)
    flat = torch.zeros(4, net.num_params + 3, dtype=torch.float64)
    flat[:, 2:-1] = row  # inside a wider buffer: the op gets its range, in place
    views = net.layout.unflatten(flat[:, 2:-1])
    layers.clear()
    torch.testing.assert_close(net(x, views), expected, rtol=1e-12, atol=1e-12)
    assert not layers and len(ops) == 1 and ops[0][0].data_ptr() == views["0.weight"].data_ptr()
    ops.clear()
    torch.testing.assert_close(net(x, params), expected, rtol=1e-12, atol=1e-12)  # separate tensors
    assert not ops and len(layers) == 3


def test_flat_buffer_range_only_for_views_in_the_layout():
    kernels = importlib.import_module("hyperkernels.nn._kernels")
    flat = torch.randn(3, 10, requires_grad=True)
    w, b = flat[:, :8].view(3, 2, 4), flat[:, 8:]
    assert kernels.flat_buffer_range([w, b], [0, 8], 10) is flat
    assert kernels.flat_buffer_range([b, w], [0, 2], 10) is None  # another order
    assert kernels.flat_buffer_range([w, b.clone()], [0, 8], 10) is None  # separate tensors
    assert kernels.flat_buffer_range([w.transpose(1, 2), b], [0, 8], 10) is None  # not row-major
    part = kernels.flat_buffer_range([flat[:, 2:8].view(3, 2, 3), flat[:, 8:9]], [0, 6], 7)
    assert part.shape == (3, 7) and torch.equal(part, flat[:, 2:9]) and part.data_ptr() == flat[:, 2:].data_ptr()
    base = torch.randn(3, 10)  # views that need a gradient of their own are not a range of their buffer
    assert kernels.flat_buffer_range([base[:, :8].view(3, 2, 4).requires_grad_(), base[:, 8:]], [0, 8], 10) is None
    with torch.no_grad():
        detached = flat.detach()
        got = kernels.flat_buffer_range([detached[:, :8].view(3, 2, 4), detached[:, 8:]], [0, 8], 10)
    assert got.data_ptr() == flat.data_ptr() and torch.equal(got, flat)


def test_split_params_forward_views_and_fused_mlp_weights():
    """The public surface bind() runs on: views cut once (no copy), forward_views equal to forward, and which
    weights forward runs inside the fused op (at few points per sample on the torch backend; none at many)."""
    net = hk.nn.batched(mixed_activations_mlp())
    flat = torch.randn(3, net.num_params, dtype=torch.float64)
    views = net.split_params(flat)
    assert list(views) == net.layout.names
    assert all(v.data_ptr() == flat[:, net.layout.offset(n):].data_ptr() for n, v in views.items())
    x = torch.randn(3, 3, dtype=torch.float64)
    torch.testing.assert_close(net.forward_views(x, views), net(x, flat), rtol=1e-12, atol=1e-12)
    assert net.fused_mlp_weights(x) == {f"{i}.weight" for i in (0, 2, 4, 6, 8)}
    many = batched_module.fused_mlp_worth_it(net.backend, torch.randn(3, 4096, 3), (3, 8, 8))
    assert not many and net.fused_mlp_weights(torch.randn(3, 4096, 3)) == frozenset()
    with pytest.raises(TypeError, match=r"params: expected a dict name -> \(B, \*shape\) tensor, got Tensor"):
        net.forward_views(x, flat)
    with pytest.raises(TypeError, match=r"params: expected a flat \(B, \d+\) tensor, got a dict"):
        net.split_params(dict(views))
    with pytest.raises(ValueError, match=r"params\['0.weight'\]: expected shape \(B, 8, 3\)"):
        net.forward_views(x, {**views, "0.weight": views["0.weight"][:, :2]})


# -- the plan ------------------------------------------------------------------------------------

def _segments(net):
    return [s for s in net._steps if isinstance(s, plan_module.FusedRun)]


def test_whole_row_segment_gets_the_flat_tensor_itself():
    """One segment covering the row reads the flat tensor whole: its backward makes one (B, P) tensor, the
    gradient, and no zero-filled (B, P) buffer for a slice of it."""
    net = hk.nn.batched(mlp("relu", "identity"))
    assert len(net._steps) == 1 and isinstance(net._steps[0], plan_module.FusedRun)
    flat = torch.randn(3, net.num_params, requires_grad=True)
    y = net(torch.randn(3, 5, 3), flat)
    assert len(ops_making_params_sized_tensors_in_backward(y, flat)) == 1


def test_segments_read_narrowed_ranges():
    net = hk.nn.batched(mixed_activations_mlp())
    segs = _segments(net)
    # relu/tanh/silu/silu/none: [0, 2] (relu hidden, tanh out), [4, 6, 8] (silu hidden, none out)
    assert [[l.index for l in s.layers] for s in segs] == [["0", "2"], ["4", "6", "8"]]
    assert segs[0].start == 0 and segs[1].start == segs[0].length
    assert segs[1].start + segs[1].length == net.num_params
    assert segs[1].spec.weight_offsets[0] == 0  # rebased to the segment
    assert (segs[0].activation, segs[0].output_activation) == ("relu", "tanh")
    assert (segs[1].activation, segs[1].output_activation) == ("silu", "none")


def test_sine_w0_splits_segments():
    """Layer 0 (sine, w0=30) cannot share a fused op with layers 2 and 4 (w0=1); alone, it is a kernel layer."""
    net = hk.nn.batched(siren_two_w0_mlp())
    first, run = net._steps
    assert isinstance(first, plan_module.Layer) and (first.activation, first.w0) == ("sine", 30.0)
    assert [l.index for l in run.layers] == ["2", "4"] and run.w0 == 1.0


def test_shared_layers_run_dense_on_the_parameter_itself(monkeypatch):
    """A layer whose weight every sample shares runs as one dense layer on the parameter itself (never copied B
    times); a shared bias next to a per-sample weight is read with batch stride 0."""
    seen = []
    real = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        seen.append((weight.data_ptr(), tuple(weight.shape), None if bias is None else bias.data_ptr()))
        return real(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    net = hk.nn.batched(mlp("relu", "identity", (3, 8, 8, 8, 2)), shared=("2.weight", "2.bias"))
    assert net.layout.names == ["0.weight", "0.bias", "4.weight", "4.bias", "6.weight", "6.bias"]
    assert [n for n, _ in net.named_parameters()] == ["shared.2_weight", "shared.2_bias"]
    net(torch.randn(4, 3), torch.randn(4, net.num_params))
    shared = net.shared_parameters()
    assert seen == [(shared["2.weight"].data_ptr(), (8, 8), shared["2.bias"].data_ptr())]


def test_module_conversions_and_repr():
    net = hk.nn.batched(mlp("relu", "identity"), shared=("0.bias",)).double()
    assert net.shared_parameters()["0.bias"].dtype == torch.float64
    text = repr(net)
    assert "fused batched_mlp" in text and "batched_linear" in text
    assert hk.nn.batched(nn.Linear(2, 3)).layout.names == ["weight", "bias"]
