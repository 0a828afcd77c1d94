"""Recognition metrics of an encoder on a set of faces, clean and under occlusion.

Three protocols, each returning a flat ``{name: number}`` mapping (JSON-ready):

- :func:`evaluate_open_set`: faces of identities the encoder never trained on. Verification
  (10-fold accuracy, ROC AUC, EER, TAR@FAR) over pairs of these faces; identification with a
  seeded gallery/probe split of them (rank-1, rank-5).
- :func:`evaluate_closed_set`: a gallery (the training images) and probes (other images of
  the same people); rank-1 and rank-5 by nearest gallery identity.
- :func:`evaluate_expression`: expression accuracy of an encoder plus expression head.

Every recognition metric is also measured **under occlusion**: the same test images with a
blanked square (``evaluation.occlusion-box`` pixels) at each of ``occlusion-placements`` fixed
places (eyes, nose, mouth, centre); the enrolled side (gallery, or the first image of a pair)
stays clean, as when a full enrolment photo is matched against an incomplete face. Reported
as the mean over placements under ``occluded_<metric>``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score
from torch import nn

from fedface.common.config import EvaluationConfig
from fedface.common.data.faceset import FaceSet
from fedface.common.data.splits import split_gallery_probe
from fedface.common.data.transforms import occlude, occlusion_boxes, to_tensor
from fedface.common.metrics import identify, verify
from fedface.common.training import embed, predict


def _occluded_views(images: torch.Tensor, cfg: EvaluationConfig) -> list[torch.Tensor]:
    size = (int(images.shape[-2]), int(images.shape[-1]))
    return [occlude(images, box) for box in occlusion_boxes(size, cfg.occlusion_box, cfg.occlusion_placements)]


def _mean_over(results: list[dict[str, float]], prefix: str) -> dict[str, float]:
    keys = results[0].keys()
    return {f"{prefix}{k}": float(np.mean([r[k] for r in results])) for k in keys}


def _verification(emb: np.ndarray, labels: np.ndarray, cfg: EvaluationConfig, probe: np.ndarray | None = None) -> dict[str, float]:
    r = verify(emb, labels, probe_embeddings=probe, n_folds=cfg.n_folds, seed=0)
    d = r.to_dict()
    return {
        "verif_acc": float(d["accuracy"]),
        "verif_acc_std": float(d["accuracy_std"]),
        "verif_auc": float(d["auc"]),
        "verif_eer": float(d["eer"]),
        "tar_far1e-2": float(d["tar_far1e-2"]),
        "tar_far1e-3": float(d["tar_far1e-3"]),
        "verif_threshold": float(d["threshold"]),
    }


def evaluate_open_set(
    encoder: nn.Module,
    faces: FaceSet,
    cfg: EvaluationConfig,
    *,
    device: torch.device,
    seed: int = 0,
    with_occlusion: bool = True,
) -> dict[str, float]:
    """Verification and identification among faces of unseen identities, clean and occluded.

    Parameters
    ----------
    faces
        Test faces only (every identity held out from training); at least two identities,
        and at least ``gallery_per_identity + 1`` images for the identities that give probes.
    seed
        Seed of the gallery/probe split used for identification.
    """
    images = to_tensor(faces.images)
    labels = faces.labels
    emb = embed(encoder, images, device=device, flip_tta=cfg.flip_tta, shift_tta=cfg.shift_tta)
    out = _verification(emb, labels, cfg)
    gallery, probes = split_gallery_probe(
        labels, gallery_per_identity=cfg.gallery_per_identity, seed=seed, groups=faces.groups
    )
    out.update(identify(emb[gallery], labels[gallery], emb[probes], labels[probes]))
    occ_verif: list[dict[str, float]] = []
    occ_ident: list[dict[str, float]] = []
    for view in _occluded_views(images, cfg) if with_occlusion else []:
        occ = embed(encoder, view, device=device, flip_tta=cfg.flip_tta, shift_tta=cfg.shift_tta)
        occ_verif.append(_verification(emb, labels, cfg, probe=occ))
        occ_ident.append(identify(emb[gallery], labels[gallery], occ[probes], labels[probes]))
    if occ_verif:
        out.update(_mean_over(occ_verif, "occluded_"))
        out.update(_mean_over(occ_ident, "occluded_"))
    out["test_images"] = float(len(faces))
    out["test_identities"] = float(len(np.unique(labels)))
    return out


def evaluate_closed_set(
    encoder: nn.Module,
    gallery: FaceSet,
    probes: FaceSet,
    cfg: EvaluationConfig,
    *,
    device: torch.device,
    with_occlusion: bool = True,
) -> dict[str, float]:
    """Identification of probe faces against a gallery of the same people, clean and occluded."""
    g_emb = embed(encoder, to_tensor(gallery.images), device=device, flip_tta=cfg.flip_tta, shift_tta=cfg.shift_tta)
    p_images = to_tensor(probes.images)
    p_emb = embed(encoder, p_images, device=device, flip_tta=cfg.flip_tta, shift_tta=cfg.shift_tta)
    out = identify(g_emb, gallery.labels, p_emb, probes.labels)
    occ = [
        identify(g_emb, gallery.labels, embed(encoder, view, device=device, flip_tta=cfg.flip_tta, shift_tta=cfg.shift_tta), probes.labels)
        for view in (_occluded_views(p_images, cfg) if with_occlusion else [])
    ]
    if occ:
        out.update(_mean_over(occ, "occluded_"))
    out["gallery_images"] = float(len(gallery))
    out["probe_images"] = float(len(probes))
    return out


def expression_scores(labels: np.ndarray, pred: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Accuracy, macro-F1 and per-class recall of expression predictions.

    Macro-F1 and the recalls cover the classes present among ``labels`` (a CK+ fold may lack
    one); ``recall_<class>`` keys name them. FER2013's classes are very unequal (disgust is
    1.5 % of it), so accuracy alone flatters a model that ignores the small ones.
    """
    present = [int(k) for k in np.unique(labels)]
    out = {
        "expression_acc": float(np.mean(pred == labels)) if len(labels) else float("nan"),
        "expression_macro_f1": float(f1_score(labels, pred, labels=present, average="macro", zero_division=0)),
    }
    for k in present:
        out[f"recall_{class_names[k]}"] = float(np.mean(pred[labels == k] == k))
    return out


def confusion_counts(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    return confusion_matrix(labels, pred, labels=list(range(num_classes)))


def evaluate_expression(
    encoder: nn.Module,
    head: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: EvaluationConfig,
    *,
    device: torch.device,
    with_occlusion: bool = True,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Expression accuracy, macro-F1 and per-class recall of encoder + expression head,
    clean; accuracy under occlusion too."""
    x = to_tensor(images)
    pred = predict(encoder, head, x, device=device, flip_tta=cfg.flip_tta, shift_tta=cfg.shift_tta)
    names = list(class_names) if class_names is not None else [str(k) for k in range(int(labels.max(initial=0)) + 1)]
    out = expression_scores(labels, pred, names)
    if with_occlusion:
        occ = [
            float(np.mean(predict(encoder, head, v, device=device, flip_tta=cfg.flip_tta, shift_tta=cfg.shift_tta) == labels))
            for v in _occluded_views(x, cfg)
        ]
        out["occluded_expression_acc"] = float(np.mean(occ))
    out["test_images"] = float(len(labels))
    return out


__all__ = ["confusion_counts", "evaluate_closed_set", "evaluate_expression", "evaluate_open_set", "expression_scores"]
