"""A hypernetwork fits a family of images as per-image neural fields.

Every image (no download: drawn procedurally) is a soft-edged coloured disk on a shaded background, set by 9
numbers: the disk's centre and radius, its colour and the background's colour. A ``HyperNetwork`` maps those 9
numbers to the weights of a small MLP over pixel coordinates, one MLP per image, and ``hyperkernels`` runs every
image's MLP on all of its pixels (N = size * size points per sample) in one fused op per step. The example
prints the training loss going down and the loss on held-out images (drawn from numbers never seen in training),
and writes a PNG of targets beside reconstructions.

    python examples/conditional_field.py                      # about a minute on a laptop CPU
    python examples/conditional_field.py --device cuda --steps 5000 --size 64
    python examples/conditional_field.py --activation sine    # a SIREN target network
    python examples/conditional_field.py --steps 20 --size 16 # a smoke test
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import hyperkernels as hk

COND_FEATURES = 9  # centre (2), radius (1), disk colour (3), background colour (3)
FOURIER_BANDS = 4  # sin/cos of the coordinates at 1, 2, 4, 8 x pi: lets a small ReLU MLP draw sharp edges


def draw_conditions(n: int, generator: torch.Generator) -> torch.Tensor:
    """n sets of the 9 numbers, each in [0, 1]."""
    return torch.rand(n, COND_FEATURES, generator=generator)


def render(cond: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """The images (n, size*size, 3) set by cond (n, 9), at coords (size*size, 2) in [-1, 1]."""
    centre = cond[:, None, 0:2] * 1.2 - 0.6
    radius = cond[:, None, 2:3] * 0.4 + 0.15
    disk, background = cond[:, None, 3:6], cond[:, None, 6:9]
    dist = (coords[None] - centre).norm(dim=-1, keepdim=True)
    inside = torch.sigmoid((radius - dist) / 0.02)
    shade = 0.6 + 0.4 * (coords[None, :, 1:2] + 1) / 2  # the background darkens towards the top
    return inside * disk + (1 - inside) * background * shade


def pixel_grid(size: int) -> torch.Tensor:
    axis = torch.linspace(-1, 1, size)
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([u.flatten(), v.flatten()], dim=1)


def encode(coords: torch.Tensor, activation: str) -> torch.Tensor:
    """The target network's input per pixel: Fourier features for ReLU, the raw coordinates for SIREN."""
    if activation == "sine":
        return coords
    freqs = math.pi * 2.0 ** torch.arange(FOURIER_BANDS, dtype=coords.dtype)
    angles = (coords[:, :, None] * freqs).flatten(1)
    return torch.cat([coords, torch.sin(angles), torch.cos(angles)], dim=1)


def target_network(in_features: int, width: int, activation: str) -> nn.Sequential:
    """The per-image field: an ordinary nn.Sequential, used as a template."""
    if activation == "sine":
        # SIREN: sin(w0 z) after the first layer, sin(z) after the others. w0 = 10 rather than SIREN's 30: with
        # hyperfan-initialised weights, 30 starts at frequencies so high that 300 steps learn little more than
        # the colours (held-out loss 0.019 against 0.008 with 10, measured at the defaults).
        return nn.Sequential(nn.Linear(in_features, width), hk.nn.Sine(10.0), nn.Linear(width, width),
                             hk.nn.Sine(1.0), nn.Linear(width, width), hk.nn.Sine(1.0), nn.Linear(width, 3),
                             nn.Sigmoid())
    return nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3), nn.Sigmoid())


def save_png(path: str, targets: torch.Tensor, recons: torch.Tensor, size: int, n_train: int) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed, so no PNG was written to {path} (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = targets.shape[0]
    fig, axes = plt.subplots(2, cols, figsize=(1.6 * cols, 3.4))
    for j in range(cols):
        for i, (images, label) in enumerate([(targets, "target"), (recons, "hypernetwork")]):
            ax = axes[i, j]
            ax.imshow(images[j].reshape(size, size, 3).clamp(0, 1).numpy(), origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label)
            if i == 0:
                ax.set_title("train" if j < n_train else "held out", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=300, help="training steps (20 for a smoke test)")
    parser.add_argument("--size", type=int, default=32, help="images are size x size pixels")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--images", type=int, default=512, help="training images")
    parser.add_argument("--width", type=int, default=64, help="hidden width of the per-image MLP")
    parser.add_argument("--activation", choices=["relu", "sine"], default="relu", help="the field's activation")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default="conditional_field.png", help="where to write the PNG (empty: nowhere)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    coords = pixel_grid(args.size)
    train_cond, test_cond = draw_conditions(args.images, gen), draw_conditions(64, gen)
    train_img, test_img = render(train_cond, coords), render(test_cond, coords)
    inputs = encode(coords, args.activation)

    template = target_network(inputs.shape[1], args.width, args.activation)
    hnet = hk.nn.HyperNetwork(template, cond_features=COND_FEATURES, hidden=(128, 128)).to(device)
    print(f"target: {hnet.num_params} weights per image, run on {args.size * args.size} pixels each; "
          f"hypernetwork: {sum(p.numel() for p in hnet.parameters())} weights")
    opt = torch.optim.Adam(hnet.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    train_cond, train_img = train_cond.to(device), train_img.to(device)
    inputs = inputs.to(device)

    def reconstruct(cond):
        x = inputs.expand(cond.shape[0], *inputs.shape)  # every image sees the same pixels: no copy
        return hnet(cond * 2 - 1, x)

    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, args.images, (args.batch,), generator=gen).to(device)
        loss = (reconstruct(train_cond[idx]) - train_img[idx]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.5f}  ({time.perf_counter() - start:.1f} s)", flush=True)

    with torch.no_grad():
        test_loss = (reconstruct(test_cond.to(device)) - test_img.to(device)).square().mean().item()
        show_cond = torch.cat([train_cond[:4].cpu(), test_cond[:4]])
        recons = reconstruct(show_cond.to(device)).cpu()
    window = max(1, len(losses) // 10)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"train loss {first:.5f} -> {last:.5f} (mean of the first and last {window} steps); "
          f"held-out loss {test_loss:.5f}")
    if args.out:
        save_png(args.out, torch.cat([train_img[:4].cpu(), test_img[:4]]), recons, args.size, 4)


if __name__ == "__main__":
    main()
