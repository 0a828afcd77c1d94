"""Centralized training (one machine, no federation): the baseline every federated result is
compared with, non-private or with DP-SGD (``privacy.epsilon``).

:func:`train_run` loads the faces a config names, splits them, trains the GRU encoder with its
head, evaluates on the held-out part and, given a run directory, writes the resolved config,
the split, the metrics and the checkpoint there (each atomically).
"""

from __future__ import annotations

import copy
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from fedface.common.checkpoint import Checkpoint
from fedface.common.config import TrainConfig
from fedface.common.data import (
    FaceSet,
    Split,
    load_faces,
    split_closed_set,
    split_open_set,
    split_open_set_folds,
    to_tensor,
)
from fedface.common.data.expressions import EXPRESSIONS, expression_classes, expression_labels
from fedface.common.data.transforms import AugmentConfig
from fedface.common.errors import ConfigError, RunDirError, SplitError
from fedface.common.evaluation import evaluate_closed_set, evaluate_expression, evaluate_open_set
from fedface.common.io import atomic_write_json, atomic_write_toml
from fedface.common.models import ExpressionHead, build_encoder, build_margin_head, freeze_for, warn_frozen_at_random
from fedface.common.privacy.accounting import format_epsilon
from fedface.common.privacy.dpsgd import (
    DPPlan,
    make_dp_optimizer,
    plan_mechanism,
    poisson_batches,
    secure_seed,
    train_epoch_dp,
)
from fedface.common.privacy.ledger import PrivacyLedger, default_ledger_path
from fedface.common.privacy.per_sample import stem_precision, to_per_sample
from fedface.common.training import EpochStats, predict, select_device, shuffled_batches, train_epoch

logger = logging.getLogger(__name__)

@dataclass
class TaskData:
    """The faces of one run, divided for its task."""

    faces: FaceSet
    split: Split
    train: FaceSet
    test: FaceSet
    train_labels: np.ndarray  # class index per training image (identity or expression)
    test_labels: np.ndarray
    class_names: tuple[str, ...]


def load_config_faces(cfg: TrainConfig) -> FaceSet:
    """The faces ``cfg.data`` names, loaded as it says."""
    return load_faces(cfg.data.root, layout=cfg.data.layout, size=cfg.data.image_size, on_error=cfg.data.on_error, crop=cfg.data.crop)


def prepare_task_data(
    cfg: TrainConfig, faces: FaceSet | None = None, *, split: Split | None = None, split_path: Path | None = None
) -> TaskData:
    """Load (unless given) and split the faces for ``cfg``'s task.

    A given ``split`` (indices into the task's faces), or the saved split at ``split_path``,
    replaces the one ``cfg.split`` would draw; its kind then decides the protocol.
    """
    if faces is None:
        faces = load_config_faces(cfg)
    if faces.skipped:
        logger.warning("skipped %d unreadable image(s); see the log above for paths and reasons", len(faces.skipped))
    if cfg.training.task == "expression":
        expression_names = expression_classes(faces)
        faces, class_labels = expression_labels(faces, expression_names)
    else:
        class_labels = faces.labels
    if split is None and split_path is not None:
        split = Split.load(split_path, faces)
    kind = split.kind if split is not None else cfg.split.kind
    if cfg.training.task == "expression" and kind != "open-set":
        raise ConfigError("training.task = 'expression' holds subjects out: set split.kind = 'open-set'")
    if split is None and kind == "open-set" and cfg.split.folds:
        if cfg.split.folds > faces.num_identities:
            raise SplitError(
                f"split.folds = {cfg.split.folds} needs at least that many subjects; {faces.num_identities} are present: lower it"
            )
        split = split_open_set_folds(faces, folds=cfg.split.folds, seed=cfg.split.seed)[cfg.split.fold]
    elif split is None and kind == "open-set":
        if cfg.split.test_identities >= faces.num_identities:
            raise SplitError(
                f"split.test-identities = {cfg.split.test_identities} leaves no training identity "
                f"among {faces.num_identities}: lower it"
            )
        split = split_open_set(faces, test_identities=cfg.split.test_identities, seed=cfg.split.seed)
    elif split is None:
        split = split_closed_set(faces, train_per_identity=cfg.split.train_per_identity, seed=cfg.split.seed)
    train, test = faces.subset(split.train), faces.subset(split.test)
    train_labels, test_labels = class_labels[split.train], class_labels[split.test]
    if cfg.training.task == "expression":
        names = expression_names
    elif split.kind == "open-set":
        train = train.relabel()
        train_labels = train.labels
        names = train.identity_names
    else:
        names = faces.identity_names
    return TaskData(faces, split, train, test, train_labels, test_labels, tuple(names))


