"""What the workload examples share for ``--compare``: the two ways per-sample MLPs are run today
(``vmap(functional_call)`` and the grouped-Conv1d "parallel MLP"), an agreement check, and the table of an
interleaved timing; and their size flags' type.

The timing is the benchmark's (``bench/timing.py``: every round runs every method once, in a changing order, so a
busy machine slows all methods alike, and each method's speed against the baseline is the median of its
per-round ratios).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import sys
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from timing import UNTRUSTED_SPREAD, Timing, paired_speedup, time_interleaved  # noqa: E402,F401

_ACTIVATIONS = {nn.ReLU: F.relu, nn.Tanh: torch.tanh, nn.SiLU: F.silu, nn.Sigmoid: torch.sigmoid,
                nn.Identity: lambda x: x}


def positive_int(text: str) -> int:
    """argparse type of the size flags: a positive int, else a message naming what was given."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def split_params(params: Tensor, template: nn.Module) -> dict[str, Tensor]:
    """A flat ``(B, P)`` hypernetwork output as ``{name: (B, *shape)}`` views, in the order of
    ``template.named_parameters()``: how hypernetwork code slices its output before ``functional_call``."""
    views, start = {}, 0
    for name, p in template.named_parameters():
        views[name] = params[:, start:start + p.numel()].view(params.shape[0], *p.shape)
        start += p.numel()
    if start != params.shape[1]:
        raise ValueError(f"params: expected shape (B, {start}) for the template's parameters, got "
                         f"{tuple(params.shape)}")
    return views


def vmap_today(template: nn.Module, params: Tensor) -> Callable[[Tensor], Tensor]:
    """``x (B, ...) -> y``: ``template`` with sample b's weights on ``x[b]``, by ``vmap(functional_call)``."""
    views = split_params(params, template)
    run = vmap(lambda p, x: functional_call(template, p, (x,)))
    return lambda x: run(views, x)


def grouped_conv_today(template: nn.Sequential, params: Tensor) -> Callable[[Tensor], Tensor]:
    """``x (B, in) or (B, N, in) -> y``: every sample's MLP as one ``Conv1d`` with ``groups = B`` per layer (the
    "parallel MLP" formulation). Conv needs each layer's weights as one contiguous ``(B * out, in, 1)`` tensor,
    so they are copied out of ``params`` here, once per weight set (an ODE solver then reuses them)."""
    views = split_params(params, template)
    batch = params.shape[0]
    layers = []  # (weight, bias, activation)
    for index, module in template.named_children():
        if isinstance(module, nn.Linear):
            w = views[f"{index}.weight"].reshape(batch * module.out_features, module.in_features, 1)
            b = views[f"{index}.bias"].reshape(-1) if module.bias is not None else None
            layers.append([w, b, None])
        elif type(module) in _ACTIVATIONS and layers and layers[-1][2] is None:
            layers[-1][2] = _ACTIVATIONS[type(module)]
        else:
            raise ValueError(f"template: layer {index} ({type(module).__name__}) is not an nn.Linear or one "
                             f"activation after one: {[t.__name__ for t in _ACTIVATIONS]}")

    def run(x: Tensor) -> Tensor:
        points = x.dim() == 3
        h = x.transpose(1, 2) if points else x.unsqueeze(2)        # (B, in, N): channels first
        h = h.reshape(1, -1, h.shape[2])                            # (1, B * in, N): a copy when N > 1
        for w, b, act in layers:
            h = F.conv1d(h, w, b, groups=batch)
            if act is not None:
                h = act(h)
        h = h.view(batch, -1, h.shape[2])
        return h.transpose(1, 2) if points else h.squeeze(2)

    return run


def check_agreement(results: Mapping[str, Sequence[Tensor]], names: Sequence[str], rtol: float) -> bool:
    """Print, for every method against the first, the largest ``||a - b|| / ||b||`` over the tensors of
    ``results[method]`` (outputs, then gradients, named by ``names``); True when all are within ``rtol``."""
    methods = list(results)
    reference = results[methods[0]]
    ok = True
    for method in methods[1:]:
        errors = {name: ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
                  for name, a, b in zip(names, results[method], reference)}
        # NaN is the worst of all, and never within the tolerance.
        worst_name = max(errors, key=lambda n: math.inf if math.isnan(errors[n]) else errors[n])
        worst = errors[worst_name]
        agree = all(e <= rtol for e in errors.values())
        ok = ok and agree
        verdict = "ok" if agree else "DISAGREE"
        print(f"agreement: {method} vs {methods[0]}: max relative difference {worst:.1e} ({worst_name}) over "
              f"{len(names)} tensors (outputs and gradients): {verdict} (tolerance {rtol:.0e})")
    return ok


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return (f"CPU {platform.processor() or platform.machine()}, {threads} thread{'s' if threads != 1 else ''}, "
            f"torch {torch.__version__}")


def print_table(title: str, timings: Mapping[str, "Timing"], baseline: str, device: torch.device) -> None:
    """The comparison as a markdown table, headed by what a README quoting it must say: device, date and the
    exact command. ``timings``: what ``time_interleaved`` returned."""
    rounds = max(t.rounds for t in timings.values())
    print(f"\n{title}")
    print(f"device: {device_description(device)}; date: {datetime.date.today().isoformat()}; {rounds} interleaved "
          "rounds")
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"\n| method | median ms | min ms | spread | speed vs {baseline} |")
    print("|---|---:|---:|---:|---:|")
    for name, t in timings.items():
        if t.error is not None:
            print(f"| {name} | failed: {t.error} | | | |")
            continue
        # Paired per round: the baseline and this method ran in the same round, under the same load.
        speed = paired_speedup(timings[baseline], t)
        flag = "" if t.trusted else " (noisy: do not quote)"
        print(f"| {name} | {t.median_ms:.2f} | {t.min_ms:.2f} | {100 * t.spread:.0f}%{flag} | {speed:.2f}x |")
    print(f"\nspread: (p90 - p10) / median of the rounds; above {100 * UNTRUSTED_SPREAD:.0f}% the machine was too "
          "busy for the median to mean much. speed: the median over rounds of the baseline's time / the method's.")


def time_rounds(steps: Mapping[str, Callable[[], object]], device: torch.device, rounds: int) -> dict:
    """``rounds`` interleaved rounds of every step after two untimed calls of each (allocator growth, first-call
    set-up): name -> ``Timing``."""
    return time_interleaved(steps, device, budget_s=0, min_rounds=rounds, max_rounds=rounds, warmup=2)
