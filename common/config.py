"""Typed configuration: pydantic models read from kebab-case TOML.

The defaults are the measured baseline (``simulations/scenarios/baseline.toml`` spells them
out; docs/models.md says how they were chosen).

Every model forbids unknown keys (a typo fails loudly with the key's name) and is frozen. TOML
keys are kebab-case (``hidden-size``); Python fields are snake_case (``hidden_size``). Configs
hold paths, never key material or images.

A config file may hold any subset of the sections; missing ones take their defaults. CLI flags
override file values through :meth:`TrainConfig.with_overrides`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedface.common.errors import ConfigError


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Section(BaseModel):
    # NaN and infinity are refused everywhere (a NaN learning rate, an infinite clipping norm:
    # no clipping, no privacy) except where infinity means something: privacy.epsilon = inf is
    # "not private" (tests/unit/test_config_fuzz.py tries every float key).
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=_kebab,
        populate_by_name=True,
        allow_inf_nan=False,
    )

    def to_toml_dict(self) -> dict[str, Any]:
        """Kebab-case, TOML-serialisable form (None values dropped: TOML has no null)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class DataConfig(_Section):
    """Where the faces are and how they are prepared."""

    root: Path = Field(default=Path("../shared/data/orl"), description="face data directory")
    layout: Literal[
        "auto", "orl", "olivetti", "yale-a", "extended-yale-b", "jaffe", "fer2013", "expression-folder", "image-folder"
    ] = "auto"
    image_size: tuple[int, int] = Field(default=(64, 64), description="(height, width) in pixels")
    on_error: Literal["skip", "fail"] = "fail"
    crop: tuple[float, float, float, float] | None = Field(
        default=None,
        description="(top, left, bottom, right) fractions kept before resizing; none: the layout's own (JAFFE), else the whole image",
    )

    @model_validator(mode="after")
    def _check_size(self) -> DataConfig:
        h, w = self.image_size
        if h < 8 or w < 8:
            raise ValueError(f"data.image-size must be at least 8x8, got {h}x{w}")
        if self.crop is not None:
            top, left, bottom, right = self.crop
            if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1):
                raise ValueError(
                    f"data.crop must be [top, left, bottom, right] fractions with 0 <= top < bottom <= 1 and 0 <= left < right <= 1, got {list(self.crop)}"
                )
        return self


class SplitConfig(_Section):
    """How the images are divided into training and test parts."""

    kind: Literal["closed-set", "open-set"] = "closed-set"
    train_per_identity: int = Field(default=5, ge=1, description="closed set: training images per identity")
    test_identities: int = Field(default=10, ge=1, description="open set: identities held out for testing")
    folds: int = Field(
        default=0, ge=0, description="open set: deal the identities (subjects) into this many folds and test on fold `fold` (0: test-identities instead)"
    )
    fold: int = Field(default=0, ge=0, description="open set with folds: the fold held out (0 .. folds - 1)")
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check_fold(self) -> SplitConfig:
        if self.folds == 1:
            raise ValueError("split.folds must be 0 (off) or at least 2")
        if self.folds and self.fold >= self.folds:
            raise ValueError(f"split.fold must be below split.folds ({self.folds}), got {self.fold}")
        return self


class ModelConfig(_Section):
    """The GRU face encoder (see fedface.common.models.GRUFaceEncoder)."""

    passes: tuple[Literal["rows", "columns", "patches"], ...] = ("rows", "columns")
    hidden_size: int = Field(default=128, ge=1)
    num_layers: int = Field(default=1, ge=1, le=8)
    bidirectional: bool = True
    pooling: Literal["mean", "max", "meanmax", "last"] = "meanmax"
    patch_size: int = Field(default=8, ge=1)
    embedding_dim: int = Field(default=128, ge=2)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    downsample: int = Field(default=2, ge=1, le=8, description="average-pool the input by this factor first")
    stem: tuple[int, ...] = Field(
        default=(), description="channels of the convolutional stem's stages (empty: the GRUs read pixels); e.g. [32, 64, 128]"
    )

    @model_validator(mode="after")
    def _check_passes(self) -> ModelConfig:
        if not self.passes:
            raise ValueError("model.passes must name at least one of rows, columns, patches")
        if len(set(self.passes)) != len(self.passes):
            raise ValueError(f"model.passes has a repeated entry: {list(self.passes)}")
        if self.stem and "patches" in self.passes:
            raise ValueError("model.passes cannot include patches with a model.stem: the stem's feature map is read by rows and columns")
        if len(self.stem) > 5 or any(c < 1 or c > 1024 for c in self.stem):
            raise ValueError(f"model.stem must list at most 5 stages of 1..1024 channels, got {list(self.stem)}")
        return self


