"""The GRU face encoder: a face image read as sequences, to an L2-normalised embedding.

A 2-D face is read by one or more recurrent *passes*: ``rows`` (top to bottom, each step one
image row), ``columns`` (left to right, each step one column) and ``patches`` (non-overlapping
square patches in raster order, each step one flattened patch). Each pass is a GRU; its outputs
over time are pooled (mean, max, mean+max or the last state) and the pooled features of all
passes are concatenated, projected to the embedding and L2-normalised.

Reading the same face two ways (rows, then columns) is the ReNet idea (Visin et al., 2015): a
row GRU alone sees vertical structure only through its hidden state, a column GRU adds the
horizontal one. Mean+max pooling keeps both the average appearance and the strongest local
evidence; mean pooling alone was clearly worse in our probes (docs/models.md).

An optional **convolutional stem** (``stem = (32, 64, 128)``: stages of two 3x3 convolutions
with GroupNorm and GELU, each followed by 2x2 max pooling) turns the face into a small grid
of feature vectors first; the GRU passes then read its rows (each step one row of C x W
features) and columns. It is what makes the GRU competitive on expressions, where the cues
are local (mouth corners, brows) and a raw pixel row carries little of them (docs/models.md).

Every layer here is trainable under Opacus DP-SGD: there is no BatchNorm (per-sample gradients
are undefined with batch statistics); normalisation is LayerNorm, and inputs are standardised
per image with no parameters. ``nn.GRU`` itself is swapped for a DP-capable GRU with the same
maths and parameter names by :func:`fedface.common.models.prepare_for_dp`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import math

import torch
import torch.nn.functional as F
from torch import nn

Pass = Literal["rows", "columns", "patches"]
Pooling = Literal["mean", "max", "meanmax", "last"]

_EPS = 1e-5


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-image zero mean and unit variance (no parameters; lighting-invariant input)."""
    flat = x.flatten(1)
    mean = flat.mean(dim=1).view(-1, 1, 1, 1)
    std = flat.std(dim=1, unbiased=False).view(-1, 1, 1, 1)
    return (x - mean) / (std + _EPS)


