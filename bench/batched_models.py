"""``hk.nn.batched(model)`` against ``vmap(functional_call(model, ...))`` on models vmap runs and batched() must run as fast
(Sequentials of every layer kind, a residual MLP, SIREN, a CNN, a GRUCell stepped over time, learnable activations,
Dropout), interleaved.

Every model runs per sample with its own parameters: a flat ``(B, P)`` tensor (a hypernetwork's output) that
both methods read, the baseline through ``ParamLayout.unflatten`` views (the usual way to slice it) and
``vmap(..., randomness="different")``. "fwd" is the forward pass; "fwd+bwd" adds the backward to the flat params
(and to the shared parameters). Both methods of a row are timed in the same interleaved rounds
(``timing.time_interleaved``); the speedup is the median of the per-round ratios.

    python bench/batched_models.py                      # the table
    python bench/batched_models.py --out bench/results/cpu_batched_models.md
    python bench/batched_models.py --mechanisms         # the per-sample mechanisms of nn/_per_sample.py, compared
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hyperkernels as hk  # noqa: E402
from timing import paired_speedup, time_interleaved  # noqa: E402


# -- the models (the tests build the same classes at small sizes) ---------------------------------

class Swish(nn.Module):
    """x * sigmoid(beta x) with a trainable beta: a learnable activation."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class ResidualMLP(nn.Module):
    def __init__(self, d_in=3, width=64, depth=3, d_out=3):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, d_out)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for block in self.blocks:
            h = h + torch.relu(block(h))
        return self.out(h)


class Siren(nn.Module):
    """SIREN written as a module class: sin(w0 * linear(x)) layers, then a linear head."""

    def __init__(self, d_in=2, width=64, depth=3, d_out=3, w0=30.0):
        super().__init__()
        self.w0 = w0
        self.hidden = nn.ModuleList(nn.Linear(d_in if i == 0 else width, width) for i in range(depth))
        self.head = nn.Linear(width, d_out)

    def forward(self, x):
        for layer in self.hidden:
            x = torch.sin(self.w0 * layer(x))
        return self.head(x)


class SmallCNN(nn.Module):
    """3x3 conv, GroupNorm, ReLU, pooling, flatten, linear head; per sample a batch of images (N, C, H, W)."""

    def __init__(self, channels=3, width=16, size=8, classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Flatten(-3))
        self.head = nn.Linear(width * (size // 2) ** 2, classes)

    def forward(self, x):
        return self.head(self.features(x))


class GRUStepper(nn.Module):
    """An nn.GRUCell stepped over the time steps of x (T, d_in) (or (N, T, d_in)), a linear head on the last
    state."""

    def __init__(self, d_in=4, hidden=32, d_out=2):
        super().__init__()
        self.cell = nn.GRUCell(d_in, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, xs):
        h = None
        for t in range(xs.shape[-2]):
            h = self.cell(xs[..., t, :], h)
        return self.head(h)


def every_layer_mlp(d_in=8, width=64, d_out=4):
    """An nn.Sequential with one of each per-sample layer kind that works on feature vectors."""
    return nn.Sequential(nn.Linear(d_in, width), nn.LayerNorm(width), nn.LeakyReLU(0.1), nn.Linear(width, width),
                         nn.PReLU(), nn.Dropout(0.1), nn.Linear(width, width), Swish(), nn.Linear(width, width),
                         nn.ELU(), nn.Linear(width, width), nn.Softplus(), nn.Linear(width, d_out))


def every_layer_cnn(channels=3, width=16, classes=10):
    """An nn.Sequential with one of each per-sample layer kind that works on images (each sample a batch)."""
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(width),
                         nn.ReLU(), nn.Conv2d(width, width, 1), nn.SiLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(width * 4, 64), nn.ReLU(), nn.Linear(64, classes))


def prelu_mlp(width=64):
    return nn.Sequential(nn.Linear(3, width), nn.PReLU(width), nn.Linear(width, width), nn.PReLU(width),
                         nn.Linear(width, 3))


def swish_mlp(width=64):
    return nn.Sequential(nn.Linear(3, width), Swish(), nn.Linear(width, width), Swish(), nn.Linear(width, 3))


def dropout_mlp(width=64):
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, width), nn.ReLU(),
                         nn.Dropout(0.2), nn.Linear(width, 3))


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    batch: int
    x_shape: tuple           # one sample's input
    shared: tuple = ()
    train: bool = False      # Dropout active
    dict_params: bool = False  # params as a dict of (B, *shape) tensors (an ensemble), not one flat tensor


