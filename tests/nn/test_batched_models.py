"""hk.nn.batched on any module vmap runs: the models it must match (every per-sample layer kind in an nn.Sequential, a
residual MLP, a SIREN class, a CNN, a GRUCell stepped over time, learnable activations shared and generated,
Dropout), against vmap(functional_call(module, ...), randomness="different") in float64: the output and every
gradient (params flat and dict, x, shared parameters)."""
import copy
import importlib
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

import hyperkernels as hk
from conftest import assert_compiles_without_graph_break, bench_module, needs_triton, per_sample_params
from reference import GRAD_RTOL, assert_close

batched_module = importlib.import_module("hyperkernels.nn.batched")

zoo = bench_module("batched_models")  # the benchmark's models, built small here

RTOL = GRAD_RTOL[torch.float64] * 10


def reference(template, x, params, shared, grad_y, seed):
    """vmap(functional_call(template)) on float64 copies: y and the gradients of x, params and shared."""
    ps = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    sh = {k: v.detach().double().requires_grad_() for k, v in shared.items()}
    inputs = x if isinstance(x, tuple) else (x,)
    xs = tuple(t.detach().double().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs)
    buffers = dict(template.named_buffers())
    torch.manual_seed(seed)
    y = vmap(lambda p, *xb: functional_call(template, {**p, **sh, **buffers}, xb), randomness="different",
             in_dims=(0, *(None if t is None else 0 for t in xs)))(ps, *xs)
    y.backward(grad_y)
    dx = [t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in xs]
    return y.detach(), dx, {k: v.grad for k, v in ps.items()}, {k: v.grad for k, v in sh.items()}


def check(template, x_shape, *, shared=(), batch=3, params_kind="flat", train=False, seed=0, scale=1.0,
          inputs=None):
    """batched(template) against the reference; ``x_shape`` is one sample's input (or ``inputs`` the tuple of
    batched inputs). Returns the batched module."""
    torch.manual_seed(seed)
    template = template.double().train(train)
    net = hk.nn.batched(template, shared=shared).double().train(train)
    params = per_sample_params(net.layout, batch, torch.float64, scale)
    x = inputs if inputs is not None else torch.randn(batch, *x_shape, dtype=torch.float64)
    x = tuple(t.clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in x) \
        if isinstance(x, tuple) else x.clone().requires_grad_()
    given = net.layout.flatten(params).requires_grad_() if params_kind == "flat" else \
        {k: v.clone().requires_grad_() for k, v in params.items()}
    torch.manual_seed(seed + 1)
    y = net(x, given)
    grad_y = torch.randn(y.shape, dtype=torch.float64)
    y.backward(grad_y)
    shared_values = {k: p.detach() for k, p in net.shared_parameters().items()}
    y_ref, dx_ref, dp_ref, dsh_ref = reference(template, x, params, shared_values, grad_y, seed + 1)
    assert y.shape == y_ref.shape
    assert_close(y, y_ref, RTOL, "forward")
    for t, d in zip(x if isinstance(x, tuple) else (x,), dx_ref):
        if d is not None:
            assert_close(t.grad, d, RTOL, "dx")
    dparams = net.layout.unflatten(given.grad) if params_kind == "flat" else {k: v.grad for k, v in given.items()}
    assert set(dparams) == set(dp_ref)
    for k in dp_ref:
        assert_close(dparams[k], dp_ref[k], RTOL, f"d{k}")
    for k, p in net.shared_parameters().items():
        assert_close(p.grad, dsh_ref[k], RTOL, f"d shared {k}")
    return net


class PointwiseConvNet(nn.Module):
    """1x1 convs in a module with its own forward (kernels inside vmap), a residual connection."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 5, 1), nn.Conv1d(5, 3, 1)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


class TiedAutoencoder(nn.Module):
    """The decoder uses the encoder's weight transposed: one parameter used twice."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 3)
        self.dec_bias = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t(), self.dec_bias)


def every_vector_layer():
    return zoo.every_layer_mlp(d_in=3, width=7, d_out=2)


def every_image_layer():
    net = zoo.every_layer_cnn(channels=3, width=4, classes=3).eval()
    bn = net[4]
    bn.running_mean.uniform_(-0.5, 0.5)  # non-trivial running statistics, read in eval mode
    bn.running_var.uniform_(0.5, 2.0)
    return net