class HeadConfig(_Section):
    """The identity margin head: ``cos(m1*theta + m2) - m3``, scaled by ``scale``.

    ``kind = "cosface"`` uses ``margin`` as m3, ``"arcface"`` as m2; ``"combined"`` takes
    ``m1``, ``m2``, ``m3`` as given.
    """

    kind: Literal["cosface", "arcface", "combined"] = "cosface"
    scale: float = Field(default=20.0, gt=0)
    margin: float = Field(default=0.45, ge=0, lt=1.6)
    m1: float = Field(default=1.0, gt=0)
    m2: float = Field(default=0.0, ge=0)
    m3: float = Field(default=0.0, ge=0)

    def margins(self) -> tuple[float, float, float]:
        """The (m1, m2, m3) this head trains with."""
        if self.kind == "cosface":
            return (1.0, 0.0, self.margin)
        if self.kind == "arcface":
            return (1.0, self.margin, 0.0)
        return (self.m1, self.m2, self.m3)


class AugmentSection(_Section):
    """Training-time augmentation (fields of fedface.common.data.AugmentConfig)."""

    flip_p: float = Field(default=0.5, ge=0, le=1)
    max_rotate_deg: float = Field(default=10.0, ge=0, le=180)
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_translate: float = Field(default=0.08, ge=0, lt=0.5)
    brightness: float = Field(default=0.2, ge=0, le=1)
    contrast: float = Field(default=0.2, ge=0, lt=1)
    occlusion_p: float = Field(default=0.5, ge=0, le=1)
    occlusion_min: float = Field(default=0.15, gt=0, le=1)
    occlusion_max: float = Field(default=0.4, gt=0, le=1)
    band_p: float = Field(default=0.3, ge=0, le=1)

    @model_validator(mode="after")
    def _check_ranges(self) -> AugmentSection:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"augment.scale-range must be 0 < low <= high, got [{lo}, {hi}]")
        if self.occlusion_min > self.occlusion_max:
            raise ValueError(
                f"augment.occlusion-min ({self.occlusion_min}) must not exceed augment.occlusion-max ({self.occlusion_max})"
            )
        return self

    @property
    def active(self) -> bool:
        """Whether any augmentation is on (two draws of an image can differ)."""
        lo, hi = self.scale_range
        return any(v > 0 for v in (self.flip_p, self.max_rotate_deg, self.max_translate, self.brightness, self.contrast, self.occlusion_p, self.band_p)) or lo != hi


class TrainingConfig(_Section):
    """The optimisation of one training run."""

    task: Literal["identity", "expression"] = "identity"
    epochs: int = Field(default=300, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=5e-4, ge=0)
    warmup_fraction: float = Field(default=0.15, gt=0, lt=1, description="one-cycle warm-up share")
    seed: int = Field(default=0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(default=0, ge=0, description="CPU threads for torch; 0 keeps torch's default")
    eval_every: int = Field(default=5, ge=1, description="evaluate on the test part every N epochs (and at the end)")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="cross-entropy label smoothing (expressions)")
    ema_decay: float = Field(
        default=0.0, ge=0, lt=1,
        description="weight averaging: evaluate and save an exponential moving average of the weights, updated each step "
        "with this decay (0: off; centralized training only). Under DP-SGD it is post-processing: no privacy cost",
    )
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description=(
            "bf16: autocast the training passes to bfloat16 (about 2x faster on CPUs with AVX512-BF16); under DP-SGD only a "
            "frozen convolutional stem runs in bf16 (per-example gradients stay fp32); evaluation stays fp32"
        ),
    )
    init_from: Path | None = Field(
        default=None, description="start the encoder from this checkpoint's encoder (same model section), e.g. public pre-training"
    )


