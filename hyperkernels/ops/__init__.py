"""torch.library custom ops: schema, fake implementation and autograd of every op."""
from .linear import batched_linear_backward_op, batched_linear_op

__all__ = ["batched_linear_op", "batched_linear_backward_op"]
