"""Multi-process training of a HyperNetwork with DistributedDataParallel: 2 CPU processes (gloo), each on half
of every batch; the ranks stay identical and match one process trained on the whole batch."""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import hyperkernels as hk

WORLD = 2
STEPS = 4
BATCH = 8
# A rank that dies leaves the other waiting in a collective: bound both, so CI fails instead of hanging.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
DEADLINE_S = 180  # split evenly: each rank's mean loss averaged by DDP is the whole batch's mean loss


def make_model():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    return hk.nn.HyperNetwork(target, cond_features=4, hidden=(32,), shared=("4.bias",))


def make_data():
    """One batch, fitted for STEPS steps (so the loss goes down step by step)."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 4, generator=g), torch.randn(BATCH, 10, 2, generator=g),
             torch.randn(BATCH, 10, 3, generator=g))] * STEPS


def train(model, data, rank=0, world=1):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for cond, x, y in data:
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        opt.zero_grad()
        loss = (model(cond[part], x[part]) - y[part]).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        model = DistributedDataParallel(make_model())
        losses = train(model, make_data(), rank, WORLD)
        torch.save({"params": {k: v.detach() for k, v in model.module.state_dict().items()}, "losses": losses},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_ddp_two_processes_match_one(tmp_path):
    context = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the DDP ranks did not finish within {DEADLINE_S} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = make_model()
    losses = train(single, make_data())
    for name, ref in single.state_dict().items():
        p0, p1 = ranks[0]["params"][name], ranks[1]["params"][name]
        assert torch.equal(p0, p1), f"{name}: the ranks diverged"
        # the same gradients up to the fp32 summation order of the all-reduce
        torch.testing.assert_close(p0, ref, rtol=1e-4, atol=1e-5, msg=name)
    assert ranks[0]["params"]["target.shared.4_bias"].shape == (3,)
    mean_rank_loss = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    torch.testing.assert_close(torch.tensor(mean_rank_loss), torch.tensor(losses), rtol=1e-4, atol=1e-6)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