class EvaluationConfig(_Section):
    """How test metrics are computed."""

    flip_tta: bool = Field(default=True, description="average the embeddings of a face and its mirror image")
    shift_tta: int = Field(
        default=3, ge=0, le=16, description="also average copies shifted by this many pixels up/down/left/right (0: off)"
    )
    n_folds: int = Field(default=10, ge=2)
    occlusion_box: int = Field(default=20, ge=1, description="side of the blanked square, pixels at image-size")
    occlusion_placements: int = Field(default=5, ge=1, le=5)
    gallery_per_identity: int = Field(default=1, ge=1, description="open-set identification: gallery images per identity")


class PrivacyConfig(_Section):
    """Differentially private training (DP-SGD at the site); off unless ``epsilon`` or
    ``noise-multiplier`` is set (docs/privacy.md).

    ``epsilon`` is what this training may spend on its own: the noise is calibrated once for
    all its steps. The site's ledger composes it with everything the data set spent before and
    refuses the training if that would pass the data set's budget.
    """

    epsilon: float | None = Field(
        default=None, gt=0, allow_inf_nan=True, description="target epsilon of this training (none or inf: not private)"
    )
    noise_multiplier: float | None = Field(default=None, gt=0, description="fixed noise multiplier instead of a target epsilon")
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0, description="per-example gradient clipping norm")
    accountant: Literal["rdp", "prv"] = "rdp"
    secure_mode: bool = Field(default=False, description="OS randomness for sampling and noise seeds; seeds ignored")
    trainable: Literal["all", "gru", "neck"] = Field(
        default="all",
        description="all parameters; gru: all but the convolutional stem; neck: the embedding neck and head only (stem and GRUs frozen: fine-tuning)",
    )
    augment_multiplicity: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "augmentations of each example averaged before clipping (De et al. 2022): each example still gives one clipped "
            "gradient, so the privacy accounting is unchanged; a step costs about this many times more"
        ),
    )
    budget_epsilon: float | None = Field(
        default=None, gt=0, description="the data set's budget, set in the ledger when it has none (at this delta and accountant)"
    )
    ledger: Path | None = Field(default=None, description="privacy ledger file (default: $FEDFACE_LEDGER or ~/.fedface/privacy-ledger.sqlite)")
    dataset: str | None = Field(default=None, description="name of the data set in the ledger (default: the resolved data.root)")

    @model_validator(mode="after")
    def _check_one(self) -> PrivacyConfig:
        if self.epsilon is not None and self.noise_multiplier is not None and self.epsilon != float("inf"):
            raise ValueError("privacy.epsilon and privacy.noise-multiplier exclude each other: set one")
        return self

    @property
    def enabled(self) -> bool:
        """Whether training is private."""
        return self.noise_multiplier is not None or (self.epsilon is not None and self.epsilon != float("inf"))

    def to_toml_dict(self) -> dict[str, Any]:
        """As for every section, with an infinite epsilon (not private) dropped."""
        raw = super().to_toml_dict()
        if self.epsilon == float("inf"):
            raw.pop("epsilon", None)
        return raw