@dataclass
class RunResult:
    """What a training run produced."""

    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    run_dir: Path | None = None
    encoder: nn.Module | None = None
    head: nn.Module | None = None
    wall_s: float = 0.0
    privacy: dict[str, Any] | None = None  # the mechanism and spend of a private run


def evaluate_task(
    cfg: TrainConfig, data: TaskData, encoder: nn.Module, head: nn.Module, device: torch.device, *, with_occlusion: bool = True
) -> dict[str, float]:
    """Test metrics of a trained encoder (and head, for expressions) on ``data``'s test part,
    by the protocol of the split actually used (``data.split.kind``)."""
    if cfg.training.task == "expression":
        return evaluate_expression(
            encoder,
            head,
            data.test.images,
            data.test_labels,
            cfg.evaluation,
            device=device,
            with_occlusion=with_occlusion,
            class_names=data.class_names,
        )
    if data.split.kind == "open-set":
        return evaluate_open_set(encoder, data.test, cfg.evaluation, device=device, with_occlusion=with_occlusion)
    return evaluate_closed_set(encoder, data.train, data.test, cfg.evaluation, device=device, with_occlusion=with_occlusion)


def _prepare_run_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"run directory {out_dir} is a file: choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise RunDirError(f"run directory {out_dir} already holds a run: choose a new --out or pass --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)


