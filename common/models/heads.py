"""Heads that sit on top of the embedding and never leave their site.

:class:`MarginHead` holds the identity class centres and computes the combined-margin logits
of ArcFace/CosFace (insightface's formulation): for the true class,
``cos(theta) -> cos(m1 * theta + m2) - m3``, then everything scaled by ``s``.
CosFace is ``(m1, m2, m3) = (1, 0, m)``, ArcFace ``(1, m, 0)``. In federated training the
class centres are a site's private state: they are a separate module so that only the encoder
is ever exchanged.

:class:`ExpressionHead` classifies facial expressions from the embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CosineClassifier(nn.Module):
    """Class centres: the cosine similarity of each embedding to each centre.

    The only parameters of a margin head live here, in a module whose forward takes the
    embeddings alone, so that per-sample gradients (Opacus) see exactly the computation that
    depends on the parameters; the margin, which needs the labels, is applied outside it.
    """

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, num_classes) cosines."""
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))


class MarginHead(nn.Module):
    """Class centres with an additive/angular margin (CosFace, ArcFace, combined).

    Parameters
    ----------
    embedding_dim
        Size of the embeddings it receives (L2-normalised).
    num_classes
        Number of identities at this site.
    scale
        Logit scale ``s`` (default 30).
    m1, m2, m3
        Combined margin ``cos(m1*theta + m2) - m3`` on the true class. Defaults give CosFace
        with m = 0.35.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 30.0,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.35,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.m1, self.m2, self.m3 = m1, m2, m3
        self.centres = CosineClassifier(embedding_dim, num_classes)

    @classmethod
    def cosface(cls, embedding_dim: int, num_classes: int, *, scale: float = 30.0, margin: float = 0.35) -> MarginHead:
        """CosFace: an additive cosine margin."""
        return cls(embedding_dim, num_classes, scale=scale, m1=1.0, m2=0.0, m3=margin)

    @classmethod
    def arcface(cls, embedding_dim: int, num_classes: int, *, scale: float = 30.0, margin: float = 0.5) -> MarginHead:
        """ArcFace: an additive angular margin."""
        return cls(embedding_dim, num_classes, scale=scale, m1=1.0, m2=margin, m3=0.0)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each (unit) embedding to each class centre."""
        return self.centres(embeddings)

    @property
    def weight(self) -> torch.Tensor:
        """The class centres (num_classes, embedding_dim), unnormalised."""
        return self.centres.weight

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Margin logits for training (labels given) or plain scaled cosines (labels None)."""
        cos = self.cosine(embeddings)
        if labels is None:
            return self.scale * cos
        target = cos.gather(1, labels.view(-1, 1))
        if self.m1 != 1.0 or self.m2 != 0.0:
            theta = torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7))
            shifted = torch.cos(self.m1 * theta + self.m2)
            # Keep the logit monotonic in theta past pi (insightface's "easy margin" fallback).
            limit = math.pi - self.m2
            shifted = torch.where(theta * self.m1 < limit, shifted, target - self.m2 * math.sin(self.m2))
        else:
            shifted = target
        shifted = shifted - self.m3
        logits = cos.scatter(1, labels.view(-1, 1), shifted)
        return self.scale * logits


class ExpressionHead(nn.Module):
    """A small classifier of facial expressions on top of the embedding."""

    def __init__(self, embedding_dim: int, num_classes: int, *, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        if hidden > 0:
            layers += [nn.Linear(embedding_dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes)]
        else:
            layers.append(nn.Linear(embedding_dim, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Expression logits."""
        return self.net(embeddings)