class FederationConfig(_Section):
    """A federated run (`fedface simulate`, `fedface server`): sites, rounds and aggregation.

    Sites are identity-disjoint by default (each holds its own people); the server holds out
    ``test-identities`` people for its own per-round evaluation. Each site trains with DP-SGD
    when ``privacy`` is enabled: ``privacy.epsilon`` is then each site's target for the whole
    planned run (noise calibrated once for rounds x local steps) and every round is charged to
    the site's ledger before its update leaves.
    """

    sites: int = Field(default=10, ge=1, description="sites (simulation: virtual SuperNodes)")
    rounds: int = Field(default=5, ge=1)
    identities_per_site: int | None = Field(default=None, ge=1, description="none: spread all training identities evenly")
    skew: float = Field(default=0.0, ge=0, lt=1, description="heterogeneity of images per identity (0: all images)")
    recurring: bool = Field(default=False, description="identities may recur across sites (images never do); for many sites")
    test_identities: int = Field(default=10, ge=1, description="identities held out for the server's evaluation")
    fraction_fit: float = Field(default=1.0, gt=0, le=1, description="share of sites sampled per round")
    min_sites: int = Field(default=2, ge=1, description="fewest sites a round needs")
    local_epochs: int = Field(default=1, ge=1, description="local epochs per round at each site")
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedavgm"] = "fedavg"
    proximal_mu: float = Field(default=0.01, ge=0, description="FedProx proximal term")
    server_lr: float = Field(default=0.01, gt=0, description="FedAdam server learning rate")
    server_momentum: float = Field(
        default=0.9, ge=0, lt=1, description="FedAvgM server momentum (its server step stays 1, as FedAvg's; Hsu et al. 2019)"
    )
    secagg: bool = Field(default=True, description="Flower SecAgg+: the server sees only the masked sum of updates")
    num_shares: int = Field(default=0, ge=0, description="SecAgg+ shares per site (0: all sampled sites, at most 10; else odd, above 2)")
    reconstruction_threshold: int = Field(default=0, ge=0, description="SecAgg+ shares needed to unmask (0: two thirds of the shares; else less than num-shares)")
    seed: int = Field(default=0, ge=0, description="seed of the partition and of site sampling")
    min_sites_per_aggregate: int = Field(
        default=3, ge=1, description="fewest site updates one aggregate may sum: a round with fewer is aborted before unmasking"
    )

    @model_validator(mode="after")
    def _check_secagg(self) -> FederationConfig:
        k, t = self.num_shares, self.reconstruction_threshold
        if k:
            # SecAgg+ pairs each site with (k - 1) / 2 neighbours on either side; Flower 1.42
            # sends an even count to the sites unchanged but builds the graph with k + 1, and
            # every round then aborts (measured)
            if k <= 2 or k % 2 == 0:
                raise ValueError(f"num-shares must be 0 (automatic) or an odd number above 2, got {k}")
            if k > self.sites:
                raise ValueError(f"num-shares ({k}) cannot exceed sites ({self.sites})")
        if t:
            if t < 2:
                raise ValueError(f"reconstruction-threshold must be 0 (automatic) or at least 2, got {t}")
            if t >= (k or min(self.sites, 10)):
                raise ValueError(f"reconstruction-threshold ({t}) must be less than the shares per site ({k or min(self.sites, 10)})")
        return self


class SitePolicyConfig(_Section):
    """A site's own privacy policy, enforced by the site before it trains or charges anything
    (``fedface.client.policy``; docs/privacy.md). The server may ask for less privacy loss than
    the policy allows, never more.

    A deployed site sets it in its own ``site.toml`` (``[policy]``; a lifetime budget is
    mandatory there) and ignores any policy in the scenario the server sends; simulated sites
    take the scenario's ``[site-policy]`` (no lifetime budget unless set: their spend is
    tracked and reported, not capped).
    """

    budget_epsilon: float | None = Field(
        default=None, gt=0, description="the site's lifetime budget per data set, over every run it joins (at delta)"
    )
    delta: float = Field(default=1e-5, gt=0, lt=1, description="the largest delta the site accepts; its budget is accounted at it")
    accountant: Literal["rdp", "prv"] = Field(default="rdp", description="how the site composes its spend (it ignores the server's)")
    epsilon_per_run: float | None = Field(default=None, gt=0, description="the most one run may spend (none: only the lifetime budget caps it)")
    require_secagg: bool = Field(default=True, description="refuse any training request that does not come through SecAgg+")
    min_peers: int = Field(
        default=3, ge=1, description="fewest sites (this one included) whose updates SecAgg+ may sum with this site's"
    )
    allow_non_private: bool = Field(default=False, description="train without DP-SGD when the server asks (nothing is charged)")

    @model_validator(mode="after")
    def _check_budget(self) -> SitePolicyConfig:
        for name, value in (("budget-epsilon", self.budget_epsilon), ("epsilon-per-run", self.epsilon_per_run)):
            if value is not None and value == float("inf"):
                raise ValueError(f"{name} must be finite (leave it out for no cap)")
        if self.budget_epsilon is not None and self.epsilon_per_run is not None and self.epsilon_per_run > self.budget_epsilon:
            raise ValueError(
                f"epsilon-per-run ({self.epsilon_per_run:g}) cannot exceed budget-epsilon ({self.budget_epsilon:g})"
            )
        return self