def _to_sequence(x: torch.Tensor, how: Pass, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, T, F) for one reading of the image (or of the stem's feature map)."""
    if how == "rows":  # step t: row t of every channel, (C * W) features
        return x.permute(0, 2, 1, 3).flatten(2)
    if how == "columns":  # step t: column t of every channel, (C * H) features
        return x.permute(0, 3, 1, 2).flatten(2)
    img = x[:, 0]
    n, h, w = img.shape
    p = patch_size
    patches = img.unfold(1, p, p).unfold(2, p, p)  # (N, H/p, W/p, p, p)
    return patches.reshape(n, (h // p) * (w // p), p * p)


#: GroupNorm groups in the stem (fewer when a stage has fewer channels).
STEM_GROUPS = 8


class ConvStem(nn.Module):
    """Stages of two 3x3 convolutions (GroupNorm, GELU), each stage then 2x2 max pooling.

    GroupNorm rather than BatchNorm: its statistics are per example, so per-sample gradients
    (DP-SGD) are defined. ``channels = (32, 64, 128)`` turns a 48x48 face into a 6x6 grid of
    128 features.
    """

    def __init__(self, channels: Sequence[int], in_channels: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for width in channels:
            for _ in range(2):
                layers += [
                    nn.Conv2d(prev, width, 3, padding=1, bias=False),
                    nn.GroupNorm(math.gcd(STEM_GROUPS, width), width),
                    nn.GELU(),
                ]
                prev = width
            layers.append(nn.MaxPool2d(2))
        self.layers = nn.Sequential(*layers)
        self.out_channels = prev
        self.reduction = 2 ** len(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, out_channels, H / reduction, W / reduction)."""
        return self.layers(x)


class EmbeddingNeck(nn.Module):
    """Pooled sequence features to a unit-length embedding: LayerNorm, dropout, linear, LayerNorm.

    A module of its own so that the part of the encoder after the GRUs can be differentiated
    per sample separately from them (fedface's DP-SGD does so).
    """

    def __init__(self, features: int, embedding_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(features)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.project = nn.Linear(features, embedding_dim)
        self.norm_out = nn.LayerNorm(embedding_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, features) -> (N, embedding_dim), L2-normalised."""
        z = self.dropout(self.norm_in(pooled))
        return F.normalize(self.norm_out(self.project(z)), dim=1)


class GRUFaceEncoder(nn.Module):
    """A face image to an L2-normalised embedding through GRU passes.

    Parameters
    ----------
    image_size
        (height, width) of the input faces, in pixels. Default (64, 64).
    passes
        Readings of the image, each a GRU: any of ``rows``, ``columns``, ``patches``.
    hidden_size
        GRU hidden units per direction.
    num_layers
        Stacked GRU layers per pass.
    bidirectional
        Read each sequence both ways.
    pooling
        How a pass's outputs over time become one vector: ``mean``, ``max``, ``meanmax``
        (both, concatenated) or ``last`` (final hidden state(s)).
    patch_size
        Side of the square patches for the ``patches`` pass; must divide both image sides.
    embedding_dim
        Size of the output embedding (default 128).
    dropout
        Dropout on the pooled features during training (0 disables).
    downsample
        Average-pool the input by this factor before reading it (2: a 64x64 face is read as
        32x32; shorter sequences, a quarter of the cost, and less to overfit on small sets).
    stem
        Channels of the convolutional stem's stages (:class:`ConvStem`); empty (the default)
        reads the pixels directly. With a stem, ``patches`` is not available and each stage
        halves the sides, which must stay divisible.
    """

    def __init__(
        self,
        *,
        image_size: tuple[int, int] = (64, 64),
        passes: Sequence[Pass] = ("rows", "columns"),
        hidden_size: int = 128,
        num_layers: int = 1,
        bidirectional: bool = True,
        pooling: Pooling = "meanmax",
        patch_size: int = 8,
        embedding_dim: int = 128,
        dropout: float = 0.0,
        downsample: int = 1,
        stem: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if not passes:
            raise ValueError("passes must name at least one of rows, columns, patches")
        if downsample < 1 or image_size[0] % downsample or image_size[1] % downsample:
            raise ValueError(f"downsample {downsample} must be >= 1 and divide the image size {image_size}")
        self.downsample = downsample
        h, w = image_size[0] // downsample, image_size[1] // downsample
        if "patches" in passes and (h % patch_size or w % patch_size):
            raise ValueError(f"patch_size {patch_size} must divide the image size {h}x{w}")
        self.image_size = (h, w)
        self.stem = ConvStem(stem) if stem else None
        channels = 1
        if self.stem is not None:
            if "patches" in passes:
                raise ValueError("the patches pass reads pixels: it cannot follow a convolutional stem")
            r = self.stem.reduction
            if h % r or w % r:
                raise ValueError(f"a stem of {len(stem)} stages halves the sides {len(stem)} times: {h}x{w} must be divisible by {r}")
            h, w, channels = h // r, w // r, self.stem.out_channels
        self.passes: tuple[Pass, ...] = tuple(passes)
        self.pooling: Pooling = pooling
        self.patch_size = patch_size
        self.embedding_dim = embedding_dim
        directions = 2 if bidirectional else 1
        in_sizes = {"rows": channels * w, "columns": channels * h, "patches": patch_size * patch_size}

        def gru(n_in: int) -> nn.GRU:
            return nn.GRU(n_in, hidden_size, num_layers=num_layers, batch_first=True, bidirectional=bidirectional)

        self.rnns = nn.ModuleDict({p: gru(in_sizes[p]) for p in self.passes})
        per_pass = hidden_size * directions * (2 if pooling == "meanmax" else 1)
        features = per_pass * len(self.passes)
        self.neck = EmbeddingNeck(features, embedding_dim, dropout)

    def _pool(self, out: torch.Tensor, h_n: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            return out.mean(dim=1)
        if self.pooling == "max":
            return out.amax(dim=1)
        if self.pooling == "meanmax":
            return torch.cat([out.mean(dim=1), out.amax(dim=1)], dim=1)
        # last: the top layer's final state in each direction
        rnn_dirs = h_n.shape[0]
        top = h_n[-2:] if rnn_dirs >= 2 and out.shape[-1] == 2 * h_n.shape[-1] else h_n[-1:]
        return top.transpose(0, 1).reshape(out.shape[0], -1)

    def sequences(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each pass's reading of the faces: (N, 1, H, W) in [0, 1] -> {pass: (N, T, F)}."""
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        x = standardize(x)
        if self.stem is not None:
            x = self._run_stem(x)
        return {name: _to_sequence(x, name, self.patch_size) for name in self.passes}

    def _run_stem(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional stem on standardized faces (a hook for the DP-SGD encoder)."""
        assert self.stem is not None
        return self.stem(x)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The GRU passes' pooled outputs, concatenated: (N, 1, H, W) -> (N, features)."""
        seqs = self.sequences(x)
        return torch.cat([self._pool(*self.rnns[name](seqs[name])) for name in self.passes], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of faces (N, 1, H, W) in [0, 1] to (N, embedding_dim), unit length."""
        return self.neck(self.pooled(x))