MODELS = {
    "every vector layer kind": (every_vector_layer, (4, 3)),
    "every image layer kind": (every_image_layer, (2, 3, 8, 8)),
    "residual MLP": (lambda: zoo.ResidualMLP(3, 5, 2, 2), (4, 3)),
    "SIREN class": (lambda: zoo.Siren(2, 6, 2, 3), (5, 2)),
    "CNN class, a batch of images per sample": (lambda: zoo.SmallCNN(3, 4, 8, 5), (2, 3, 8, 8)),
    "GRUCell stepped 10 times": (lambda: zoo.GRUStepper(3, 5, 2), (10, 3)),
    "GRUCell stepped 10 times, N sequences": (lambda: zoo.GRUStepper(3, 5, 2), (2, 10, 3)),
    "1x1 convs in a custom forward": (PointwiseConvNet, (3, 7)),
    "PReLU generated": (lambda: zoo.prelu_mlp(5), (4, 3)),
    "Swish generated": (lambda: zoo.swish_mlp(5), (4, 3)),
    "tied weights in a custom forward": (TiedAutoencoder, (2, 6)),
}


@pytest.fixture(params=["one vmap", "steps"])
def mode(request, monkeypatch):
    """How a Sequential with per-sample layers runs: as a whole under one vmap (where linear layers are PyTorch's
    composition, e.g. on CPU), or step by step with its kernel layers outside vmap (where they have kernels)."""
    if request.param == "steps":
        monkeypatch.setattr(batched_module, "linear_is_composition", lambda *args: False)
    return request.param


@pytest.mark.parametrize("params_kind", ["flat", "dict"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_vmap(name, params_kind, mode):
    make, x_shape = MODELS[name]
    check(make(), x_shape, params_kind=params_kind, scale=1 / 30 if "SIREN" in name else 1.0)


@pytest.mark.parametrize("name, shared", [
    ("PReLU generated", ("1.weight",)),
    ("Swish generated", ("1.beta", "3.beta")),
    ("residual MLP", ("out.weight", "blocks.0.bias")),
    ("every vector layer kind", ("1.weight", "4.weight", "7.beta")),
    ("every image layer kind", ("0.weight", "4.bias")),
    ("GRUCell stepped 10 times", ("cell.weight_hh",)),
    ("1x1 convs in a custom forward", ("a.weight",)),
], ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_shared_parameters(name, shared, mode):
    make, x_shape = MODELS[name]
    net = check(make(), x_shape, shared=shared)
    assert not set(shared) & set(net.layout.names)


@pytest.mark.parametrize("batch", [1, 5])
def test_batch_sizes(batch, mode):
    check(zoo.ResidualMLP(3, 5, 2, 2), (4, 3), batch=batch)
    check(every_image_layer(), (1, 3, 8, 8), batch=batch)


def test_tied_and_hooked_layers_in_a_sequential(mode):
    lin = nn.Linear(4, 4)
    check(nn.Sequential(lin, nn.ReLU(), lin, nn.Tanh(), nn.Linear(4, 2)), (3, 4))
    hooked = nn.Linear(4, 4)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    net = check(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), hooked, nn.Linear(4, 2)), (3, 3))
    assert "layers 2 (Linear): per sample through torch.func.vmap; on the kernels (1x1 convs always, linear maps " \
           "where the backend is not PyTorch's composition): 0 (Linear)" in repr(net)
    check(nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2)),
          (2, 3))
    net = check(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4)), (2, 3), shared=("2.weight",))
    assert net.shared_names == ("2.weight",)


def test_gru_cell_stepped_by_the_user():
    """batched(nn.GRUCell) takes (x_t, h) like the cell; stepped 10 times, with gradients through every step."""
    torch.manual_seed(0)
    cell = nn.GRUCell(3, 4).double()
    net = hk.nn.batched(cell).double()
    flat = (torch.rand(5, net.num_params, dtype=torch.float64) - 0.5).requires_grad_()
    xs = torch.randn(5, 10, 3, dtype=torch.float64)
    h = h_ref = torch.zeros(5, 4, dtype=torch.float64)
    for t in range(10):
        h = net((xs[:, t], h), flat)
        h_ref = vmap(lambda p, a, b: functional_call(cell, p, (a, b)))(net.layout.unflatten(flat), xs[:, t], h_ref)
    assert_close(h, h_ref, RTOL, "h")
    g = torch.randn_like(h)
    assert_close(torch.autograd.grad(h, flat, g)[0], torch.autograd.grad(h_ref, flat, g)[0], RTOL, "dparams")
    assert_close(net(xs[:, 0], flat), net((xs[:, 0], None), flat), RTOL, "h=None")


