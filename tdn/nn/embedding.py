"""Element embedding: the atomic number's one-hot vector, mapped linearly to scalar node features."""

from __future__ import annotations

import torch
from torch import nn


class ElementEmbedding(nn.Module):
    """``element_index [N]`` (position in the model's element list) -> scalar features ``[N, C, 1]``.

    A bias-free linear map of the one-hot vector, i.e. one learned row per element (unit-variance init).
    """

    def __init__(self, num_elements: int, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_elements, channels))

    def forward(self, element_index: torch.Tensor) -> torch.Tensor:
        return self.weight[element_index].unsqueeze(-1)  # [N, C, 1]: degree 0 only
