"""The sparse MoE MLP of Mixtral: a router and SwiGLU experts, through ``ember.ops.fused_moe``.

Each token goes to the ``top_k`` experts with the largest router softmax, weighted by those
probabilities renormalised to sum to 1. The experts' weights are stacked as fused_moe takes
them: ``w13 [E, 2I, H]`` (each expert's gate rows, then its up rows) and ``w2 [E, H, I]``;
``shard`` gives the view one Hugging Face tensor (``experts.{e}.w1/w3/w2``) fills.
"""

import torch
from torch import nn

from ember import ops


class SparseMoeBlock(nn.Module):
    # Hugging Face's expert projection -> (our stacked parameter, row block inside w13).
    EXPERT_PROJECTIONS = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", None)}

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 backend: str):
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.intermediate_size = intermediate_size
        self.top_k = top_k
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.fused_moe(x, self.w13, self.w2, self.gate(x), self.top_k, renormalize=True,
                             backend=self.backend)

    def shards(self, param_name: str) -> list:
        """The pieces of ``w13`` or ``w2`` that checkpoint tensors fill, one per tensor."""
        if param_name == "w13":
            return [(e, half) for e in range(self.w13.shape[0]) for half in (0, 1)]
        return [(e, None) for e in range(self.w2.shape[0])]

    def shard(self, param: torch.Tensor, key: tuple) -> torch.Tensor:
        expert, half = key
        if half is None:
            return param[expert]
        return param[expert].narrow(0, half * self.intermediate_size, self.intermediate_size)
