"""A conditional neural ODE: a hypernetwork generates each time series' own dynamics, integrated with RK4.

The workload: a family of damped oscillators ``x'' + 2 zeta omega x' + omega^2 x = 0``, each series with its
own frequency ``omega``, damping ``zeta`` and starting state. The model sees a short observed prefix of a series
(its first points: position and velocity), an encoder maps the prefix to a condition, and a hypernetwork maps the
condition to the weights of that series' dynamics MLP ``f: (x, v) -> d(x, v)/dt``. Fixed-step RK4 integrates
every series' ``f`` over the whole series: 22 steps of 4 stages, so 88 evaluations of B different MLPs per
forward pass, each on one point per sample (N = 1). Training fits the observed series; the held-out error is on
series with new (omega, zeta) pairs, predicted from their prefix alone.

How users write it today: generate the flat weights ``params (B, P)`` once per forward pass, then at every RK4
stage run the per-sample MLP either as ``vmap(functional_call(dynamics, split(params), (state,)))`` or as a
"parallel MLP" of ``Conv1d(groups=B)`` layers on weights reshaped to ``(B * out, in, 1)``. With hyperkernels
``HyperNetwork.bind`` generates the weights once and hands out every series' network bound to them, which RK4
calls like any function. The one-line change::

    params = hypernet(cond)                                  # today: the weights (B, P), once per forward pass
    f = lambda s: vmap(lambda p, x: functional_call(dynamics, p, (x,)))(split(params), s)

    f = hnet.bind(cond)                                      # hyperkernels: hnet = hk.nn.HyperNetwork(dynamics,
                                                             #   cond_features=...), or hypernet=your_module

``--compare`` times one training step (forward, backward, gradient clipping, Adam) of this same model all three
ways, interleaved round-robin in one run, from identical weights and data, after checking that the three agree
(trajectories and every gradient).

    python examples/conditional_ode.py                      # trains: about a minute on a laptop CPU
    python examples/conditional_ode.py --compare            # the three ways, timed side by side
    python examples/conditional_ode.py --device cuda --batch 1024 --compare
    python examples/conditional_ode.py --steps 20           # a smoke test
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import time

import torch
from torch import Tensor, nn

import hyperkernels as hk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _compare import (check_agreement, grouped_conv_today, positive_int, print_table, time_rounds,  # noqa: E402
                      vmap_today)

GRAD_CLIP = 1.0  # the largest gradient norm a step takes (see train_step)


def draw_series(n: int, points: int, dt: float, generator: torch.Generator) -> Tensor:
    """n damped oscillators sampled at ``points`` times ``0, dt, 2 dt, ...``: states (n, points, 2), each
    (position, velocity). Exact: the flow of the linear ODE over one step is ``matrix_exp(M dt)``."""
    omega = 1.5 + 2.0 * torch.rand(n, generator=generator)   # periods 1.8 to 4.2 (the defaults' series: 3.3)
    zeta = 0.05 + 0.25 * torch.rand(n, generator=generator)
    state = torch.randn(n, 2, generator=generator)
    m = torch.zeros(n, 2, 2)
    m[:, 0, 1] = 1
    m[:, 1, 0] = -omega**2
    m[:, 1, 1] = -2 * zeta * omega
    flow = torch.linalg.matrix_exp(m.double() * dt)
    states = [state.double()]
    for _ in range(points - 1):
        states.append((flow @ states[-1].unsqueeze(2)).squeeze(2))
    return torch.stack(states, dim=1).float()


def dynamics_template(width: int) -> nn.Sequential:
    """One series' dynamics, as one would write it for a single series: only a template here."""
    return nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2))


def rk4(f, state: Tensor, dt: float, steps: int) -> Tensor:
    """Fixed-step classic Runge-Kutta: the states (B, steps + 1, 2), 4 evaluations of ``f`` a step."""
    states = [state]
    for _ in range(steps):
        k1 = f(state)
        k2 = f(state + dt / 2 * k1)
        k3 = f(state + dt / 2 * k2)
        k4 = f(state + dt * k3)
        state = state + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        states.append(state)
    return torch.stack(states, dim=1)


class ConditionalODE(nn.Module):
    """prefix (B, prefix, 2) -> condition -> per-series dynamics weights -> RK4 trajectory (B, points, 2)."""

    def __init__(self, prefix: int, cond_features: int, hidden: int, width: int):
        super().__init__()
        self.prefix = prefix
        self.encoder = nn.Sequential(nn.Linear(2 * prefix, hidden), nn.Tanh(), nn.Linear(hidden, cond_features))
        self.hnet = hk.nn.HyperNetwork(dynamics_template(width), cond_features=cond_features, hidden=(hidden,))

    def forward(self, series: Tensor, dt: float, today=None) -> Tensor:
        """The predicted trajectory from ``series[:, 0]`` over ``series.shape[1]`` points, the dynamics generated
        from ``series[:, :prefix]``. ``today``: ``None`` runs the dynamics with hyperkernels; else a function
        ``params (B, P) -> f`` that runs them another way (``vmap_today`` or ``grouped_conv_today``)."""
        cond = self.encoder(series[:, :self.prefix].flatten(1))
        if today is None:
            f = self.hnet.bind(cond)  # the weights generated once per forward pass, run by every RK4 stage
        else:
            f = today(self.hnet.generate(cond))
        return rk4(f, series[:, 0], dt, series.shape[1] - 1)


