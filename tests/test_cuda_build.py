"""The CUDA extension: built where nvcc is (CI builds it), importable without a GPU, never linked to
libtorch or libcudart."""
import os
import subprocess

import pytest

REQUIRED = os.environ.get("HYPERKERNELS_REQUIRE_CUDA_BUILD") == "1"


def _import():
    try:
        import hyperkernels._cuda as ext
    except ImportError as exc:
        if REQUIRED:
            pytest.fail(f"HYPERKERNELS_REQUIRE_CUDA_BUILD=1 but hyperkernels._cuda did not import: {exc}")
        pytest.skip(f"hyperkernels._cuda was not built here (no nvcc at install time?): {exc}")
    return ext


def test_extension_imports_and_reports_its_device_state():
    ext = _import()
    count = ext.device_count()
    assert isinstance(count, int) and count >= 0
    if count == 0:
        assert ext.driver_error(), "no device, so driver_error() must say why"
    assert ext.ACTIVATIONS == ("none", "relu", "gelu", "silu", "tanh", "sigmoid", "sine")


def test_activation_codes_match_the_python_table():
    ext = _import()
    from hyperkernels.activations import ACTIVATIONS

    for name, act in ACTIVATIONS.items():
        assert ext.ACTIVATIONS[act.code] == name


def test_extension_links_neither_libtorch_nor_libcudart():
    ext = _import()
    out = subprocess.run(["ldd", ext.__file__], capture_output=True, text=True).stdout
    assert "libtorch" not in out and "libc10" not in out and "libcudart" not in out, out
