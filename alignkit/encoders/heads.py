"""Alignment heads mapping frozen-encoder features into the shared space (output normalisation is the loss's job)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

__all__ = ["LinearHead", "MLPHead"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class LinearHead(nn.Module):
    """A single affine map ``in_dim → out_dim`` (STRUCTURE's main "Linear" head)."""

    def __init__(self, in_dim: int, out_dim: int = 512, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class MLPHead(nn.Module):
    """``num_layers`` linear layers with activation (and dropout) between them.

    ``bias``: whether the linear layers have a bias (the skip never has one). With ``residual=True`` the output is ``skip(x) + mlp(x)`` with a bias-free linear skip. Unlike the released
    STRUCTURE ``ResLowRankHead`` (whose sigmoid gate starts at σ(−∞)=0 and so never opens), the non-linear branch
    here is ordinarily initialised and ungated, so it receives gradient from the first step.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 512,
        hidden: int | None = None,
        num_layers: int = 2,
        activation: Literal["gelu", "relu", "silu"] = "gelu",
        dropout: float = 0.0,
        residual: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 2:
            raise ValueError("MLPHead needs num_layers >= 2 (use LinearHead for one layer)")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        hidden = hidden or out_dim
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
            if i < num_layers - 1:
                layers += [_ACTIVATIONS[activation](), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*layers)
        self.skip = nn.Linear(in_dim, out_dim, bias=False) if residual else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.mlp(x)
        return y if self.skip is None else y + self.skip(x)
