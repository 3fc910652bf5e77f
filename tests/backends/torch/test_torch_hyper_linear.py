"""The torch backend's hyper_linear: its chunking (whole samples per chunk, or one sample cut along N) gives the
same results, and its forward + backward peak memory stays bounded by its chunk budget."""
import pytest
import torch

import hyperkernels as hk
from conftest import bench_module, run_hyper_linear_case
from hyperkernels.backends.torch import hyper_linear as torch_hyper

timing = bench_module("timing")  # the benchmark's peak-memory measurement


@pytest.mark.parametrize("budget", ["one_row", "one_sample_in_parts", "several_samples"])
def test_torch_backend_chunks(monkeypatch, budget):
    """The torch backend's chunking: whole samples per chunk, and one sample cut along N, give the same result."""
    b, n, i, o, k = 5, 6, 4, 3, 7
    per_row = i * k * 8 * 2  # float64, backward's two temporaries
    monkeypatch.setattr(torch_hyper, "CHUNK_BYTES", {"one_row": 1, "one_sample_in_parts": 4 * per_row,
                                                      "several_samples": 13 * per_row}[budget])
    run_hyper_linear_case(((b, n, i, o, k), "silu", torch.float64, True, True), "torch", "cpu")


def test_torch_backend_peak_memory_is_bounded():
    """B = 8192, 256x256 generated layers: generate-then-apply would hold B*out*in = 537M weights (2.1 GB) and
    their gradient; the torch backend's forward + backward stays under a tenth of that, and under its chunk
    budget plus the size of its inputs and outputs."""
    b, i, o, k = 8192, 256, 256, 4
    x = torch.randn(b, 1, i)
    h = torch.randn(b, k, requires_grad=True)
    head_weight = (torch.randn(o * i + o, k) / (i * k) ** 0.5).requires_grad_()
    head_bias = torch.zeros(o * i + o, requires_grad=True)

    def step():
        y = hk.hyper_linear(x, h, head_weight, head_bias, out_features=o, activation="relu", backend="torch")
        torch.autograd.grad(y, (h, head_weight, head_bias), torch.ones_like(y))

    peak = timing.peak_bytes(step, torch.device("cpu"))
    itemsize = x.element_size()
    assert peak < b * o * i * itemsize / 10, f"peak {peak / 2**20:.0f} MiB"
    io = (x.numel() + 4 * b * o + 2 * head_weight.numel() + 2 * b * k) * itemsize
    assert peak < torch_hyper.CHUNK_BYTES + io, f"peak {peak / 2**20:.0f} MiB"
