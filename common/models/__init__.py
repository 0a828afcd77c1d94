"""Models: the GRU face encoder, the margin head and the expression head.

Build them from typed configs with :func:`build_encoder` and :func:`build_margin_head`;
:func:`prepare_for_dp` returns the encoder as fedface hands it to Opacus for DP-SGD.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedface.common.config import HeadConfig, ModelConfig
from fedface.common.models.encoder import GRUFaceEncoder, standardize
from fedface.common.models.heads import CosineClassifier, ExpressionHead, MarginHead

logger = logging.getLogger(__name__)


def build_encoder(cfg: ModelConfig, *, image_size: tuple[int, int]) -> GRUFaceEncoder:
    """The GRU face encoder described by ``cfg`` for faces of ``image_size`` (H, W)."""
    return GRUFaceEncoder(
        image_size=image_size,
        passes=cfg.passes,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        bidirectional=cfg.bidirectional,
        pooling=cfg.pooling,
        patch_size=cfg.patch_size,
        embedding_dim=cfg.embedding_dim,
        dropout=cfg.dropout,
        downsample=cfg.downsample,
        stem=cfg.stem,
    )


def build_margin_head(cfg: HeadConfig, *, embedding_dim: int, num_classes: int) -> MarginHead:
    """The identity margin head (class centres) described by ``cfg``."""
    m1, m2, m3 = cfg.margins()
    return MarginHead(embedding_dim, num_classes, scale=cfg.scale, m1=m1, m2=m2, m3=m3)


def prepare_for_dp(module: nn.Module) -> nn.Module:
    """A copy of ``module`` as fedface trains it with DP-SGD, with the same weights.

    A :class:`GRUFaceEncoder` becomes a
    :class:`~fedface.common.privacy.per_sample.PerSampleFaceEncoder`: its ``nn.GRU``s (fused
    kernels whose per-sample gradients cannot be hooked) are replaced by
    :class:`~fedface.common.privacy.gru.PerSampleGRU`, with the same maths, parameter names and
    values, so state dicts load either way. Heads are copied as they are. The result passes
    Opacus' ``ModuleValidator.validate(strict=True)``, in training mode.
    """
    # Imported here: fedface.common.privacy builds on this package's encoder.
    from fedface.common.privacy.per_sample import to_per_sample

    fixed = to_per_sample(module) if isinstance(module, GRUFaceEncoder) else copy.deepcopy(module)
    fixed.train()  # DP-SGD trains the copy; Opacus' validator also insists on training mode.
    ModuleValidator.validate(fixed, strict=True)
    return fixed


def encoder_weights(encoder: nn.Module) -> list[np.ndarray]:
    """The encoder's parameters in ``state_dict`` order, as float32 arrays: what a site sends
    and the server aggregates (``nn.GRU`` and ``PerSampleGRU`` name them alike)."""
    return [v.detach().cpu().float().numpy().copy() for v in encoder.state_dict().values()]


def freeze_for(trainable: str, encoder: nn.Module) -> None:
    """Freeze the encoder's parts that ``privacy.trainable`` keeps fixed: ``"gru"`` the
    convolutional stem, ``"neck"`` the stem and the GRUs (only the embedding neck and the head
    train); ``"all"`` nothing."""
    frozen: list[nn.Parameter] = []
    stem = getattr(encoder, "stem", None)
    if trainable in ("gru", "neck") and stem is not None:
        frozen += list(stem.parameters())
    if trainable == "neck":
        frozen += list(encoder.rnns.parameters())  # type: ignore[union-attr]
    for p in frozen:
        p.requires_grad_(False)


def warn_frozen_at_random(trainable: str, encoder: nn.Module, *, initialised: bool) -> None:
    """Warn when ``privacy.trainable`` freezes parts of an encoder that no checkpoint
    initialised: they would stay at their random start for the whole run."""
    stem = ["the convolutional stem"] if getattr(encoder, "stem", None) is not None else []
    frozen = {"gru": stem, "neck": [*stem, "the GRUs"]}.get(trainable, [])
    if initialised or not frozen:
        return
    logger.warning(
        "privacy.trainable = %s keeps %s at the random start (no training.init-from): pass --init-from a "
        "pre-trained checkpoint (e.g. one of scenarios/ckplus_public.toml), or set privacy.trainable = \"all\"",
        trainable,
        " and ".join(frozen),
    )


def shared_weights(encoder: nn.Module, head: nn.Module | None) -> list[np.ndarray]:
    """What a federation shares: the encoder's arrays, then (expression task) the expression
    head's. An identity run shares the encoder alone; its class centres never leave a site."""
    arrays = encoder_weights(encoder)
    if head is not None:
        arrays += [v.detach().cpu().float().numpy().copy() for v in head.state_dict().values()]
    return arrays


def load_shared_weights(encoder: nn.Module, head: nn.Module | None, weights: list[np.ndarray]) -> None:
    """Set ``encoder`` (and ``head``) from :func:`shared_weights`' list (same config)."""
    n_enc = len(encoder.state_dict())
    n_head = len(head.state_dict()) if head is not None else 0
    if len(weights) != n_enc + n_head:
        raise ValueError(f"expected {n_enc + n_head} model arrays, got {len(weights)}: the server and site configs differ")
    try:
        load_encoder_weights(encoder, weights[:n_enc])
        if head is not None:
            keys = list(head.state_dict().keys())
            head.load_state_dict({k: torch.from_numpy(np.asarray(w)) for k, w in zip(keys, weights[n_enc:], strict=True)})
    except RuntimeError as exc:  # same count, other shapes (e.g. 6 expression classes against 7)
        reason = " ".join(str(exc).split())[:300]
        raise ValueError(f"the model arrays do not fit this model: the server and site configs differ ({reason})") from None


def load_encoder_weights(encoder: nn.Module, weights: list[np.ndarray]) -> None:
    """Set ``encoder``'s parameters from :func:`encoder_weights`' list (same config)."""
    keys = list(encoder.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"expected {len(keys)} encoder arrays, got {len(weights)}: the server and site configs differ")
    encoder.load_state_dict({k: torch.from_numpy(np.asarray(w)) for k, w in zip(keys, weights, strict=True)})


__all__ = [
    "CosineClassifier",
    "ExpressionHead",
    "GRUFaceEncoder",
    "MarginHead",
    "build_encoder",
    "build_margin_head",
    "encoder_weights",
    "freeze_for",
    "load_encoder_weights",
    "load_shared_weights",
    "prepare_for_dp",
    "shared_weights",
    "standardize",
    "warn_frozen_at_random",
]
