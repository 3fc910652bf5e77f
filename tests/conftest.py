"""Test set-up: seeds, the backend x device matrix, GPU skips, and the Triton interpreter on CPU."""
import os

import torch

# Triton kernels run on CPU tensors through the interpreter. It must be switched on before the first
# `import triton` (set later, it breaks the tl.* helpers), so here, before anything imports hyperkernels' Triton backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hyperkernels._dispatch import available_backends, get_backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def backend_params():
    """Every concrete backend on every device of this machine, as pytest params; combinations that
    cannot run here are kept as skips that say why."""
    params = []
    for name, reason in available_backends().items():
        for device in DEVICES:
            marks = []
            if reason is not None:
                marks.append(pytest.mark.skip(reason=f"backend {name} unavailable: {reason}"))
            else:
                why = get_backend(name).check_support(torch.device(device), torch.float32)
                if why is not None:
                    marks.append(pytest.mark.skip(reason=f"backend {name} on {device}: {why}"))
            params.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return params


def supports(backend: str, device: str, dtype: torch.dtype) -> bool:
    return get_backend(backend).check_support(torch.device(device), dtype) is None


def is_slow_path(backend: str, device: str) -> bool:
    """Interpreted Triton on CPU: keep its shapes few and small."""
    return device == "cpu" and backend not in ("torch_bmm", "torch_conv")


def assert_compiles_without_graph_break(fn, args):
    """``torch.compile(fn, fullgraph=True)`` gives one graph, and the same values and gradients as eager.
    ``args`` are the tensors to differentiate; the gradient seed is the sum of the output."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    out = torch.compile(fn, fullgraph=True)(*args)
    expected = fn(*args)
    torch.testing.assert_close(out, expected)
    for g, e in zip(torch.autograd.grad(out.sum(), args), torch.autograd.grad(expected.sum(), args)):
        torch.testing.assert_close(g, e)


# Shared by the Triton test files: where the kernels run (CPU tensors under the interpreter, CUDA on a GPU
# machine), and the markers for tests that need Triton or a real GPU.
HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA and not INTERPRETED else "cpu"
TRITON_REASON = available_backends()["triton"]
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"backend triton unavailable: {TRITON_REASON}")
needs_gpu = pytest.mark.skipif(not HAS_CUDA or INTERPRETED,
                               reason="needs a CUDA GPU (real sizes; the interpreter would take hours)")