CASES = [
    Case("Sequential, every vector layer kind", every_layer_mlp, 256, (16, 8)),
    Case("Sequential, every image layer kind (eval)", every_layer_cnn, 64, (4, 3, 8, 8)),
    Case("residual MLP (own forward)", ResidualMLP, 256, (64, 3)),
    Case("residual MLP, dict params (ensemble)", ResidualMLP, 256, (64, 3), dict_params=True),
    # small enough that batched()'s fixed per-call work (checks, the split, the per-sample runner) weighs most
    Case("residual MLP width 16, one point", lambda: ResidualMLP(3, 16, 3, 3), 64, (3,)),
    Case("SIREN class (own forward)", Siren, 64, (256, 2)),
    Case("CNN class (own forward)", SmallCNN, 64, (4, 3, 8, 8)),
    Case("GRUCell stepped 10 times", GRUStepper, 256, (10, 4)),
    Case("PReLU generated", prelu_mlp, 256, (16, 3)),
    Case("PReLU shared", prelu_mlp, 256, (16, 3), shared=("1.weight", "3.weight")),
    Case("Swish beta generated", swish_mlp, 256, (16, 3)),
    Case("Swish beta shared", swish_mlp, 256, (16, 3), shared=("1.beta", "3.beta")),
    Case("Dropout train", dropout_mlp, 256, (16, 3), train=True),
    Case("Dropout eval", dropout_mlp, 256, (16, 3)),
]


def build(case: Case, device, dtype):
    """(batched fwd, vmap fwd, batched fwd+bwd, vmap fwd+bwd, max |difference| of the outputs)."""
    torch.manual_seed(0)
    template = case.make().to(device=device, dtype=dtype).train(case.train)
    net = hk.nn.batched(template, shared=case.shared).to(device=device, dtype=dtype).train(case.train)
    flat = (torch.randn(case.batch, net.num_params, device=device, dtype=dtype) * 0.1).requires_grad_()
    params = flat
    if case.dict_params:
        params = {k: v.detach().clone().requires_grad_() for k, v in net.layout.unflatten(flat).items()}
    x = torch.randn(case.batch, *case.x_shape, device=device, dtype=dtype)
    shared = dict(net.shared_parameters())
    buffers = dict(template.named_buffers())

    def reference():
        per_sample = params if case.dict_params else net.layout.unflatten(flat)
        return vmap(lambda p, xb: functional_call(template, {**p, **shared, **buffers}, (xb,)),
                    randomness="different")(per_sample, x)

    def ours():
        return net(x, params)

    grads = [*(params.values() if case.dict_params else [flat]), *shared.values()]
    g = torch.randn_like(ours())

    def backward(fn):
        # The same gradient values, laid out like fn's own output: a gradient in another layout would time the
        # activation backward's layout mixing, not the method (see bench/run.py).
        with torch.no_grad():
            g_fn = torch.empty_like(fn()).copy_(g)
        return lambda: torch.autograd.grad(fn(), grads, g_fn)

    torch.manual_seed(1)
    a = ours()
    torch.manual_seed(1)
    b = reference()
    return ours, reference, backward(ours), backward(reference), float((a - b).detach().abs().max())


def run_table(device, dtype, budget_s):
    rows = []
    for case in CASES:
        fwd, ref_fwd, bwd, ref_bwd, diff = build(case, device, dtype)
        t_fwd = time_interleaved({"batched": fwd, "vmap": ref_fwd}, device, budget_s=budget_s)
        t_bwd = time_interleaved({"batched": bwd, "vmap": ref_bwd}, device, budget_s=budget_s)
        row = dict(case=case.name, diff=diff,
                   fwd=(t_fwd["batched"], t_fwd["vmap"], paired_speedup(t_fwd["vmap"], t_fwd["batched"])),
                   bwd=(t_bwd["batched"], t_bwd["vmap"], paired_speedup(t_bwd["vmap"], t_bwd["batched"])))
        rows.append(row)
        print(_row_md(case, row), flush=True)
    return rows


def _ms(t) -> str:
    return f"{t.median_ms:.3f}" + ("" if t.trusted else " (!)")


def _row_md(case: Case, row: dict) -> str:
    (bf, vf, sf), (bb, vb, sb) = row["fwd"], row["bwd"]
    shape = f"B={case.batch}, x {case.x_shape}" + (f", shared {list(case.shared)}" if case.shared else "")
    return (f"| {case.name} | {shape} | {_ms(bf)} | {_ms(vf)} | {sf:.2f} | {_ms(bb)} | {_ms(vb)} | {sb:.2f} | "
            f"{row['diff']:.1e} |")


# -- the per-sample mechanisms, compared (the choice documented in hyperkernels/nn/_per_sample.py) ----

