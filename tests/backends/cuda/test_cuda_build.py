"""The CUDA extension: built where nvcc is (CI builds it), importable without a GPU, never linked to
libtorch or libcudart. (Its codes against the Python tables: test_cuda_extension.py.)"""
import subprocess

from cuda_emulator import extension


def test_extension_imports_and_reports_its_device_state():
    ext = extension()
    count = ext.device_count()
    assert isinstance(count, int) and count >= 0
    if count == 0:
        assert ext.driver_error(), "no device, so driver_error() must say why"
    assert ext.ACTIVATIONS == ("none", "relu", "gelu", "silu", "tanh", "sigmoid", "sine")


def test_extension_links_neither_libtorch_nor_libcudart():
    ext = extension()
    out = subprocess.run(["ldd", ext.__file__], capture_output=True, text=True).stdout
    assert "libtorch" not in out and "libc10" not in out and "libcudart" not in out, out