def train_run(
    cfg: TrainConfig,
    *,
    out_dir: Path | None = None,
    overwrite: bool = False,
    faces: FaceSet | None = None,
    split: Split | None = None,
    on_epoch: Callable[[EpochStats, dict[str, float] | None], None] | None = None,
) -> RunResult:
    """Train and evaluate one centralized model as ``cfg`` says.

    Parameters
    ----------
    out_dir
        Run directory to write ``config.toml``, ``split.json``, ``metrics.json`` and
        ``checkpoint.pt`` into; None writes nothing.
    faces
        Already loaded faces (skips loading ``cfg.data.root``), e.g. for a benchmark that
        trains several models on one data set.
    split
        A split of ``faces`` to use instead of the one ``cfg.split`` describes (e.g. one
        fold of :func:`~fedface.common.data.split_open_set_folds`); its kind sets the protocol.
    on_epoch
        Called after each epoch with its statistics and, on evaluation epochs, the metrics.
    """
    t_start = time.perf_counter()
    if out_dir is not None:
        _prepare_run_dir(out_dir, overwrite)
    if cfg.training.threads > 0:
        torch.set_num_threads(cfg.training.threads)
    device = select_device(cfg.training.device)
    data = prepare_task_data(cfg, faces, split=split)
    if split is not None:
        cfg = cfg.with_overrides({"split.kind": split.kind})
    if out_dir is not None:
        atomic_write_toml(out_dir / "config.toml", cfg.to_toml_dict())
        data.split.save(out_dir / "split.json", data.faces)
    logger.info(
        "task %s, %s split: %d training images of %d classes, %d test images, device %s",
        cfg.training.task,
        cfg.split.kind,
        len(data.train),
        len(data.class_names),
        len(data.test),
        device,
    )

    torch.manual_seed(cfg.training.seed)
    encoder = build_encoder(cfg.model, image_size=cfg.data.image_size).to(device)
    if cfg.training.init_from is not None:
        load_encoder_init(encoder, cfg)
    warn_frozen_at_random(cfg.privacy.trainable, encoder, initialised=cfg.training.init_from is not None)
    num_classes = len(data.class_names)
    head: nn.Module
    if cfg.training.task == "expression":
        head = ExpressionHead(cfg.model.embedding_dim, num_classes)
    else:
        head = build_margin_head(cfg.head, embedding_dim=cfg.model.embedding_dim, num_classes=num_classes)
    if cfg.training.init_from is not None and cfg.training.task == "expression":
        load_expression_head_init(head, cfg, data.class_names)
    head = head.to(device)
    aug = AugmentConfig(**dict(cfg.augment))
    generator = torch.Generator().manual_seed(cfg.training.seed)
    images = to_tensor(data.train.images).to(device)
    labels = torch.from_numpy(data.train_labels).to(device)

    private = _PrivateTraining.start(cfg, data, encoder, head, out_dir, device) if cfg.privacy.enabled else None
    if private is None:
        freeze_for(cfg.privacy.trainable, encoder)  # fine-tuning without DP keeps the same parts fixed
    trained = private.encoder if private is not None else encoder
    params = [p for p in list(trained.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.training.lr, weight_decay=cfg.training.weight_decay)
    steps_per_epoch = private.plan.steps_per_epoch if private is not None else math.ceil(len(data.train) / cfg.training.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.training.lr,
        total_steps=cfg.training.epochs * steps_per_epoch,
        pct_start=cfg.training.warmup_fraction,
    )
    dp_optimizer = private.optimizer(optimizer) if private is not None else None
    average = WeightAverage(trained, head, cfg.training.ema_decay) if cfg.training.ema_decay > 0 else None
    on_step = average.update if average is not None else None

    history: list[dict[str, float]] = []
    metrics: dict[str, float] = {}
    eval_encoder, eval_head = encoder, head
    for epoch in range(1, cfg.training.epochs + 1):
        if private is not None and dp_optimizer is not None:
            stats = train_epoch_dp(
                encoder=trained,
                head=head,
                images=images,
                labels=labels,
                optimizer=dp_optimizer,
                scheduler=scheduler,
                batches=private.batches(len(images)),
                augment_cfg=aug,
                generator=generator,
                epoch=epoch,
                label_smoothing=cfg.training.label_smoothing,
                augment_multiplicity=cfg.privacy.augment_multiplicity,
                on_step=on_step,
            )
        else:
            stats = train_epoch(
                encoder=encoder,
                head=head,
                images=images,
                labels=labels,
                optimizer=optimizer,
                scheduler=scheduler,
                batches=shuffled_batches(len(images), cfg.training.batch_size, generator),
                augment_cfg=aug,
                generator=generator,
                device=device,
                epoch=epoch,
                label_smoothing=cfg.training.label_smoothing,
                precision=cfg.training.precision,
                on_step=on_step,
            )
        row: dict[str, float] = {
            "epoch": epoch,
            "loss": stats.loss,
            "train_acc": stats.train_accuracy,
            "lr": stats.lr,
            "epoch_s": stats.seconds,
            "images_per_s": stats.images_per_s,
        }
        last = epoch == cfg.training.epochs
        evaluated: dict[str, float] | None = None
        if last or epoch % cfg.training.eval_every == 0:
            if average is not None:
                # the weight average is the model: evaluated (and saved) in copies, training goes on
                eval_encoder, eval_head = average.models(encoder, head)
            else:
                if private is not None:
                    # evaluate (and save) the plain nn.GRU encoder: same weights, fused kernels
                    encoder.load_state_dict(trained.state_dict())
                eval_encoder, eval_head = encoder, head
            evaluated = evaluate_task(cfg, data, eval_encoder, eval_head, device, with_occlusion=last)
            row.update({f"test_{k}": v for k, v in evaluated.items()})
            if last:
                metrics = evaluated
        history.append(row)
        if out_dir is not None:
            atomic_write_json(
                out_dir / "metrics.json",
                {"task": cfg.training.task, "history": history, "final": metrics, **_privacy_summary(private)},
            )
        if on_epoch is not None:
            on_epoch(stats, evaluated)

    wall_s = time.perf_counter() - t_start
    encoder, head = eval_encoder, eval_head  # the last epoch always evaluates: the model the run gives
    if out_dir is not None:
        summary: dict[str, Any] = {
            "task": cfg.training.task,
            "split": cfg.split.kind,
            "device": str(device),
            "wall_s": wall_s,
            "train_images": len(data.train),
            "classes": num_classes,
            "history": history,
            "final": metrics,
            "ema_decay": cfg.training.ema_decay,
            **_privacy_summary(private),
        }
        atomic_write_json(out_dir / "metrics.json", summary)
        if cfg.training.task == "expression":
            from fedface.simulations.confusion import write_confusion

            pred = predict(
                encoder,
                head,
                to_tensor(data.test.images),
                device=device,
                flip_tta=cfg.evaluation.flip_tta,
                shift_tta=cfg.evaluation.shift_tta,
            )
            root = Path(cfg.data.root)
            name = f"{root.parent.name}/{root.name}" if root.name.lower() in ("train", "test", "val", "validation") else root.name
            title = f"{name}: {len(data.test)} test images, accuracy {metrics.get('expression_acc', float('nan')):.3f}"
            write_confusion(out_dir, data.test_labels, pred, data.class_names, title)
        Checkpoint(
            config=cfg,
            task=cfg.training.task,
            epoch=cfg.training.epochs,
            num_classes=num_classes,
            encoder_state={k: v.detach().cpu() for k, v in encoder.state_dict().items()},
            head_state={k: v.detach().cpu() for k, v in head.state_dict().items()},
            optimizer_state=optimizer.state_dict(),
            scheduler_state=scheduler.state_dict(),
            class_names=data.class_names if cfg.training.task == "expression" else (),
        ).save(out_dir / "checkpoint.pt")
    return RunResult(
        metrics=metrics,
        history=history,
        run_dir=out_dir,
        encoder=encoder,
        head=head,
        wall_s=wall_s,
        privacy=_privacy_summary(private).get("privacy"),
    )


class WeightAverage:
    """An exponential moving average of the trained weights (``training.ema-decay``), updated
    after every step: torch's :class:`~torch.optim.swa_utils.AveragedModel` with its EMA rule.

    Under DP-SGD it averages the released (clipped and noised) iterates only, so it is
    post-processing: it costs no privacy, and the ledger charges the run the same.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, decay: float) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.live = nn.ModuleDict({"encoder": encoder, "head": head})
        self.average = AveragedModel(self.live, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def update(self) -> None:
        """Fold the live weights in (the first call copies them)."""
        self.average.update_parameters(self.live)

    def models(self, encoder: nn.Module, head: nn.Module) -> tuple[nn.Module, nn.Module]:
        """Copies of ``encoder`` (a plain encoder of the same config) and ``head`` holding the
        average (parameter names are the same in the per-sample encoder and the plain one)."""
        enc, hd = copy.deepcopy(encoder), copy.deepcopy(head)
        enc.load_state_dict(self.average.module["encoder"].state_dict())
        hd.load_state_dict(self.average.module["head"].state_dict())
        return enc, hd


def load_encoder_init(encoder: nn.Module, cfg: TrainConfig) -> None:
    """Start ``encoder`` from the encoder of the checkpoint at ``training.init-from``."""
    from fedface.common.checkpoint import load_checkpoint

    assert cfg.training.init_from is not None
    ckpt = load_checkpoint(cfg.training.init_from)
    if ckpt.config.model != cfg.model or ckpt.config.data.image_size != cfg.data.image_size:
        raise ConfigError(
            f"training.init-from {cfg.training.init_from} holds an encoder of another shape: its [model] section "
            f"and data.image-size must equal this run's"
        )
    encoder.load_state_dict(ckpt.encoder_state)
    logger.info("encoder initialised from %s", cfg.training.init_from)


def load_expression_head_init(head: nn.Module, cfg: TrainConfig, class_names: tuple[str, ...]) -> bool:
    """Start an expression head from the head of ``training.init-from`` too, when that is an
    expression checkpoint of the same classes (FER2013's seven, shared by CK+ and JAFFE);
    otherwise the head starts fresh. Returns whether it was loaded."""
    from fedface.common.checkpoint import load_checkpoint

    assert cfg.training.init_from is not None
    ckpt = load_checkpoint(cfg.training.init_from)
    if ckpt.task != "expression" or tuple(ckpt.class_names) != tuple(class_names) or not ckpt.head_state:
        logger.info("training.init-from %s holds no expression head of these classes: the head starts fresh", cfg.training.init_from)
        return False
    try:
        head.load_state_dict(ckpt.head_state)
    except RuntimeError:
        logger.info("the expression head of %s does not fit this model: the head starts fresh", cfg.training.init_from)
        return False
    logger.info("expression head initialised from %s", cfg.training.init_from)
    return True


@dataclass
class _PrivateTraining:
    """A private run's DP-SGD set-up: the plan, its ledger charge and the per-sample encoder."""

    cfg: TrainConfig
    plan: DPPlan
    encoder: nn.Module
    dataset: str
    ledger_path: Path
    epsilon_total: float
    sampling: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(secure_seed()))

    @classmethod
    def start(
        cls, cfg: TrainConfig, data: TaskData, encoder: nn.Module, head: nn.Module, out_dir: Path | None, device: torch.device
    ) -> _PrivateTraining:
        """Plan the session, charge it to the ledger (before any training), prepare the encoder."""
        pc = cfg.privacy
        plan = plan_mechanism(
            examples=len(data.train),
            batch_size=cfg.training.batch_size,
            epochs=cfg.training.epochs,
            delta=pc.delta,
            max_grad_norm=pc.max_grad_norm,
            accountant=pc.accountant,
            epsilon=pc.epsilon if pc.noise_multiplier is None else None,
            noise_multiplier=pc.noise_multiplier,
            secure_mode=pc.secure_mode,
        )
        dataset = pc.dataset or str(Path(cfg.data.root).resolve())
        ledger_path = pc.ledger or default_ledger_path()
        run_id = str(out_dir.resolve()) if out_dir is not None else f"train-{uuid.uuid4().hex[:12]}"
        with PrivacyLedger(ledger_path) as ledger:
            ledger.verify()  # a tampered ledger must not silently accept more spend
            if pc.budget_epsilon is not None and ledger.budget(dataset) is None:
                ledger.set_budget(dataset, epsilon=pc.budget_epsilon, delta=pc.delta, accountant=pc.accountant)
            session = ledger.charge(dataset, plan.mechanism, run_id=run_id, examples=len(data.train))
        m = plan.mechanism
        logger.info(
            "DP-SGD: noise multiplier %.4f, sample rate %.4f, %d steps, clip %.3g: epsilon %s at delta %.1e (%s); "
            "data set total now %s in ledger %s",
            m.noise_multiplier,
            m.sample_rate,
            m.steps,
            m.max_grad_norm,
            format_epsilon(plan.epsilon),
            m.delta,
            m.accountant,
            format_epsilon(session.epsilon_after),
            ledger_path,
        )
        private_encoder = to_per_sample(encoder, frozen_stem_precision=cfg.training.precision).to(device)
        freeze_for(pc.trainable, private_encoder)
        return cls(cfg, plan, private_encoder, dataset, Path(ledger_path), session.epsilon_after)

    def optimizer(self, base: torch.optim.Optimizer) -> DPOptimizer:
        """Opacus' DP optimizer around ``base`` with this plan's noise and clipping.

        The noise is never seeded from the config: ``training.seed`` is saved with the
        checkpoint, and noise regenerated from it could be subtracted from the released
        weights. It comes from a generator seeded from the OS (re-seeded every step in
        secure mode).
        """
        noise_gen = torch.Generator(device=next(self.encoder.parameters()).device).manual_seed(secure_seed())
        return make_dp_optimizer(
            base,
            noise_multiplier=self.plan.mechanism.noise_multiplier,
            max_grad_norm=self.plan.mechanism.max_grad_norm,
            expected_batch_size=self.plan.expected_batch_size,
            secure_mode=self.plan.mechanism.secure_mode,
            generator=noise_gen,
        )

    def batches(self, n: int) -> Iterator[torch.Tensor]:
        """One epoch of Poisson batches, drawn from OS-seeded randomness (never the config's seed)."""
        m = self.plan.mechanism
        return poisson_batches(n, m.sample_rate, self.plan.steps_per_epoch, generator=self.sampling, secure=m.secure_mode)


def _privacy_summary(private: _PrivateTraining | None) -> dict[str, Any]:
    """The ``privacy`` entry of metrics.json (empty for a non-private run)."""
    if private is None:
        return {}
    m = private.plan.mechanism
    return {
        "privacy": {
            "epsilon": private.plan.epsilon,
            "delta": m.delta,
            "accountant": m.accountant,
            "noise_multiplier": m.noise_multiplier,
            "sample_rate": m.sample_rate,
            "steps": m.steps,
            "max_grad_norm": m.max_grad_norm,
            "sampling": m.sampling,
            "secure_mode": m.secure_mode,
            "trainable": private.cfg.privacy.trainable,
            "augment_multiplicity": private.cfg.privacy.augment_multiplicity,
            "stem_precision": stem_precision(private.encoder),
            "dataset": private.dataset,
            "ledger": str(private.ledger_path),
            "dataset_epsilon_after": private.epsilon_total,
        }
    }


__all__ = [
    "EXPRESSIONS",
    "RunResult",
    "TaskData",
    "evaluate_task",
    "expression_classes",
    "expression_labels",
    "load_config_faces",
    "load_encoder_init",
    "prepare_task_data",
    "train_run",
]