@pytest.mark.parametrize("cell", [nn.LSTMCell(3, 4), nn.RNNCell(3, 4, nonlinearity="relu")], ids=["LSTM", "RNN"])
def test_cells_vmap_cannot_batch(cell):
    """vmap has no batching rule for lstm_cell: batched() runs the cells from their formulas; a loop over samples
    with the torch module is the reference."""
    torch.manual_seed(0)
    cell = cell.double()
    net = hk.nn.batched(cell).double()
    flat = (torch.rand(3, net.num_params, dtype=torch.float64) - 0.5).requires_grad_()
    x, h = torch.randn(3, 2, 3, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)
    state = (h, h.flip(0)) if isinstance(cell, nn.LSTMCell) else h
    out = net((x, state), flat)
    views = net.layout.unflatten(flat)
    per = [functional_call(cell, {k: v[b] for k, v in views.items()},
                           (x[b], tuple(s[b] for s in state) if isinstance(state, tuple) else state[b]))
           for b in range(3)]
    ref = tuple(torch.stack(t) for t in zip(*per)) if isinstance(out, tuple) else torch.stack(per)
    for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert_close(o, r, RTOL, "output")
    total = sum(o.sum() for o in (out if isinstance(out, tuple) else (out,)))
    total_ref = sum(o.sum() for o in (ref if isinstance(ref, tuple) else (ref,)))
    assert_close(torch.autograd.grad(total, flat)[0], torch.autograd.grad(total_ref, flat)[0], RTOL, "dparams")


def test_batchnorm_without_running_stats_normalises_each_sample(mode):
    check(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)), (5, 3),
          train=True)


# -- Dropout ---------------------------------------------------------------------------------------

DROPOUT_MODELS = {
    "Sequential": lambda: zoo.dropout_mlp(6),
    "in a vmap step": lambda: nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Dropout(0.5), nn.Linear(6, 2)),
    "in a custom forward": lambda: _DropoutResidual(),
}


class _DropoutResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 3)

    def forward(self, x):
        return x + self.b(F.dropout(torch.relu(self.a(x)), 0.5, self.training))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(DROPOUT_MODELS))
def test_dropout_matches_vmap_randomness_different(name, train, mode):
    """The same seed gives the same masks as vmap(randomness="different") (bit for bit: both draw one mask over
    the whole batch), so outputs and gradients match; eval is deterministic."""
    check(DROPOUT_MODELS[name](), (8, 3), batch=4, train=train)


@pytest.mark.parametrize("name", list(DROPOUT_MODELS))
def test_dropout_masks_differ_per_sample(name, mode):
    """Every sample with the same weights and the same input: in training the samples' outputs differ (their own
    masks), in eval they are equal."""
    torch.manual_seed(0)
    net = hk.nn.batched(DROPOUT_MODELS[name]())
    row = torch.randn(1, net.num_params) * 0.5
    x = torch.randn(8, 3).expand(4, 8, 3)
    y = net(x, row.expand(4, -1))
    assert all(not torch.equal(y[0], y[b]) for b in range(1, 4))
    net.eval()
    y = net(x, row.expand(4, -1))
    assert all(torch.equal(y[0], y[b]) for b in range(1, 4))


# -- how it runs -------------------------------------------------------------------------------------

def test_plan_says_what_runs_where():
    net = hk.nn.batched(every_image_layer())
    lines = net.plan()
    assert lines[0] == "where the backend has kernels for linear layers (not PyTorch's composition):"
    assert lines[1].startswith("  layers 0 (Conv2d), 1 (GroupNorm), 2 (ReLU), 3 (Conv2d), 4 (BatchNorm2d): per "
                               "sample through torch.func.vmap; nothing on the kernels")
    assert lines[2] == "  layer 5: activation 'relu' on the whole batch"
    assert lines[3].startswith("  layer 6 (Conv2d) 4->4: kernels, batched_conv1x1, activation='silu'")
    assert lines[4].startswith("  layers 8 (AvgPool2d), 9 (Flatten): per sample")
    assert lines[5].startswith("  layers [10, 12] Linear 16->64->3: kernels, one fused batched_mlp")
    assert lines[6] == ("elsewhere (PyTorch's composition, e.g. on CPU): the module (Sequential): per sample through "
                        "torch.func.vmap; on the kernels (1x1 convs always, linear maps where the backend is not "
                        "PyTorch's composition): 6 (Conv2d), 10 (Linear), 12 (Linear)")
    text = repr(hk.nn.batched(zoo.GRUStepper(3, 5, 2)))
    assert "the module (GRUStepper): per sample through torch.func.vmap; on the kernels (1x1 convs always, linear " \
           "maps where the backend is not PyTorch's composition): cell (GRUCell), head (Linear)" in text
    assert "layer 2 (LeakyReLU): elementwise, on the whole batch" in repr(hk.nn.batched(zoo.every_layer_mlp()))
    assert repr(hk.nn.batched(zoo.dropout_mlp())).count("per sample") == 0  # no vmap at all: Dropout is elementwise


