"""Build script: the package metadata lives in pyproject.toml; this file only adds the optional
CUDA extension module ``hyperkernels._cuda`` (csrc/, built by CMake + Ninja + nvcc, pybind11).

Environment variables:
  HYPERKERNELS_NO_CUDA=1        skip the extension (pure-Python install)
  HYPERKERNELS_CUDA_ARCH=...    CMAKE_CUDA_ARCHITECTURES, e.g. "90a", "80;90" or "80,90"
                                (default 80;90, sm_80 is the minimum)
  CUDACXX / CUDA_HOME           where nvcc is (else PATH, then /usr/local/cuda/bin/nvcc)
  HYPERKERNELS_PTXAS_VERBOSE=1  print ptxas register / spill statistics while compiling
  HYPERKERNELS_DEBUG=1          CMake Debug build (host code; device code stays optimised)
  CMAKE_ARGS                    extra arguments for the CMake configure step
  CMAKE_BUILD_PARALLEL_LEVEL    parallel jobs (default: all cores)

Without nvcc the extension is skipped with one message and the install still succeeds; the
"cuda" backend then reports itself unavailable and the torch / triton backends are used.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
EXT_NAME = "hyperkernels._cuda"
DEFAULT_CUDA_ARCHS = "80;90"
# setup.py runs several times per `pip install` (metadata, requirements, wheel); these are the
# commands that actually build, where the skip message is printed (once).
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _is_executable(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def find_nvcc() -> Tuple[Optional[str], List[str]]:
    """(path of nvcc or None, the places looked at): $CUDACXX, $CUDA_HOME/bin/nvcc
    ($CUDA_PATH too), PATH, /usr/local/cuda/bin/nvcc."""
    candidates = []
    if os.environ.get("CUDACXX"):
        candidates.append(("$CUDACXX", os.environ["CUDACXX"]))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append((f"${var}/bin/nvcc", os.path.join(os.environ[var], "bin", "nvcc")))
    candidates.append(("PATH", shutil.which("nvcc")))
    candidates.append(("/usr/local/cuda/bin/nvcc", "/usr/local/cuda/bin/nvcc"))
    looked = []
    for label, path in candidates:
        looked.append(label if label == "PATH" or label == path else f"{label} ({path})")
        if _is_executable(path):
            return os.path.abspath(path), looked
    return None, looked


def cuda_skip_reason() -> Optional[str]:
    """Why the CUDA extension is not built, or None if it is."""
    if _truthy(os.environ.get("HYPERKERNELS_NO_CUDA")):
        return "HYPERKERNELS_NO_CUDA is set"
    nvcc, looked = find_nvcc()
    if nvcc is None:
        return "nvcc was not found (looked at: " + ", ".join(looked) + ")"
    return None


def cuda_archs() -> str:
    raw = os.environ.get("HYPERKERNELS_CUDA_ARCH", "").strip()
    if not raw:
        return DEFAULT_CUDA_ARCHS
    return ";".join(a for a in raw.replace(",", ";").replace(" ", ";").split(";") if a)


class CMakeExtension(Extension):
    """An extension built by CMake from `sourcedir` (no sources for setuptools to compile)."""

    def __init__(self, name: str, sourcedir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    """Configures and builds a CMakeExtension with the Ninja generator, in parallel."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        nvcc, _ = find_nvcc()
        if nvcc is None:  # cannot happen: the extension is only listed when nvcc was found
            raise RuntimeError("hyperkernels: nvcc disappeared during the build")

        # The module goes where setuptools expects it: build/lib.*/hyperkernels for a wheel, the
        # source tree's hyperkernels/ for --inplace and editable installs.
        ext_fullpath = Path.cwd() / self.get_ext_fullpath(ext.name)
        extdir = ext_fullpath.parent.resolve()
        cfg = "Debug" if (self.debug or _truthy(os.environ.get("HYPERKERNELS_DEBUG"))) else "Release"

        import pybind11  # a build requirement (pyproject.toml)

        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs()}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DHK_PTXAS_VERBOSE=" + ("ON" if _truthy(os.environ.get("HYPERKERNELS_PTXAS_VERBOSE")) else "OFF"),
        ]
        ninja = self._find_ninja()
        if ninja:
            cmake_args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        if os.environ.get("CMAKE_ARGS"):
            cmake_args += shlex.split(os.environ["CMAKE_ARGS"])

        build_temp = Path(self.build_temp) / ext.name
        self._reset_stale_cache(build_temp, cmake_args)
        build_temp.mkdir(parents=True, exist_ok=True)

        parallel = getattr(self, "parallel", None)  # build_ext -j N
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
            parallel = os.cpu_count() or 1
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(parallel)
        cmake = self._find_cmake()
        print(f"hyperkernels: building {ext.name} (CUDA archs {cuda_archs()}, nvcc {nvcc})", flush=True)
        subprocess.run([cmake, ext.sourcedir, "-G", "Ninja", *cmake_args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)

    @staticmethod
    def _find_cmake() -> str:
        found = shutil.which("cmake")
        if found:
            return found
        try:  # the `cmake` PyPI package, if its script is not on PATH
            import cmake

            return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        except ImportError:
            raise RuntimeError("hyperkernels: cmake (>= 3.24) is needed to build the CUDA extension") from None

    @staticmethod
    def _find_ninja() -> Optional[str]:
        try:  # the `ninja` PyPI package (a build requirement)
            import ninja

            path = os.path.join(ninja.BIN_DIR, "ninja")
            if _is_executable(path):
                return path
        except ImportError:
            pass
        return shutil.which("ninja")

    @staticmethod
    def _reset_stale_cache(build_temp: Path, cmake_args: List[str]) -> None:
        """A CMake cache made with another Python, nvcc, ninja or pybind11 (e.g. a previous
        isolated build whose temporary environment is gone) cannot be reused: start afresh."""
        stamp = build_temp / "hyperkernels-cmake-args.json"
        wanted = json.dumps(cmake_args)
        if build_temp.exists() and (not stamp.exists() or stamp.read_text() != wanted):
            shutil.rmtree(build_temp)
        build_temp.mkdir(parents=True, exist_ok=True)
        stamp.write_text(wanted)


_skip = cuda_skip_reason()
if _skip is not None and BUILD_COMMANDS.intersection(sys.argv[1:]):
    _how = (
        "unset HYPERKERNELS_NO_CUDA"
        if _skip.startswith("HYPERKERNELS_NO_CUDA")
        else "install the CUDA toolkit, or point CUDACXX (or CUDA_HOME) at it"
    )
    print(
        f"hyperkernels: {_skip}; building WITHOUT the CUDA extension {EXT_NAME}. The 'cuda' "
        f"backend will be unavailable (the torch and triton backends work). To build it, {_how} "
        "and reinstall.",
        file=sys.stderr,
        flush=True,
    )

setup(
    ext_modules=[] if _skip is not None else [CMakeExtension(EXT_NAME)],
    cmdclass={"build_ext": CMakeBuild},
)
