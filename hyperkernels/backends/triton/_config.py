"""Process-wide switches of the Triton backend, read once at import."""
import os

# Kernels are decorated at import, and ``triton.jit`` picks the interpreter from this variable at that moment;
# reading it once here keeps the launchers' choices consistent with how the kernels were built.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# HYPERKERNELS_TRITON_AUTOTUNE=0: one config per kernel (the first one the pruning keeps) instead of
# benchmarking up to 8 on the first call of every shape. A GPU test run visits hundreds of shapes x
# activations x dtypes, where autotuning would cost more device time than the tests themselves.
AUTOTUNE = os.environ.get("HYPERKERNELS_TRITON_AUTOTUNE", "1") != "0"