def _spy(monkeypatch, op):
    """Record (x shape, weight shape, backend) of every per-sample ``op`` ("batched_linear" or "batched_conv1x1")
    the kernels module runs."""
    kernels = importlib.import_module("hyperkernels.nn._kernels")
    seen, real = [], kernels.linear_from_checked

    def spy(x, weight, bias, activation, w0, channel_major, backend):
        if channel_major == (op == "batched_conv1x1"):
            seen.append((tuple(x.shape), tuple(weight.shape), backend))
        return real(x, weight, bias, activation, w0, channel_major, backend)

    monkeypatch.setattr(kernels, "linear_from_checked", spy)
    return seen


def test_custom_forward_runs_1x1_convs_on_the_kernels(monkeypatch):
    """Inside batched()'s vmap a 1x1 conv reaches batched_conv1x1 with the physical (B, C, L) tensors (bmm beats
    vmap's grouped conv on CPU); nn.Linear stays with vmap's own rule on the torch backend (the same bmm)."""
    convs, linears = _spy(monkeypatch, "batched_conv1x1"), _spy(monkeypatch, "batched_linear")
    check(PointwiseConvNet(), (3, 7), batch=4)
    assert convs == [((4, 3, 7), (4, 5, 3), "auto"), ((4, 5, 7), (4, 3, 5), "auto")]
    check(zoo.ResidualMLP(3, 5, 2, 2), (6, 3), batch=4)
    assert linears == []


@needs_triton
def test_custom_forward_runs_linear_layers_on_triton(monkeypatch):
    """With a backend that is not PyTorch's composition, the residual MLP's nn.Linear layers leave vmap for
    batched_linear with the physical (B, N, in) tensors; under a torch.func transform of the user's they run as
    vmap would, with the same result."""
    seen = _spy(monkeypatch, "batched_linear")
    torch.manual_seed(0)
    template = zoo.ResidualMLP(3, 8, 1, 2)
    net = hk.nn.batched(template, backend="triton")
    flat, x = torch.randn(2, net.num_params) * 0.3, torch.randn(2, 3, 3)
    y = net(x, flat)
    assert seen == [((2, 3, 3), (2, 8, 3), "triton"), ((2, 3, 8), (2, 8, 8), "triton"),
                    ((2, 3, 8), (2, 2, 8), "triton")]
    ref = vmap(lambda p, xb: functional_call(template, p, (xb,)))(net.layout.unflatten(flat), x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    seen.clear()
    g = torch.func.grad(lambda p: net(x, p).square().sum())(flat)
    assert seen == []
    flat_ = flat.clone().requires_grad_()
    net(x, flat_).square().sum().backward()
    torch.testing.assert_close(g, flat_.grad, rtol=1e-4, atol=1e-5)


def test_compiles_to_one_graph():
    """A Sequential with fused runs, a vmap step (a learnable activation, a norm) and an elementwise layer:
    torch.compile(fullgraph=True) gives one graph, the eager values and gradients."""
    torch.manual_seed(0)
    net = hk.nn.batched(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), zoo.Swish(), nn.LayerNorm(8),
                                      nn.ELU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)))
    flat = (torch.randn(4, net.num_params) * 0.3).requires_grad_()
    x = torch.randn(4, 5, 3, requires_grad=True)
    assert_compiles_without_graph_break(lambda x, p: net(x, p), (x, flat))


def test_state_dict_buffers_conversions_and_copies():
    net = hk.nn.batched(every_image_layer(), shared=("0.bias",))
    keys = list(net.state_dict())
    assert keys == ["shared.0_bias", "template_buffers.4_running_mean", "template_buffers.4_running_var",
                    "template_buffers.4_num_batches_tracked"]
    assert [n for n, _ in net.named_parameters()] == ["shared.0_bias"]
    net = net.double()
    assert net.template_buffers._buffers["4_running_mean"].dtype == torch.float64
    for clone in (copy.deepcopy(net), _pickled(net)):
        x, flat = torch.randn(2, 1, 3, 8, 8, dtype=torch.float64), torch.randn(2, net.num_params, dtype=torch.float64)
        torch.testing.assert_close(clone(x, flat), net(x, flat))
    fresh = hk.nn.batched(zoo.every_layer_cnn(channels=3, width=4, classes=3), shared=("0.bias",)).double().eval()
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh(x, flat), net(x, flat))


