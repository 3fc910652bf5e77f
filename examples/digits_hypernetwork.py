"""A hypernetwork writes a classifier for any task it is described, on scikit-learn's 8x8 digits.

The workload: a task is a set S of digits (any of the 1022 subsets of 0-9 other than none and all), described to
the hypernetwork by 10 numbers (+1 for a digit in S, -1 for one outside), and the classifier it generates answers
"is this image's digit in S?". A training example is an (image, task) pair, so every example of a batch has its
own classifier: B per-sample MLPs ``64 -> 32 -> 32 -> 1``, each run on one image (N = 1), the regime where
per-sample weights cost the most. A quarter of the tasks and a quarter of the images (the 1797 images bundled
with scikit-learn: real handwriting, no download) are held out. The held-out error is that of classifiers
generated for tasks never seen in training, on images never seen in training: the hypernetwork has learnt to
write classifiers, not just the training ones. (Evaluation runs each held-out task's classifier on all held-out
images: N = 450 points per sample.)

How users write it today: ``params = hypernet(task)`` (B, P), then ``vmap(functional_call(classifier,
split(params), (x,)))`` or a "parallel MLP" of ``Conv1d(groups=B)`` layers on weights reshaped to
``(B * out, in, 1)``. With hyperkernels the same hypernetwork module is wrapped, unchanged (its ``state_dict``
loads as is), and the one-line change is::

    logits = vmap(lambda p, x: functional_call(classifier, p, (x,)))(split(hypernet(task)), images)   # today
    logits = hnet(task, images)              # hyperkernels: hnet = hk.nn.HyperNetwork(classifier, hypernet=hypernet)

``--compare`` times one training step (forward, backward, Adam) all three ways, interleaved round-robin in one
run, from identical weights and data, after checking that they agree (outputs and every gradient).

Needs scikit-learn (``pip install scikit-learn``); without it the example says so and exits.

    python examples/digits_hypernetwork.py                  # trains: about a minute on a laptop CPU
    python examples/digits_hypernetwork.py --compare        # the three ways, timed side by side
    python examples/digits_hypernetwork.py --device cuda --batch 4096 --compare
    python examples/digits_hypernetwork.py --steps 20       # a smoke test
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

DIGITS = 10


def load_images(device: torch.device) -> tuple[Tensor, Tensor]:
    """(images (1797, 64) in [-1, 1], digits (1797,)), or exit with a message without scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("scikit-learn is not installed, so there are no digits to learn: skipping this example "
              "(pip install scikit-learn)")
        raise SystemExit(0)
    images, digits = load_digits(return_X_y=True)  # pixels are 0..16
    return (torch.tensor(images, dtype=torch.float32, device=device) / 8 - 1,
            torch.tensor(digits, dtype=torch.long, device=device))


def all_tasks() -> Tensor:
    """Every subset of the digits but the empty and the full one, as (1022, 10) codes: +1 in, -1 out."""
    members = (torch.arange(1, 2**DIGITS - 1)[:, None] >> torch.arange(DIGITS)) & 1
    return members.float() * 2 - 1


def classifier_template(width: int) -> nn.Sequential:
    """One task's classifier, as one would write it for a single task: only a template here."""
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))


def labels(codes: Tensor, digits: Tensor) -> Tensor:
    """Whether each digit is in its task's set, as 0. / 1.: codes (..., 10), digits (...)."""
    return (codes.gather(-1, digits.unsqueeze(-1)).squeeze(-1) > 0).float()