def train_step(model: ConditionalODE, opt: torch.optim.Optimizer, batch: Tensor, dt: float, today=None) -> Tensor:
    """One step on the squared error of the whole trajectory. Clipping the gradient norm keeps a step whose
    generated dynamics blow up over the series (more likely early on) from undoing what was learnt."""
    loss = (model(batch, dt, today) - batch).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    opt.step()
    return loss.detach()


def held_out_error(model: ConditionalODE, series: Tensor, dt: float) -> tuple[float, float]:
    """(mean squared error, relative error ||pred - true|| / ||true||) after the prefix; predicting zeros has
    relative error 1."""
    with torch.no_grad():
        pred = model(series, dt)
    p, t = pred[:, model.prefix:], series[:, model.prefix:]
    return (p - t).square().mean().item(), ((p - t).norm() / t.norm()).item()


def train(args, model, train_series, test_series, gen) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    mse, rel = held_out_error(model, test_series, args.dt)
    print(f"step {0:5d}  held-out mse {mse:.5f}  relative error {rel:.4f}")
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, train_series.shape[0], (args.batch,), generator=gen).to(train_series.device)
        loss = train_step(model, opt, train_series[idx], args.dt)
        sched.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            mse, rel = held_out_error(model, test_series, args.dt)
            print(f"step {step:5d}  train loss {loss.item():.5f}  held-out mse {mse:.5f}  relative error "
                  f"{rel:.4f}  ({time.perf_counter() - start:.1f} s)", flush=True)
    window = max(1, len(losses) // 10)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"train loss {first:.5f} -> {last:.5f} (mean of the first and last {window} steps); "
          f"held-out mse {mse:.5f}, relative error {rel:.4f} ({test_series.shape[0]} new series, "
          f"{test_series.shape[1] - model.prefix} points each after the prefix)")


def compare(args, model, train_series, device) -> None:
    template = dynamics_template(args.width).to(device)  # its own weights are never used
    ways = {"hyperkernels": None, "vmap(functional_call)": functools.partial(vmap_today, template),
            "grouped Conv1d": functools.partial(grouped_conv_today, template)}
    batch = train_series[:args.batch]

    results = {}
    for name, today in ways.items():
        model.zero_grad(set_to_none=True)
        pred = model(batch, args.dt, today)
        (pred - batch).square().mean().backward()
        results[name] = [pred.detach()] + [p.grad.clone() for p in model.parameters()]
    names = ["trajectory"] + [f"grad {n}" for n, _ in model.named_parameters()]
    if not check_agreement(results, names, rtol=args.rtol):
        raise SystemExit("the three ways disagree: not timing them")

    def make_step(today):
        own = copy.deepcopy(model)  # the same weights for every way; each steps its own copy
        opt = torch.optim.Adam(own.parameters(), lr=args.lr)
        return lambda: train_step(own, opt, batch, args.dt, today)

    times = time_rounds({name: make_step(today) for name, today in ways.items()}, device, args.rounds)
    print_table(f"one training step (forward, backward, gradient clipping, Adam), B = {args.batch} series, "
                f"{4 * (args.points - 1)} evaluations of a 2-{args.width}-{args.width}-2 tanh MLP per forward", times,
                "vmap(functional_call)", device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=positive_int, default=600, help="training steps (20 for a smoke test)")
    parser.add_argument("--batch", type=positive_int, default=64, help="series per step (B)")
    parser.add_argument("--series", type=positive_int, default=4096, help="training series")
    parser.add_argument("--test-series", type=positive_int, default=512, help="held-out series")
    parser.add_argument("--points", type=positive_int, default=23, help="points per series: 4 (points - 1) evaluations")
    parser.add_argument("--prefix", type=positive_int, default=6, help="observed points the condition is encoded from")
    parser.add_argument("--dt", type=float, default=0.15, help="time between points (and the RK4 step)")
    parser.add_argument("--width", type=positive_int, default=32, help="hidden width of the dynamics MLP")
    parser.add_argument("--hidden", type=positive_int, default=64, help="hidden width of the encoder and hypernetwork")
    parser.add_argument("--cond", type=positive_int, default=16, help="size of the condition")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true",
                        help="instead of training: time a training step against vmap and grouped Conv1d")
    parser.add_argument("--rounds", type=positive_int, default=20, help="--compare: interleaved timing rounds")
    parser.add_argument("--rtol", type=float, default=1e-5, help="--compare: agreement tolerance (relative norm)")
    args = parser.parse_args()
    if args.points <= args.prefix:
        parser.error(f"--prefix: expected fewer than --points ({args.points}) observed points, got {args.prefix}")
    if args.compare and args.batch > args.series:
        parser.error(f"--batch: --compare times one batch of the {args.series} --series, got {args.batch}")

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_series = draw_series(args.series, args.points, args.dt, gen).to(device)
    test_series = draw_series(args.test_series, args.points, args.dt, gen).to(device)
    model = ConditionalODE(args.prefix, args.cond, args.hidden, args.width).to(device)
    print(f"dynamics MLP 2-{args.width}-{args.width}-2: {model.hnet.num_params} weights per series, generated from "
          f"a {args.prefix}-point prefix; RK4 over {args.points} points = {4 * (args.points - 1)} evaluations per "
          f"forward pass")
    if args.compare:
        compare(args, model, train_series, device)
    else:
        train(args, model, train_series, test_series, gen)


if __name__ == "__main__":
    main()
