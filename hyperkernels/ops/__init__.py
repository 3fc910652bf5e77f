"""torch.library custom ops: schema, fake implementation and autograd of every op."""
from .hyper_linear import hyper_linear_backward_op, hyper_linear_op
from .linear import batched_linear_backward_op, batched_linear_op
from .mlp import batched_mlp_backward_op, batched_mlp_op

__all__ = ["batched_linear_op", "batched_linear_backward_op", "batched_mlp_op", "batched_mlp_backward_op",
           "hyper_linear_op", "hyper_linear_backward_op"]