def error_rates(hnet: hk.nn.HyperNetwork, codes: Tensor, images: Tensor, digits: Tensor) -> tuple[float, float]:
    """(error of the generated classifiers, error of always answering each task's majority class), every task's
    classifier on every image: B = tasks, N = images."""
    with torch.no_grad():
        logits = hnet(codes, images.expand(codes.shape[0], *images.shape)).squeeze(-1)  # (tasks, images)
    truth = labels(codes[:, None, :].expand(-1, digits.shape[0], -1), digits.expand(codes.shape[0], -1))
    majority = truth.mean(1, keepdim=True).round()
    return ((logits > 0).float() != truth).float().mean().item(), (majority != truth).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=positive_int, default=1000, help="training steps (20 for a smoke test)")
    parser.add_argument("--batch", type=positive_int, default=256, help="(image, task) pairs per step (B)")
    parser.add_argument("--width", type=positive_int, default=32, help="hidden width of the generated classifiers")
    parser.add_argument("--hidden", type=positive_int, default=128, help="hidden width of the hypernetwork")
    parser.add_argument("--held-out", type=float, default=0.25, help="fraction of tasks and of images held out")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true",
                        help="instead of training: time a training step against vmap and grouped Conv1d")
    parser.add_argument("--rounds", type=positive_int, default=20, help="--compare: interleaved timing rounds")
    parser.add_argument("--rtol", type=float, default=1e-5, help="--compare: agreement tolerance (relative norm)")
    args = parser.parse_args()
    if not 0 < args.held_out < 1:
        parser.error(f"--held-out: expected a fraction strictly between 0 and 1, got {args.held_out}")

    device = torch.device(args.device)
    images, digits = load_images(device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    tasks = all_tasks()[torch.randperm(2**DIGITS - 2, generator=gen)].to(device)
    order = torch.randperm(images.shape[0], generator=gen).to(device)
    n_tasks, n_images = int(tasks.shape[0] * args.held_out), int(images.shape[0] * args.held_out)
    test_tasks, train_tasks = tasks[:n_tasks], tasks[n_tasks:]
    test_images, train_images = images[order[:n_images]], images[order[n_images:]]
    test_digits, train_digits = digits[order[:n_images]], digits[order[n_images:]]

    template = classifier_template(args.width)
    num_params = sum(p.numel() for p in template.parameters())
    # The hypernetwork as one would write it without hyperkernels; HyperNetwork takes it as is.
    hypernet = nn.Sequential(nn.Linear(DIGITS, args.hidden), nn.ReLU(), nn.Linear(args.hidden, num_params))
    hnet = hk.nn.HyperNetwork(template, hypernet=hypernet).to(device)
    print(f"classifier 64-{args.width}-{args.width}-1: {hnet.num_params} weights per (image, task) pair, generated "
          f"from 10 numbers; {train_tasks.shape[0]} training tasks x {train_images.shape[0]} training images, "
          f"{test_tasks.shape[0]} held-out tasks x {test_images.shape[0]} held-out images")

    def draw_batch():
        t = torch.randint(0, train_tasks.shape[0], (args.batch,), generator=gen).to(device)
        i = torch.randint(0, train_images.shape[0], (args.batch,), generator=gen).to(device)
        codes = train_tasks[t]
        return codes, train_images[i], labels(codes, train_digits[i])

    loss_fn = nn.BCEWithLogitsLoss()
    if args.compare:
        compare(args, hnet, template.to(device), draw_batch(), loss_fn, device)
        return

    opt = torch.optim.Adam(hnet.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    err, chance = error_rates(hnet, test_tasks, test_images, test_digits)
    print(f"step {0:5d}  held-out error {err:.4f}  (majority class per task: {chance:.4f})")
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        codes, x, y = draw_batch()
        loss = loss_fn(hnet(codes, x).squeeze(1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            err, _ = error_rates(hnet, test_tasks, test_images, test_digits)
            print(f"step {step:5d}  train loss {loss.item():.4f}  held-out error {err:.4f}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    train_err, _ = error_rates(hnet, train_tasks, test_images, test_digits)
    window = max(1, len(losses) // 10)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"train loss {first:.4f} -> {last:.4f} (mean of the first and last {window} steps); held-out error "
          f"{err:.4f} on new tasks and new images ({train_err:.4f} on training tasks and new images; always "
          f"answering each task's majority class: {chance:.4f})")


def compare(args, hnet, template, batch, loss_fn, device) -> None:
    codes, x, y = batch
    ways = {"hyperkernels": None, "vmap(functional_call)": functools.partial(vmap_today, template),
            "grouped Conv1d": functools.partial(grouped_conv_today, template)}

    def loss_of(net, today):
        logits = net(codes, x) if today is None else today(net.generate(codes))(x)
        return logits, loss_fn(logits.squeeze(1), y)

    results = {}
    for name, today in ways.items():
        hnet.zero_grad(set_to_none=True)
        logits, loss = loss_of(hnet, today)
        loss.backward()
        results[name] = [logits.detach()] + [p.grad.clone() for p in hnet.parameters()]
    names = ["logits"] + [f"grad {n}" for n, _ in hnet.named_parameters()]
    if not check_agreement(results, names, rtol=args.rtol):
        raise SystemExit("the three ways disagree: not timing them")

    def make_step(today):
        own = copy.deepcopy(hnet)  # the same weights for every way; each steps its own copy
        opt = torch.optim.Adam(own.parameters(), lr=args.lr)

        def step():
            _, loss = loss_of(own, today)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    times = time_rounds({name: make_step(today) for name, today in ways.items()}, device, args.rounds)
    print_table(f"one training step (forward, backward, Adam), B = {args.batch} (image, task) pairs, one "
                f"64-{args.width}-{args.width}-1 ReLU classifier each, hypernetwork 10-{args.hidden}-"
                f"{hnet.num_params}", times, "vmap(functional_call)", device)


if __name__ == "__main__":
    main()