class TrainConfig(_Section):
    """Everything `fedface train` needs; the resolved form is saved in each run directory."""

    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    head: HeadConfig = HeadConfig()
    augment: AugmentSection = AugmentSection()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    federation: FederationConfig = FederationConfig()
    site_policy: SitePolicyConfig = SitePolicyConfig()

    def to_toml_dict(self) -> dict[str, Any]:
        """Kebab-case, TOML-serialisable form of every section."""
        raw = super().to_toml_dict()
        raw["privacy"] = self.privacy.to_toml_dict()
        return raw

    @model_validator(mode="after")
    def _check_cross(self) -> TrainConfig:
        # (without DP it has no effect: a non-private baseline of a private scenario keeps it)
        if self.privacy.augment_multiplicity > 1 and self.privacy.enabled and not self.augment.active:
            raise ValueError("privacy.augment-multiplicity > 1 needs augmentation: every [augment] strength is 0, so the copies would be identical")
        h, w = self.data.image_size
        d = self.model.downsample
        if h % d or w % d:
            raise ValueError(f"model.downsample {d} must divide data.image-size {h}x{w}")
        r = 2 ** len(self.model.stem)
        if (h // d) % r or (w // d) % r:
            raise ValueError(
                f"model.stem has {len(self.model.stem)} stages, each halving the sides: the image read, {h // d}x{w // d}, "
                f"must be divisible by {r}"
            )
        p = self.model.patch_size
        if "patches" in self.model.passes and ((h // d) % p or (w // d) % p):
            raise ValueError(
                f"model.patch-size {p} must divide the image size read by the encoder, {h // d}x{w // d} "
                f"(data.image-size {h}x{w} / model.downsample {d})"
            )
        if self.evaluation.occlusion_box > min(h, w):
            raise ValueError(
                f"evaluation.occlusion-box {self.evaluation.occlusion_box} exceeds data.image-size {h}x{w}"
            )
        return self

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """Read a TOML config file; raise ConfigError naming the file and every problem."""
        return cls.from_mapping(_read_toml(Path(path)), source=str(path))

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], *, source: str = "<config>") -> TrainConfig:
        """Validate a kebab-case mapping (parsed TOML)."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with dotted kebab-case keys replaced (``{"training.epochs": 5}``), revalidated."""
        raw = self.to_toml_dict()
        for dotted, value in overrides.items():
            if value is None:
                continue
            section, _, key = dotted.partition(".")
            raw.setdefault(section, {})[key] = value
        return TrainConfig.from_mapping(raw, source="command-line flags")


def format_validation_error(exc: ValidationError, source: str) -> str:
    """All of pydantic's problems on one line: ``key: message; key: message (source)``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; keys are kebab-case)"
        parts.append(f"{loc}: {msg}")
    return f"{'; '.join(parts)} ({source})"


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: pass the path of an existing TOML file")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None


__all__ = [
    "AugmentSection",
    "DataConfig",
    "EvaluationConfig",
    "FederationConfig",
    "HeadConfig",
    "ModelConfig",
    "PrivacyConfig",
    "SitePolicyConfig",
    "SplitConfig",
    "TrainConfig",
    "TrainingConfig",
    "format_validation_error",
]