def _pickled(net):
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_forward_from_head_matches_generate_then_apply(mode):
    """HyperNetwork's fused path over a plan with vmap steps and kernel layers: the same as generating first."""
    torch.manual_seed(0)
    net = hk.nn.batched(nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.LayerNorm(6), nn.Linear(6, 6), nn.Tanh(),
                                      nn.Linear(6, 2)), shared=("2.bias",)).double()
    head = nn.Linear(5, net.num_params).double()
    h, x = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    y = net.forward_from_head(x, h, head.weight, head.bias, "auto")
    ref = net(x, head(h))
    assert_close(y, ref, RTOL, "forward")
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, list(head.parameters()), g), torch.autograd.grad(ref, list(head.parameters()),
                                                                                               g)):
        assert_close(a, b, RTOL, "d head")


def test_default_init_statistics():
    net = hk.nn.batched(nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.GroupNorm(2, 4), nn.Flatten(),
                                      nn.Linear(4, 2), nn.PReLU()), shared=("1.bias",))
    var, mean = net.default_init_variance(), net.default_init_mean()
    assert list(var) == list(mean) == net.layout.names
    assert var["0.weight"] == var["0.bias"] == pytest.approx(1 / (3 * 27))
    assert var["3.weight"] == pytest.approx(1 / 12) and mean["3.weight"] == 0.0
    assert (mean["1.weight"], var["1.weight"]) == (1.0, 0.0)
    assert mean["4.weight"] == pytest.approx(0.25)
    gru = hk.nn.batched(nn.GRUCell(3, 5))
    assert gru.default_init_variance()["weight_hh"] == pytest.approx(1 / 15)


# -- what cannot run -------------------------------------------------------------------------------------

class _NotPerSample(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale.item()  # data-dependent: vmap cannot run it


def test_clear_errors(mode):
    net = hk.nn.batched(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    flat, x = torch.randn(2, net.num_params), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm1d\) is in training mode.*no per-sample meaning.*"
                                         r"\.eval\(\)"):
        net(x, flat)
    net.eval()
    assert net(x, flat).shape == (2, 5, 2)
    with pytest.raises(TypeError, match=r"buffer '1.running_mean' is torch.float32 but x and params are "
                                        r"torch.float64"):
        net(x.double(), flat.double())
    bad = hk.nn.batched(nn.Sequential(nn.Linear(3, 4), _NotPerSample()))
    with pytest.raises(RuntimeError) as info:
        bad(x, torch.randn(2, bad.num_params))
    assert "while running layer 1 (_NotPerSample) per sample through torch.func.vmap" in "\n".join(
        getattr(info.value, "__notes__", [str(info.value)]))
    with pytest.raises(TypeError, match=r"x: expected a Tensor with a leading batch dim, got tuple"):
        net((x, x), flat)
    cnn = hk.nn.batched(zoo.SmallCNN(3, 4, 8, 5))
    with pytest.raises(ValueError, match=r"x: expected batch size \(dim 0\) 2 \(the batch of params\), got 3"):
        cnn(torch.randn(3, 3, 8, 8), torch.randn(2, cnn.num_params))
    with pytest.raises(ValueError, match=r"x\[1\]: expected batch size \(dim 0\) 2"):
        hk.nn.batched(nn.GRUCell(3, 4))((torch.randn(2, 3), torch.randn(3, 4)), torch.randn(2, 4 * 3 * 3 + 4 * 4 * 3 + 24))


def test_user_module_is_not_modified():
    template = zoo.ResidualMLP(3, 5, 2, 2)
    before = {k: v.clone() for k, v in template.state_dict().items()}
    net = hk.nn.batched(template)
    net(torch.randn(2, 3), torch.randn(2, net.num_params))
    assert all(type(m) in (zoo.ResidualMLP, nn.Linear, nn.ModuleList) for m in template.modules())
    assert all(torch.equal(v, before[k]) for k, v in template.state_dict().items())
    assert math.isclose(sum(p.numel() for p in template.parameters()), net.num_params)