def _alternatives():
    """Other ways to put an nn.Linear called under vmap on batched_linear: an autograd.Function with a vmap
    staticmethod, a torch.library op with register_vmap, and a TorchFunctionMode catching F.linear."""

    def physical(info, in_dims, x, w, b):
        def first(t, d):
            return t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
        x, w = first(x, in_dims[0]), first(w, in_dims[1])
        b = None if b is None else first(b, in_dims[2])
        x3 = x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
        y = hk.batched_linear(x3, w, b)
        return (y if x.dim() == 3 else y.reshape(*x.shape[:-1], w.shape[1])), 0

    class ViaFunction(torch.autograd.Function):
        @staticmethod
        def forward(x, w, b):
            return F.linear(x, w, b)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def vmap(info, in_dims, x, w, b):
            return physical(info, in_dims, x, w, b)

    @torch.library.custom_op("hyperkernels_bench::linear_vmap", mutates_args=())
    def via_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, b)

    via_op.register_fake(lambda x, w, b: x.new_empty(*x.shape[:-1], w.shape[0]))
    via_op.register_vmap(physical)

    class LinearVia(nn.Linear):
        fn = None

        def forward(self, x):
            return type(self).fn(x, self.weight, self.bias)

    class FunctionLinear(LinearVia):
        fn = staticmethod(ViaFunction.apply)

    class OpLinear(LinearVia):
        fn = staticmethod(via_op)

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.linear:
                return ViaFunction.apply(args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias"))
            return func(*args, **kwargs)

    return FunctionLinear, OpLinear, Mode


class PointwiseConvNet(nn.Module):
    """Two 1x1 convs and a residual connection in a module with its own forward."""

    def __init__(self, channels=32, hidden=32):
        super().__init__()
        self.a, self.b = nn.Conv1d(channels, hidden, 1), nn.Conv1d(hidden, channels, 1)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


def run_mechanisms(device, dtype, budget_s):
    """Ways to run the nn.Linear / 1x1 conv layers of a module with its own forward, forward+backward, every one
    fed the same split of the flat params (the gradient assembly batched() uses), so that only the mechanism
    differs."""
    import copy
    import importlib

    per_sample_module = importlib.import_module("hyperkernels.nn._per_sample")
    FunctionLinear, OpLinear, Mode = _alternatives()
    lines = []
    models = [(f"residual MLP B={b}, N={n}, width {w}", ResidualMLP(3, w, 3, 3), (b, n, 3)) for b, n, w in
              [(64, 1, 16), (256, 16, 64)]]
    models += [(f"1x1 convs B={b}, C={c}, L={l}", PointwiseConvNet(c, c), (b, c, l)) for b, c, l in
               [(64, 16, 64), (32, 64, 256)]]
    for label, template, x_shape in models:
        torch.manual_seed(0)
        template = template.to(device=device, dtype=dtype)
        net = hk.nn.batched(template)
        step = net._steps[0]
        batch = x_shape[0]
        flat = (torch.randn(batch, net.num_params, device=device, dtype=dtype) * 0.1).requires_grad_()
        x = torch.randn(*x_shape, device=device, dtype=dtype)

        def params():
            views = net.split_params(flat)
            return {name: views[c] for name, c in step.params}

        def vmapped(module, mode=None):
            def fn():
                if mode is None:
                    y = vmap(lambda p, xb: functional_call(module, p, (xb,)))(params(), x)
                else:
                    with mode():
                        y = vmap(lambda p, xb: functional_call(module, p, (xb,)))(params(), x)
                torch.autograd.grad(y.sum(), flat)
            return fn

        def unwrapped():
            y = per_sample_module.run_per_sample(step.module, params(), {}, (x,), "auto",
                                                 frozenset({"linear", "conv"}))
            torch.autograd.grad(y.sum(), flat)

        methods = {"vmap runs every layer": vmapped(template),
                   "batched() as it runs here": lambda: torch.autograd.grad(net(x, flat).sum(), flat),
                   "kernels via unwrapped tensors (swapped class)": unwrapped}
        if isinstance(template, ResidualMLP):
            for name, cls in (("kernels via autograd.Function vmap rule", FunctionLinear),
                              ("kernels via torch.library register_vmap", OpLinear)):
                m = copy.deepcopy(template)
                for layer in m.modules():
                    if type(layer) is nn.Linear:
                        layer.__class__ = cls
                methods[name] = vmapped(m)
            methods["kernels via TorchFunctionMode"] = vmapped(template, Mode)
        timings = time_interleaved(methods, device, budget_s=budget_s)
        base = timings["vmap runs every layer"]
        for name, t in timings.items():
            lines.append(f"| {label} | {name} | {_ms(t)} | {paired_speedup(base, t):.2f} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of interleaved rounds per row")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--mechanisms", action="store_true", help="compare the per-sample mechanisms instead")
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    header = [f"device: {name} | {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} | "
              f"torch {torch.__version__} | {args.dtype}",
              f"command: python {' '.join(sys.argv)}",
              "median ms over interleaved rounds; speedup = median of the per-round ratios vmap / batched; (!) = the "
              "rounds spread by more than 25 % (a busy machine): that time is not a measurement", ""]
    print("\n".join(header))
    if args.mechanisms:
        body = ["| model | mechanism | fwd+bwd ms | speedup vs vmap |", "|---|---|---:|---:|"]
        print("\n".join(body))
        body += run_mechanisms(device, dtype, args.budget)
    else:
        body = ["| model | shape | batched fwd ms | vmap fwd ms | fwd speedup | batched fwd+bwd ms | vmap fwd+bwd ms "
                "| fwd+bwd speedup | max abs diff |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        print("\n".join(body))
        body += [_row_md(case, row) for case, row in zip(CASES, run_table(device, dtype, args.budget))]
    if args.out:
        with open(args.out, "a" if args.mechanisms else "w") as f:
            f.write("\n".join(header + body) + "\n\n")


if __name__ == "__main__":
    main()
