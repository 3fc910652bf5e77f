"""The extension hyperkernels._cuda as the wrappers use it (CI, no GPU needed): its codes against the Python tables,
its argument structs (every field named once in C++, every one required from Python), and every kind of call the
wrappers make getting past the real launchers' argument checks to the CUDA runtime."""
from __future__ import annotations

import inspect
import re

import pytest
import torch

from cuda_emulator import cpu_launch_env, extension  # noqa: F401 (cpu_launch_env is a fixture)
from hyperkernels.activations import ACTIVATIONS, get_activation
from hyperkernels.backends.cuda import linear as cuda_linear

STRUCTS = ("LinearForwardArgs", "LinearBackwardArgs")


def test_extension_codes_match_the_python_tables():
    ext = extension()
    assert len(ext.ACTIVATIONS) == len(ACTIVATIONS)
    for name, act in ACTIVATIONS.items():
        assert ext.ACTIVATIONS[act.code] == name
    assert {ext.DTYPE_FLOAT32, ext.DTYPE_FLOAT16, ext.DTYPE_BFLOAT16} == {0, 1, 2}
    assert cuda_linear._dtype_code(ext, torch.bfloat16) == ext.DTYPE_BFLOAT16
    assert not [n for n in dir(ext) if n.startswith("ACT_")], "per-activation constants: ACTIVATIONS is the table"


def _all_fields(cls, value=0, **override):
    return {**{name: value for name in cls.FIELDS}, **override}


@pytest.mark.parametrize("struct", STRUCTS)
def test_argument_struct_fields_are_attributes_that_keep_their_values(struct):
    """A distinct value per field, read back by name: each attribute is bound to its own member."""
    cls = getattr(extension(), struct)
    assert len(set(cls.FIELDS)) == len(cls.FIELDS) > 20
    defaults = cls(**_all_fields(cls))
    values = {}
    for i, name in enumerate(cls.FIELDS):
        kind = type(getattr(defaults, name))
        values[name] = {bool: i % 2 == 1, float: i + 0.5, int: 1000 + i}[kind]
    args = cls(**values)
    assert {name: getattr(args, name) for name in cls.FIELDS} == values
    args.B = 77
    assert args.B == 77 and "B=77" in repr(args) and repr(args).startswith(f"{struct}(")
    with pytest.raises(AttributeError):
        args.not_a_field = 1  # a misspelt field is an error, not a new attribute


@pytest.mark.parametrize("struct", STRUCTS)
def test_argument_struct_requires_every_field_by_name(struct):
    cls = getattr(extension(), struct)
    kwargs = _all_fields(cls)
    del kwargs["sxk"], kwargs["stream"]
    missing = rf"^{struct}\(\) missing keyword\(s\): sxk, stream \(every field is required\)"
    with pytest.raises(TypeError, match=missing):
        cls(**kwargs)
    with pytest.raises(TypeError, match=rf"^{struct}\(\) got unexpected keyword\(s\): sxj$"):
        cls(**_all_fields(cls), sxj=1)
    with pytest.raises(TypeError, match=rf"^{struct}: x must be an address \(an int >= 0\), got -1$"):
        cls(**_all_fields(cls, x=-1))
    with pytest.raises(TypeError, match=rf"^{struct}: B must be a 64-bit int, got 1\.5$"):
        cls(**_all_fields(cls, B=1.5))
    with pytest.raises(TypeError, match=rf"^{struct}: w0 must be a float, got 'a'$"):
        cls(**_all_fields(cls, w0="a"))


def test_launchers_take_their_own_struct_and_check_codes():
    ext = extension()
    forward = ext.LinearForwardArgs(**_all_fields(ext.LinearForwardArgs))
    with pytest.raises(TypeError):
        ext.linear_backward(forward)
    forward.dtype = 7
    with pytest.raises(ValueError, match=r"dtype code must be 0 \(float32\), 1 \(float16\) or 2 \(bfloat16\), got 7"):
        ext.linear_forward(forward)


def _pybind_parameters(fn) -> list[str]:
    """Parameter names from a pybind11 function's signature line, e.g. 'f(a: int, b: bool) -> None'."""
    head = fn.__doc__.splitlines()[0]
    inside = head[head.index("(") + 1 : head.rindex(")")]
    return [p.split(":")[0].strip() for p in re.split(r",\s*(?=\w+:)", inside)]


