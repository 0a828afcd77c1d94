"""Evaluate a saved model on a data set (``fedface evaluate``).

Any checkpoint fedface writes: a ``fedface train`` run's ``checkpoint.pt``, a ``fedface
simulate`` run's round checkpoints (encoder only), an expression model with its head. The
protocols are those of training (:func:`fedface.simulations.centralized.evaluate_task`, whose
data preparation it shares) and of ``common.evaluation``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fedface.common.checkpoint import checkpoint_run_dir, find_checkpoint, load_checkpoint
from fedface.common.data import to_tensor
from fedface.common.errors import CheckpointError, SplitError
from fedface.common.evaluation import evaluate_expression, evaluate_open_set
from fedface.common.models import ExpressionHead, build_encoder
from fedface.common.training import embed, select_device
from fedface.common.data.expressions import expression_classes, expression_labels
from fedface.simulations.centralized import evaluate_task, load_config_faces, prepare_task_data

logger = logging.getLogger(__name__)


def evaluate_checkpoint(
    checkpoint_path: Path,
    *,
    data: Path | None = None,
    layout: str | None = None,
    split_path: Path | None = None,
    device_name: str = "auto",
) -> dict[str, Any]:
    """Metrics of a saved model on a data set.

    ``checkpoint_path`` is any checkpoint fedface writes, or a run directory (its final model:
    a ``fedface train`` run's ``checkpoint.pt``, a ``fedface simulate`` run's last round
    checkpoint). An identity checkpoint is evaluated by its encoder alone (every identity
    protocol compares embeddings), so the federated server's encoder-only round checkpoints
    work; an expression checkpoint needs its head.

    With neither ``data`` nor ``split_path``, re-evaluates on the run's own test part: the
    data root in the checkpoint's config and the run directory's ``split.json`` (for a
    federated run, its held-out identities). With ``data`` only, every image there is a test
    image of unseen identities (identity task: open-set verification and identification) or
    of unseen subjects (expression task). With ``split_path``, the test part of that saved
    split of ``data`` is used.

    Returns
    -------
    dict
        ``checkpoint`` (the file evaluated), ``protocol`` (in words) and the metrics.

    Raises
    ------
    CheckpointError
        If there is no checkpoint at ``checkpoint_path``, or it is unreadable, malformed, or its
        weights do not fit the model its config describes.
    SplitError
        If no data is given and the run directory holds no ``split.json``.
    """
    path = find_checkpoint(checkpoint_path)
    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    if ckpt.task != cfg.training.task:
        raise CheckpointError(f"checkpoint {path} is malformed: task {ckpt.task!r} but its config says {cfg.training.task!r}")
    if ckpt.task == "expression" and (not ckpt.head_state or ckpt.num_classes < 1):
        raise CheckpointError(
            f"checkpoint {path} holds no expression head: expression accuracy needs the checkpoint.pt of a "
            f"`fedface train --task expression` run"
        )
    logger.info("evaluating %s (%s task, epoch or round %d)", path, ckpt.task, ckpt.epoch)
    overrides: dict[str, object] = {"training.device": device_name}
    if data is not None:
        overrides["data.root"] = str(data)
        overrides["data.layout"] = layout or "auto"
    cfg = cfg.with_overrides(overrides)
    if data is None and split_path is None:
        run_dir = checkpoint_run_dir(path)
        split_path = run_dir / "split.json"
        if not split_path.is_file():
            raise SplitError(
                f"no split.json in {run_dir}, the run directory of {path}: pass --data DIR to evaluate on other faces, or --split FILE"
            )
    device = select_device(cfg.training.device)
    encoder = build_encoder(cfg.model, image_size=cfg.data.image_size)
    # the identity protocols compare embeddings: a margin head (absent from round checkpoints) is not used
    head: nn.Module = nn.Identity()
    try:
        encoder.load_state_dict(ckpt.encoder_state)
        if ckpt.task == "expression":
            head = ExpressionHead(cfg.model.embedding_dim, ckpt.num_classes)
            head.load_state_dict(ckpt.head_state)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())
        raise CheckpointError(
            f"checkpoint {path} is malformed: its weights do not fit the model its config describes ({reason[:300]})"
        ) from None
    encoder.to(device)
    head.to(device)
    faces = load_config_faces(cfg)
    # finite weights can still overflow (a corrupted exponent bit): try a few faces first
    probe = embed(encoder, to_tensor(faces.images[:16]), device=device, flip_tta=False)
    if not np.isfinite(probe).all():
        raise CheckpointError(f"checkpoint {path} is corrupt: its encoder gives NaN or infinite embeddings; use another checkpoint")
    result: dict[str, Any] = {"checkpoint": str(path)}
    if split_path is not None:
        data_task = prepare_task_data(cfg, faces, split_path=split_path)
        metrics = evaluate_task(cfg, data_task, encoder, head, device)
        return {**result, "protocol": f"test part of the {data_task.split.kind} split {split_path}", **metrics}
    if ckpt.task == "expression":
        expr_faces, labels = expression_labels(faces, tuple(ckpt.class_names) or None)
        names = tuple(ckpt.class_names) or expression_classes(faces)
        return {**result, "protocol": "all images, unseen subjects", **evaluate_expression(
            encoder, head, expr_faces.images, labels, cfg.evaluation, device=device, class_names=names
        )}
    return {**result, "protocol": "all images, unseen identities", **evaluate_open_set(encoder, faces, cfg.evaluation, device=device)}


__all__ = ["evaluate_checkpoint"]
