"""DP-SGD at a site: Poisson sampling, clipping and noise through Opacus, planning, and the
private path of centralized training (charged to the ledger before it trains)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedface.common.config import TrainConfig
from fedface.common.data import load_faces, to_tensor
from fedface.common.errors import BudgetExhaustedError
from fedface.common.models import GRUFaceEncoder, MarginHead
from fedface.common.privacy.accounting import compute_epsilon
from fedface.common.privacy.clipping import OuterSum
from fedface.common.privacy.dpsgd import dp_step, make_dp_optimizer, plan_mechanism, poisson_batches
from fedface.common.privacy.ledger import PrivacyLedger
from fedface.common.privacy.per_sample import to_per_sample

SIZE = (16, 16)


@pytest.fixture(scope="module")
def faces(orl_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight real ORL faces of four identities at 16x16, and their labels."""
    fs = load_faces(orl_root, size=SIZE)
    idx = np.concatenate([np.flatnonzero(fs.labels == k)[:2] for k in range(4)])
    return to_tensor(fs.images[idx]).clone(), torch.from_numpy(fs.labels[idx]).clone()


def _models(seed: int = 0, hidden: int = 4) -> tuple[nn.Module, MarginHead]:
    torch.manual_seed(seed)
    encoder = to_per_sample(GRUFaceEncoder(image_size=SIZE, hidden_size=hidden, embedding_dim=6, downsample=1))
    head = MarginHead.cosface(6, 4, scale=8.0)
    return encoder, head


# --- Poisson sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize("secure", [False, True])
def test_poisson_batches_have_the_expected_size_and_vary(secure: bool) -> None:
    # Act
    sizes = [len(b) for b in poisson_batches(1000, 0.05, 400, generator=torch.Generator().manual_seed(0), secure=secure)]

    # Assert: Binomial(1000, 0.05): mean 50, sd 6.9; 400 batches pin the mean to about +-0.7
    assert abs(np.mean(sizes) - 50) < 2.5
    assert 4 < np.std(sizes) < 10


def test_poisson_batches_can_be_empty_and_index_each_example_at_most_once() -> None:
    batches = list(poisson_batches(5, 0.1, 200, generator=torch.Generator().manual_seed(1)))

    assert len(batches) == 200
    assert any(len(b) == 0 for b in batches)
    assert all(len(set(b.tolist())) == len(b) and all(0 <= i < 5 for i in b.tolist()) for b in batches)


def test_poisson_batches_reject_a_sample_rate_outside_0_1() -> None:
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\]"):
        next(poisson_batches(10, 1.5, 1))


def test_poisson_batches_secure_mode_ignores_the_seeded_generator() -> None:
    first = [b.tolist() for b in poisson_batches(100, 0.5, 5, generator=torch.Generator().manual_seed(0), secure=True)]
    second = [b.tolist() for b in poisson_batches(100, 0.5, 5, generator=torch.Generator().manual_seed(0), secure=True)]

    assert first != second


# --- one DP step -------------------------------------------------------------------------------