def test_wrapper_keywords_match_the_struct_fields():
    """The keywords the wrappers pass are exactly each struct's fields (the constructor also refuses a missing or
    unknown one at run time; this says which, without a launch)."""
    ext = extension()
    source = inspect.getsource(cuda_linear)
    for call in ("ext.LinearForwardArgs(", "ext.LinearBackwardArgs(", "ext.linear_backward_workspace_size("):
        text = source[source.index(call) :]
        text = text[: text.index(")\n") + 1]
        passed = re.findall(r"(\w+)=", text)
        name = call[len("ext.") : -1]
        wanted = getattr(ext, name).FIELDS if name in STRUCTS else _pybind_parameters(getattr(ext, name))
        assert sorted(passed) == sorted(wanted) and len(passed) == len(set(passed)), name


def _calls_that_reach_the_runtime():
    """(name, thunk) pairs covering every launch the wrappers make: forward with / without preact and bias, the
    channel-major layout, strided and shared views, the shared-weight fold, and backward with every
    activation kind, a workspace (split reductions), and output-mask subsets."""
    lin = cuda_linear
    gelu, relu, none = (get_activation(a) for a in ("gelu", "relu", "none"))

    def fwd(batch, n, k, m, act, cm=False, keep=True, shared=False, bias=True, dtype=torch.float32):
        x = torch.randn(batch, k, n, dtype=dtype) if cm else torch.randn(batch, n, k, dtype=dtype)
        w = torch.randn(1, m, k, dtype=dtype).expand(batch, m, k) if shared else torch.randn(batch, m, k, dtype=dtype)
        b = torch.randn(batch, m, dtype=dtype) if bias else None
        return lambda: lin.linear_forward(x, w, b, act, 2.0, cm, keep)

    def bwd(batch, n, k, m, act, cm=False, mask=(True, True, True), preact=True, shared=False, dtype=torch.float32):
        x = torch.randn(batch, k, n, dtype=dtype) if cm else torch.randn(batch, n, k, dtype=dtype)
        w = torch.randn(1, m, k, dtype=dtype).expand(batch, m, k) if shared else torch.randn(batch, m, k, dtype=dtype)
        shape = (batch, m, n) if cm else (batch, n, m)
        g, y = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        z = torch.randn(shape, dtype=dtype) if preact else y.new_empty(0)
        return lambda: lin.linear_backward(g, x, w, torch.randn(batch, m, dtype=dtype), y, z, act, 2.0, cm, mask)

    return [
        ("forward_gemv_gelu_keep", fwd(3, 1, 8, 5, gelu)),
        ("forward_gemm_relu", fwd(3, 7, 8, 5, relu, keep=False, dtype=torch.bfloat16)),
        ("forward_channel_major", fwd(2, 9, 4, 6, gelu, cm=True, dtype=torch.float16)),
        ("forward_shared_fold_no_bias", fwd(4, 1, 8, 5, relu, shared=True, bias=False)),
        ("backward_gelu_with_preact", bwd(3, 7, 8, 5, gelu)),
        ("backward_relu_from_y", bwd(3, 7, 8, 5, relu, dtype=torch.bfloat16)),
        ("backward_none", bwd(3, 1, 8, 5, none)),
        ("backward_split_workspace", bwd(1, 300, 40, 40, gelu)),
        ("backward_channel_major_split", bwd(1, 300, 24, 20, relu, cm=True, dtype=torch.float16)),
        ("backward_only_db", bwd(3, 7, 8, 5, gelu, mask=(False, False, True))),
        ("backward_only_dw", bwd(3, 7, 8, 5, relu, mask=(False, True, False))),
        ("backward_shared_fold_dx", bwd(4, 1, 8, 5, relu, mask=(True, False, False), shared=True)),
    ]


_CALLS = _calls_that_reach_the_runtime()


@pytest.mark.parametrize("name, call", _CALLS, ids=[c[0] for c in _CALLS])
def test_every_call_gets_past_the_extensions_argument_checks(cpu_launch_env, name, call):
    """CPU pointers go to the real extension: it checks codes, sizes, null pointers, dz and the workspace size
    (ValueError), then asks the CUDA runtime, which cannot start without a driver. Reaching that error proves
    the call built complete argument structs and passed the launcher's argument checks."""
    ext = extension()
    if ext.device_count() > 0:
        pytest.skip("a CUDA device is present: these CPU pointers would really be launched on")
    with pytest.raises(RuntimeError, match=r"CUDA reported an error before linear_(forward|backward) launched"):
        call()
