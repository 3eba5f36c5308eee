"""Maps vision patch tokens into the decoder's embedding space."""

from __future__ import annotations

import torch
import torch.nn as nn

from mmgpt.config import ProjectorConfig


def pixel_shuffle(x: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """Merge each r x r block of neighbouring patches into one token (space-to-depth), as SmolVLM/nanoVLM.

    Args:
        x: patch tokens ``(B, H*W, C)`` in row-major grid order.
        grid: ``(H, W)`` of the patch grid.
        r: merge factor; H and W must be divisible by it.

    Returns:
        ``(B, (H/r) * (W/r), C * r * r)``: r^2 fewer tokens, each r^2 times wider.
    """
    B, N, C = x.shape
    H, W = grid
    x = x.view(B, H // r, r, W // r, r, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, H/r, W/r, r, r, C): the r x r neighbours sit together
    return x.reshape(B, (H // r) * (W // r), r * r * C)


class Projector(nn.Module):
    """Optional pixel shuffle, then LLaVA-1.5's 2-layer GELU MLP (or a single Linear, as the connector of
    Idefics3/SmolVLM), plus an optional learned slot embedding."""

    def __init__(self, config: ProjectorConfig, vision_dim: int, grid_size: tuple[int, int], out_dim: int) -> None:
        super().__init__()
        r = config.pixel_shuffle
        if r < 1:
            raise ValueError(f"projector.pixel_shuffle must be >= 1, got {r}")
        if grid_size[0] % r or grid_size[1] % r:
            raise ValueError(
                f"projector.pixel_shuffle={r} does not divide the vision patch grid {grid_size[0]}x{grid_size[1]}; "
                f"choose a factor of both sides, or change vision.img_size / vision.patch_size"
            )
        if config.mlp_depth not in (1, 2):
            raise ValueError(
                f"projector.mlp_depth must be 1 (one Linear) or 2 (Linear-GELU-Linear), got {config.mlp_depth}"
            )
        if config.mlp_depth == 1 and config.hidden_dim is not None:
            raise ValueError(
                f"projector.hidden_dim={config.hidden_dim} sizes the hidden layer of a 2-layer MLP, and "
                f"projector.mlp_depth=1 has none: set hidden_dim to null"
            )
        self.config, self.grid_size = config, grid_size
        self.num_tokens = (grid_size[0] // r) * (grid_size[1] // r)
        self.norm = nn.LayerNorm(vision_dim) if config.input_norm else nn.Identity()
        if config.mlp_depth == 1:
            self.mlp = nn.Sequential(nn.Linear(vision_dim * r * r, out_dim, bias=config.bias))
        else:
            hidden = config.hidden_dim or out_dim
            self.mlp = nn.Sequential(
                nn.Linear(vision_dim * r * r, hidden, bias=config.bias), nn.GELU(),
                nn.Linear(hidden, out_dim, bias=config.bias),
            )
        # The output layer gets the decoder's init scale (std 0.02), so image tokens start at the size of word
        # embeddings instead of ~25x larger. The first layer keeps PyTorch's fan-in init: with both layers
        # that small, each one's gradient is scaled by the other's tiny weights and the projector barely moves.
        out = self.mlp[-1]
        nn.init.normal_(out.weight, std=0.02)
        if out.bias is not None:
            nn.init.zeros_(out.bias)
        # Same std as the output layer's weights: distinct slots from step 0, at the size of the tokens they mark.
        self.pos_embed = nn.Parameter(torch.randn(self.num_tokens, out_dim) * 0.02) if config.pos_embed else None
        if config.whiten:
            # Buffers, not parameters: set once by fit_whitening, saved and loaded with the weights. The identity
            # until then; `whitened` says whether it has been fitted (a resumed run must not fit it again).
            dim = vision_dim * r * r
            self.register_buffer("whiten_mean", torch.zeros(dim))
            self.register_buffer("whiten_matrix", torch.eye(dim))
            self.register_buffer("whitened", torch.zeros((), dtype=torch.bool))

    def mlp_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the MLP reads, before whitening: the normalized, pixel-shuffled patch features.

        Args:
            x: patch features ``(B, H*W, vision_dim)``.

        Returns:
            ``(B, num_tokens, vision_dim * r * r)``.
        """
        x = self.norm(x)
        if self.config.pixel_shuffle > 1:
            x = pixel_shuffle(x, self.grid_size, self.config.pixel_shuffle)
        return x

    @torch.no_grad()
    def fit_whitening(self, inputs: torch.Tensor, eps: float = 1e-3) -> None:
        """Set the ZCA whitening from samples of ``mlp_inputs``: afterwards they have zero mean and (nearly) the
        identity covariance, and every direction of the features starts out as easy to learn as any other.

        Args:
            inputs: ``(N, vision_dim * r * r)`` features of training images, N well above the width.
            eps: added to each eigenvalue, as a fraction of the largest: directions with almost no variance
                (noise, or none at all) are scaled up at most ``eps ** -0.5`` times the strongest.
        """
        if not self.config.whiten:
            raise ValueError("fit_whitening: this projector has projector.whiten=False")
        x = inputs.reshape(-1, inputs.size(-1)).double()  # float64: the eigenvalues span several decades
        if x.size(0) <= x.size(1):
            raise ValueError(
                f"fit_whitening: {x.size(0)} feature vectors for width {x.size(1)}; need more than the width"
            )
        mean = x.mean(0)
        cov = torch.cov((x - mean).T)
        eigenvalues, vectors = torch.linalg.eigh(cov)
        eigenvalues = eigenvalues.clamp(min=0) + eps * eigenvalues.max()
        matrix = vectors @ torch.diag(eigenvalues.rsqrt()) @ vectors.T  # ZCA: a rotation back to the input axes
        self.whiten_mean.copy_(mean)
        self.whiten_matrix.copy_(matrix)
        self.whitened.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H*W, vision_dim)
        x = self.mlp_inputs(x)  # (B, num_tokens, vision_dim * r * r)
        if self.config.whiten:
            x = (x - self.whiten_mean) @ self.whiten_matrix
        x = self.mlp(x)  # (B, num_tokens, out_dim)
        return x if self.pos_embed is None else x + self.pos_embed