# hidden 4: every GRU weight's per-example gradient is formed; hidden 32: the hidden-to-hidden
# weights are clipped from Gram matrices (ghost norms) and never formed
@pytest.mark.parametrize("hidden", [4, 32])
def test_dp_step_without_noise_applies_the_mean_of_clipped_per_example_gradients(
    faces: tuple[torch.Tensor, torch.Tensor], hidden: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: plain SGD with lr 1, so the parameter change is minus the DP gradient
    x, y = faces
    encoder, head = _models(hidden=hidden)
    formed: list[tuple[int, ...]] = []
    original = OuterSum.per_example

    def spy(term: OuterSum) -> torch.Tensor:
        formed.append((sum(b.shape[-1] for b in term.g), term.a.shape[-1]))
        return original(term)

    monkeypatch.setattr(OuterSum, "per_example", spy)
    params = list(encoder.parameters()) + list(head.parameters())
    clip, expected_batch = 0.05, 10
    per_example = []
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(head(encoder(x[i : i + 1]), y[i : i + 1]), y[i : i + 1]), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        per_example.append([g * min(1.0, clip / (float(norm) + 1e-6)) for g in grads])
    expected = [sum(gs[k] for gs in per_example) / expected_batch for k in range(len(params))]
    before = [p.detach().clone() for p in params]
    optimizer = make_dp_optimizer(
        torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=expected_batch
    )

    # Act
    dp_step(encoder, head, optimizer, x, y)

    # Assert
    for p, b, e in zip(params, before, expected, strict=True):
        torch.testing.assert_close(b - p.detach(), e, atol=1e-6, rtol=1e-4)
    assert ((3 * hidden, hidden) in formed) == (hidden == 4)


def test_dp_step_on_an_empty_batch_adds_noise_of_the_planned_scale() -> None:
    # Arrange
    encoder, head = _models()
    params = list(encoder.parameters()) + list(head.parameters())
    before = torch.cat([p.detach().flatten().clone() for p in params])
    sigma, clip, expected_batch = 2.0, 0.5, 4
    optimizer = make_dp_optimizer(
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected_batch,
        generator=torch.Generator().manual_seed(0),
    )

    # Act
    dp_step(encoder, head, optimizer, torch.zeros(0, 1, *SIZE), torch.zeros(0, dtype=torch.long))

    # Assert: the update is pure noise of sd sigma * C / B (about 700 parameters: +-6%)
    change = before - torch.cat([p.detach().flatten() for p in params])
    assert change.numel() > 500
    assert float(change.std()) == pytest.approx(sigma * clip / expected_batch, rel=0.1)
    assert abs(float(change.mean())) < 0.1 * sigma * clip / expected_batch


@pytest.mark.parametrize("secure", [False, True])
def test_dp_noise_is_reproducible_from_a_seed_unless_secure(faces: tuple[torch.Tensor, torch.Tensor], secure: bool) -> None:
    x, y = faces

    def run() -> torch.Tensor:
        encoder, head = _models()
        params = list(encoder.parameters()) + list(head.parameters())
        opt = make_dp_optimizer(
            torch.optim.SGD(params, lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=8,
            secure_mode=secure,
            generator=torch.Generator().manual_seed(3),
        )
        dp_step(encoder, head, opt, x, y)
        return torch.cat([p.detach().flatten() for p in params])

    assert torch.equal(run(), run()) is (not secure)


# --- planning ----------------------------------------------------------------------------------


def test_plan_mechanism_calibrates_once_for_every_step_of_the_training() -> None:
    # Act
    plan = plan_mechanism(
        examples=300, batch_size=30, epochs=20, delta=1e-5, max_grad_norm=1.0, accountant="rdp", epsilon=4.0
    )

    # Assert
    m = plan.mechanism
    assert m.sample_rate == pytest.approx(0.1)
    assert m.steps == 200 and plan.steps_per_epoch == 10 and plan.expected_batch_size == 30
    assert plan.epsilon <= 4.0
    assert plan.epsilon == compute_epsilon([(m.noise_multiplier, 0.1, 200)], delta=1e-5, accountant="rdp")
    assert compute_epsilon([(m.noise_multiplier * 0.98, 0.1, 200)], delta=1e-5, accountant="rdp") > 4.0 * 0.99


def test_plan_mechanism_with_a_fixed_noise_multiplier_reports_its_epsilon() -> None:
    plan = plan_mechanism(
        examples=100, batch_size=200, epochs=2, delta=1e-5, max_grad_norm=1.0, accountant="rdp", noise_multiplier=1.5
    )

    assert plan.mechanism.sample_rate == 1.0 and plan.mechanism.steps == 2
    assert plan.epsilon == compute_epsilon([(1.5, 1.0, 2)], delta=1e-5, accountant="rdp")


def test_plan_mechanism_needs_exactly_one_of_epsilon_and_noise() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        plan_mechanism(examples=10, batch_size=2, epochs=1, delta=1e-5, max_grad_norm=1.0, accountant="rdp")


# --- private centralized training --------------------------------------------------------------


def _private_cfg(orl_root: Path, ledger: Path, **privacy: object) -> TrainConfig:
    return TrainConfig().with_overrides(
        {
            "data.root": str(orl_root),
            "data.image-size": [32, 32],
            "model.hidden-size": 8,
            "model.embedding-dim": 8,
            "model.downsample": 1,
            "evaluation.occlusion-box": 8,
            "evaluation.shift-tta": 0,
            "training.epochs": 2,
            "training.batch-size": 40,
            "training.threads": 1,
            "privacy.ledger": str(ledger),
            **{f"privacy.{k}": v for k, v in privacy.items()},
        }
    )


def test_private_training_is_charged_to_the_ledger_with_its_plan(orl_root: Path, tmp_path: Path) -> None:
    from fedface.simulations.centralized import train_run

    # Arrange
    ledger = tmp_path / "ledger.sqlite"
    cfg = _private_cfg(orl_root, ledger, epsilon=3.0)

    # Act
    run = train_run(cfg, out_dir=tmp_path / "run")

    # Assert
    with PrivacyLedger(ledger) as led:
        sessions = led.sessions()
        spend = led.spend(str(orl_root.resolve()))
    assert len(sessions) == 1
    m = sessions[0].mechanism
    assert (m.sample_rate, m.steps) == (pytest.approx(40 / 200), 2 * 5)
    assert spend.epsilon == pytest.approx(run.privacy["epsilon"], abs=1e-9) and spend.epsilon <= 3.0
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["privacy"]["noise_multiplier"] == m.noise_multiplier
    assert summary["privacy"]["sampling"] == "poisson"
    assert 0.0 <= summary["final"]["rank1"] <= 1.0


@pytest.mark.parametrize(("trainable", "precision", "expected"), [("gru", "bf16", "bf16"), ("all", "bf16", "fp32"), ("gru", "fp32", "fp32")])
def test_training_precision_bf16_reaches_only_a_frozen_stem_under_dp(
    orl_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trainable: str, precision: str, expected: str
) -> None:
    from fedface.common.privacy import dpsgd
    from fedface.simulations.centralized import train_run

    seen: list[tuple[str, bool]] = []  # (the encoder's stem precision, whether its stem trains)
    real = dpsgd.clip_grad_samples

    def spy(encoder, head, x, y, clip, **kw):  # type: ignore[no-untyped-def]
        seen.append((encoder.frozen_stem_precision, any(p.requires_grad for p in encoder.stem.parameters())))
        return real(encoder, head, x, y, clip, **kw)

    monkeypatch.setattr(dpsgd, "clip_grad_samples", spy)
    cfg = _private_cfg(orl_root, tmp_path / "ledger.sqlite", epsilon=3.0, trainable=trainable).with_overrides(
        {"model.stem": [4], "training.precision": precision, "training.epochs": 1}
    )
    run = train_run(cfg)

    assert seen and {trains for _, trains in seen} == {trainable == "all"}
    assert {stem for stem, _ in seen} == {precision}  # the encoder is told; it applies bf16 to a frozen stem only
    assert run.privacy["stem_precision"] == expected  # and metrics.json says what ran


def test_weight_average_is_the_exponential_moving_average_of_the_steps() -> None:
    from fedface.simulations.centralized import WeightAverage

    torch.manual_seed(0)
    enc, head = nn.Linear(3, 2), nn.Linear(2, 2)
    average = WeightAverage(enc, head, decay=0.75)
    expected = None
    for _ in range(4):
        with torch.no_grad():
            for p in (*enc.parameters(), *head.parameters()):
                p.add_(torch.randn_like(p))
        average.update()
        live = enc.weight.detach().clone()
        expected = live if expected is None else 0.75 * expected + 0.25 * live  # the first update copies

    avg_enc, avg_head = average.models(enc, head)
    torch.testing.assert_close(avg_enc.weight, expected)
    assert not torch.equal(avg_enc.weight, enc.weight)  # copies: the live module is untouched
    assert avg_head is not head


def test_ema_decay_saves_the_averaged_model_and_charges_the_same(orl_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedface.common.checkpoint import load_checkpoint
    from fedface.simulations import centralized

    made: list[centralized.WeightAverage] = []
    real = centralized.WeightAverage

    def spy(*args, **kw):  # type: ignore[no-untyped-def]
        made.append(real(*args, **kw))
        return made[-1]

    monkeypatch.setattr(centralized, "WeightAverage", spy)
    cfg = _private_cfg(orl_root, tmp_path / "ledger.sqlite", epsilon=3.0)
    plain = centralized.train_run(cfg, out_dir=tmp_path / "plain")
    averaged = centralized.train_run(cfg.with_overrides({"training.ema-decay": 0.9}), out_dir=tmp_path / "ema")

    assert len(made) == 1  # none for the run without
    saved = load_checkpoint(tmp_path / "ema" / "checkpoint.pt").encoder_state
    average = made[0].average.module["encoder"].state_dict()
    live = made[0].live["encoder"].state_dict()
    assert saved.keys() == average.keys()
    assert all(torch.equal(saved[k], average[k].cpu()) for k in saved)  # the model saved is the average ...
    assert any(not torch.equal(saved[k], live[k].cpu()) for k in saved)  # ... not the last step's weights
    # post-processing: the same plan and the same charge as without it
    assert averaged.privacy["epsilon"] == plain.privacy["epsilon"] and averaged.privacy["steps"] == plain.privacy["steps"]
    assert json.loads((tmp_path / "ema" / "metrics.json").read_text())["ema_decay"] == 0.9


def test_augment_multiplicity_trains_on_copies_but_charges_and_clips_each_example_once(
    orl_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedface.common.privacy import dpsgd
    from fedface.simulations.centralized import train_run

    seen: list[tuple[int, int, int]] = []  # (inputs, copies, examples clipped)
    real = dpsgd.clip_grad_samples

    def spy(encoder, head, x, y, clip, **kw):  # type: ignore[no-untyped-def]
        out, norms = real(encoder, head, x, y, clip, **kw)
        seen.append((x.shape[0], kw["copies"], norms.shape[0]))
        return out, norms

    monkeypatch.setattr(dpsgd, "clip_grad_samples", spy)
    plain = train_run(_private_cfg(orl_root, tmp_path / "a.sqlite", epsilon=3.0))
    seen_plain = list(seen)
    seen.clear()
    tripled = train_run(_private_cfg(orl_root, tmp_path / "b.sqlite", epsilon=3.0, **{"augment-multiplicity": 3}))

    # every step fed three augmentations of each sampled example, and clipped one gradient per example
    assert seen and all(inputs == 3 * clipped and copies == 3 for inputs, copies, clipped in seen)
    assert all(inputs == clipped and copies == 1 for inputs, copies, clipped in seen_plain)
    # the privacy charged is exactly that of one copy: same sample rate, steps and noise
    mechanisms = []
    for name in ("a.sqlite", "b.sqlite"):
        with PrivacyLedger(tmp_path / name) as led:
            mechanisms.append(led.sessions()[0].mechanism)
    assert mechanisms[0] == mechanisms[1]
    assert tripled.privacy["epsilon"] == plain.privacy["epsilon"] <= 3.0


def test_an_epoch_with_augment_multiplicity_counts_examples_not_copies(faces: tuple[torch.Tensor, torch.Tensor]) -> None:
    from fedface.common.data.transforms import AugmentConfig
    from fedface.common.privacy.dpsgd import train_epoch_dp

    x, y = faces
    encoder, head = _models()
    params = list(encoder.parameters()) + list(head.parameters())
    opt = make_dp_optimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    batches = [torch.tensor([0, 1, 2]), torch.tensor([], dtype=torch.long), torch.tensor([3, 4, 5, 6])]

    stats = train_epoch_dp(
        encoder=encoder, head=head, images=x, labels=y, optimizer=opt, batches=iter(batches),
        augment_cfg=AugmentConfig(), generator=torch.Generator().manual_seed(0), epoch=1, augment_multiplicity=3,
    )

    assert stats.images == 7
    assert 0.0 <= stats.train_accuracy <= 1.0 and math.isfinite(stats.loss)


def test_two_private_runs_compose_in_the_ledger(orl_root: Path, tmp_path: Path) -> None:
    from fedface.simulations.centralized import train_run

    ledger = tmp_path / "ledger.sqlite"
    cfg = _private_cfg(orl_root, ledger, epsilon=2.0, dataset="orl-site")

    first = train_run(cfg)
    second = train_run(cfg)

    with PrivacyLedger(ledger) as led:
        total = led.spend("orl-site").epsilon
    history = [s.mechanism.history_entry() for s in PrivacyLedger(ledger).sessions("orl-site")]
    assert total == pytest.approx(compute_epsilon(history, delta=1e-5, accountant="rdp"), abs=1e-9)
    assert first.privacy["epsilon"] < total <= 4.0
    assert second.privacy["dataset_epsilon_after"] == pytest.approx(total, abs=1e-9)


def test_private_training_over_budget_is_refused_before_it_trains(orl_root: Path, tmp_path: Path) -> None:
    from fedface.simulations.centralized import train_run

    # Arrange: a budget smaller than the training's own epsilon
    ledger = tmp_path / "ledger.sqlite"
    with PrivacyLedger(ledger) as led:
        led.set_budget("orl-site", epsilon=1.0, delta=1e-5)
    cfg = _private_cfg(orl_root, ledger, epsilon=2.0, dataset="orl-site")
    epochs_run: list[int] = []

    # Act / Assert
    with pytest.raises(BudgetExhaustedError, match="budget exhausted"):
        train_run(cfg, out_dir=tmp_path / "run", on_epoch=lambda stats, _m: epochs_run.append(stats.epoch))
    assert epochs_run == []
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert PrivacyLedger(ledger).sessions("orl-site") == []


def test_a_crash_during_private_training_leaves_the_spend_recorded(orl_root: Path, tmp_path: Path) -> None:
    from fedface.simulations.centralized import train_run

    ledger = tmp_path / "ledger.sqlite"
    cfg = _private_cfg(orl_root, ledger, epsilon=2.0, dataset="orl-site")

    def crash(_stats: object, _metrics: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, on_epoch=crash)

    sessions = PrivacyLedger(ledger).sessions("orl-site")
    assert len(sessions) == 1 and sessions[0].epsilon_after > 0
    assert math.isfinite(sessions[0].epsilon_after)


def test_private_training_noise_is_not_reproducible_from_the_saved_seed(orl_root: Path, tmp_path: Path) -> None:
    # The config's seed is saved with the checkpoint: noise drawn from it could be regenerated
    # and subtracted from the released weights, so two runs with one seed must differ.
    from fedface.simulations.centralized import train_run

    cfg = _private_cfg(orl_root, tmp_path / "ledger.sqlite", epsilon=8.0, dataset="orl-site").with_overrides({"training.epochs": 1})

    first = train_run(cfg).encoder
    second = train_run(cfg).encoder

    assert first is not None and second is not None
    assert not torch.equal(first.neck.project.weight, second.neck.project.weight)
