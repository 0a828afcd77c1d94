"""Batched image tensors, training-time augmentation and deterministic occlusion.

Everything here works on whole batches of shape (N, C, H, W) (C = 1 for the grey faces of
:func:`~fedface.common.data.sources.load_faces`), on whatever device the batch is on, with
one vectorised pass per step: no Python loop over the images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from fedface.common.errors import ConfigError

__all__ = [
    "OCCLUSION_PLACEMENTS",
    "AugmentConfig",
    "augment",
    "occlude",
    "occlusion_boxes",
    "to_tensor",
]

#: Named occluder centres as (row, column) fractions of the image, in the order
#: :func:`occlusion_boxes` returns them. Measured on the mean 64x64 ORL and Extended Yale B
#: faces: at 64x64 the centres fall on pixel (24, 20), (24, 44), (36, 32), (48, 32), (32, 32).
#: "left eye" is the eye on the left of the image (the subject's right eye).
OCCLUSION_PLACEMENTS: tuple[tuple[str, float, float], ...] = (
    ("left-eye", 0.375, 0.3125),
    ("right-eye", 0.375, 0.6875),
    ("nose", 0.5625, 0.5),
    ("mouth", 0.75, 0.5),
    ("centre", 0.5, 0.5),
)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """Turn a (N, H, W) image array into a (N, 1, H, W) float32 tensor.

    Parameters
    ----------
    images : numpy.ndarray
        Images of shape (N, H, W), e.g. ``FaceSet.images``.

    Returns
    -------
    torch.Tensor
        float32 tensor of shape (N, 1, H, W) on the CPU. It shares memory with ``images``
        when that is already a writable, contiguous float32 array.

    Raises
    ------
    ValueError
        If ``images`` is not three-dimensional.
    """
    array = np.ascontiguousarray(images, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"to_tensor expects images of shape (N, H, W), got {array.shape}")
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).unsqueeze(1)


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of the training-time augmentations applied by :func:`augment`.

    Parameters
    ----------
    flip_p : float, default 0.5
        Probability of a horizontal flip, in [0, 1].
    max_rotate_deg : float, default 10.0
        Rotation drawn uniformly from [-max_rotate_deg, +max_rotate_deg] degrees.
    scale_range : tuple of float, default (0.9, 1.1)
        Zoom factor drawn uniformly from this range (> 1 enlarges the face).
    max_translate : float, default 0.08
        Shift along each axis drawn uniformly from +-max_translate, as a fraction of the
        image side.
    brightness : float, default 0.2
        Additive brightness jitter drawn uniformly from +-brightness (pixel values in [0, 1]).
    contrast : float, default 0.2
        Contrast factor drawn uniformly from 1 +- contrast, applied around each image's mean.
    occlusion_p : float, default 0.5
        Probability that an image gets one occluder, in [0, 1].
    occlusion_min, occlusion_max : float, default 0.15, 0.4
        Occluder side drawn uniformly from [occlusion_min, occlusion_max] times the image side
        (height and width drawn independently), 0 < min <= max <= 1.
    band_p : float, default 0.3
        Among occluded images, the probability that the occluder is a full-width horizontal or
        full-height vertical band (equally likely) rather than a box, in [0, 1].

    Raises
    ------
    ConfigError
        If a value lies outside its range. All problems are reported together.
    """

    flip_p: float = 0.5
    max_rotate_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_translate: float = 0.08
    brightness: float = 0.2
    contrast: float = 0.2
    occlusion_p: float = 0.5
    occlusion_min: float = 0.15
    occlusion_max: float = 0.4
    band_p: float = 0.3

    def __post_init__(self) -> None:
        """Check every range; report all problems at once."""
        problems: list[str] = []
        for name in ("flip_p", "occlusion_p", "band_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {value}")
        for name in ("max_rotate_deg", "max_translate", "brightness"):
            value = getattr(self, name)
            if not (value >= 0.0 and math.isfinite(value)):
                problems.append(f"{name} must be a finite number >= 0, got {value}")
        if not 0.0 <= self.contrast < 1.0:
            problems.append(f"contrast must be in [0, 1), got {self.contrast}")
        if len(self.scale_range) != 2 or not 0.0 < self.scale_range[0] <= self.scale_range[1]:
            problems.append(
                f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}"
            )
        if not 0.0 < self.occlusion_min <= self.occlusion_max <= 1.0:
            problems.append(
                "occlusion_min and occlusion_max must satisfy 0 < min <= max <= 1, "
                f"got {self.occlusion_min} and {self.occlusion_max}"
            )
        if problems:
            raise ConfigError("invalid augmentation: " + "; ".join(problems))

    @property
    def is_geometric(self) -> bool:
        """Whether any flip, rotation, zoom or shift can happen."""
        return (
            self.flip_p > 0.0
            or self.max_rotate_deg > 0.0
            or self.scale_range != (1.0, 1.0)
            or self.max_translate > 0.0
        )


def _uniform(
    shape: tuple[int, ...],
    low: float,
    high: float,
    *,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Uniform draws on the generator's device, moved to ``device``."""
    source = generator.device if generator is not None else device
    draws = torch.rand(shape, generator=generator, device=source, dtype=torch.float32)
    return (low + (high - low) * draws).to(device)


def _affine(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One batched flip + rotation + zoom + shift with border padding."""
    n, _, height, width = x.shape
    device = x.device
    angle = _uniform((n,), -1.0, 1.0, generator=generator, device=device) * math.radians(
        cfg.max_rotate_deg
    )
    scale = _uniform(
        (n,), cfg.scale_range[0], cfg.scale_range[1], generator=generator, device=device
    )
    shift = _uniform((n, 2), -1.0, 1.0, generator=generator, device=device) * (
        2.0 * cfg.max_translate
    )
    flip = _uniform((n,), 0.0, 1.0, generator=generator, device=device) < cfg.flip_p
    sign = 1.0 - 2.0 * flip.to(torch.float32)
    # theta maps output to input coordinates in [-1, 1]; rotating in pixel space on a
    # non-square grid needs the aspect correction h/w, w/h. The flip negates the input x axis,
    # which with align_corners=False maps pixel centres exactly onto their mirror images.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros((n, 2, 3), dtype=torch.float32, device=device)
    theta[:, 0, 0] = cos * sign
    theta[:, 0, 1] = -sin * (height / width) * sign
    theta[:, 1, 0] = sin * (width / height)
    theta[:, 1, 1] = cos
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _occlusion_mask(
    shape: tuple[int, int, int],
    cfg: AugmentConfig,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean (N, H, W) mask, True inside each image's occluder (if it has one)."""
    n, height, width = shape

    def draw(*dims: int) -> torch.Tensor:
        return _uniform(dims, 0.0, 1.0, generator=generator, device=device)

    has = draw(n) < cfg.occlusion_p
    is_band = draw(n) < cfg.band_p
    horizontal = draw(n) < 0.5
    span = cfg.occlusion_min + (cfg.occlusion_max - cfg.occlusion_min) * draw(n, 2)
    box_h = torch.clamp(torch.round(span[:, 0] * height), 1, height).long()
    box_w = torch.clamp(torch.round(span[:, 1] * width), 1, width).long()
    box_w = torch.where(is_band & horizontal, torch.full_like(box_w, width), box_w)
    box_h = torch.where(is_band & ~horizontal, torch.full_like(box_h, height), box_h)
    where = draw(n, 2)
    top = torch.floor(where[:, 0] * (height - box_h + 1).to(torch.float32)).long()
    left = torch.floor(where[:, 1] * (width - box_w + 1).to(torch.float32)).long()
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < (top + box_h)[:, None])
    in_cols = (cols[None, :] >= left[:, None]) & (cols[None, :] < (left + box_w)[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :] & has[:, None, None]


def augment(
    x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Randomly flip, rotate, zoom, shift, jitter and occlude a batch of images.

    Steps, each vectorised over the batch: (1) one affine warp per image through
    ``F.affine_grid``/``F.grid_sample`` (bilinear, border padding) combining the horizontal
    flip, rotation, zoom and shift; (2) contrast around each image's mean, then additive
    brightness; (3) with probability ``occlusion_p`` one occluder per image, a box or a
    full-width/height band, filled with 0 (black: like sunglasses or a scarf, and the same
    fill as :func:`occlude` uses for the occlusion benchmark); (4) clamp to [0, 1].

    Parameters
    ----------
    x : torch.Tensor
        Batch of shape (N, C, H, W), floating point, values in [0, 1]. Not modified.
    cfg : AugmentConfig
        Augmentation strengths.
    generator : torch.Generator, optional
        Source of randomness; pass a seeded one for reproducible output. It may live on a
        different device from ``x``. Default: torch's global generator.

    Returns
    -------
    torch.Tensor
        A new tensor of the same shape, dtype and device, values in [0, 1]. No gradient is
        tracked.

    Raises
    ------
    ValueError
        If ``x`` is not a 4-D floating-point tensor.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(
            f"augment expects a float tensor of shape (N, C, H, W), got {x.dtype} {tuple(x.shape)}"
        )
    n, _, height, width = x.shape
    device = x.device
    with torch.no_grad():
        out = _affine(x, cfg, generator) if cfg.is_geometric else x.clone()
        if cfg.contrast > 0.0 or cfg.brightness > 0.0:
            factor = _uniform(
                (n, 1, 1, 1),
                1.0 - cfg.contrast,
                1.0 + cfg.contrast,
                generator=generator,
                device=device,
            )
            offset = _uniform(
                (n, 1, 1, 1), -cfg.brightness, cfg.brightness, generator=generator, device=device
            )
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out = (out - mean) * factor.to(out.dtype) + mean + offset.to(out.dtype)
        if cfg.occlusion_p > 0.0:
            mask = _occlusion_mask((n, height, width), cfg, generator, device)
            out = out.masked_fill(mask[:, None, :, :], 0.0)
        return out.clamp_(0.0, 1.0)


def occlude(x: torch.Tensor, box: tuple[int, int, int, int], value: float = 0.0) -> torch.Tensor:
    """Blank one rectangle in every image of a batch.

    Parameters
    ----------
    x : torch.Tensor
        Images of shape (..., H, W), e.g. (N, 1, H, W). Not modified.
    box : tuple of int
        (top, left, height, width) in pixels; must lie inside the image.
    value : float, default 0.0
        Fill value (0 is black).

    Returns
    -------
    torch.Tensor
        A copy of ``x`` with ``x[..., top:top+height, left:left+width] = value``.

    Raises
    ------
    ValueError
        If the box is empty or reaches outside the image.
    """
    if x.ndim < 2:
        raise ValueError(f"occlude expects images of shape (..., H, W), got {tuple(x.shape)}")
    top, left, box_h, box_w = (int(v) for v in box)
    height, width = int(x.shape[-2]), int(x.shape[-1])
    if (
        box_h <= 0
        or box_w <= 0
        or top < 0
        or left < 0
        or top + box_h > height
        or left + box_w > width
    ):
        raise ValueError(
            f"occlusion box (top={top}, left={left}, height={box_h}, width={box_w}) must be "
            f"non-empty and inside the {height}x{width} image"
        )
    out = x.clone()
    out[..., top : top + box_h, left : left + box_w] = value
    return out


def occlusion_boxes(
    size: tuple[int, int], box: int = 20, placements: int = 5
) -> list[tuple[int, int, int, int]]:
    """Deterministic square occluders over the face for the occlusion-robustness benchmark.

    The boxes are centred, in this order, on the image-left eye, the image-right eye, the
    nose, the mouth and the image centre (see :data:`OCCLUSION_PLACEMENTS`); centres scale with
    ``size`` and boxes are shifted inwards where they would cross the border. For 64x64 and
    ``box=20`` they are (14, 10), (14, 34), (26, 22), (38, 22) and (22, 22) as (top, left).

    Parameters
    ----------
    size : tuple of int
        Image (height, width) in pixels.
    box : int, default 20
        Side of the square occluder in pixels of the image of ``size``.
    placements : int, default 5
        How many of the placements to return (the first ones in the order above), 1..5.

    Returns
    -------
    list of tuple of int
        ``(top, left, height, width)`` per placement, each inside the image.

    Raises
    ------
    ValueError
        If ``box`` does not fit the image or ``placements`` is outside 1..5.

    Examples
    --------
    >>> occlusion_boxes((64, 64), box=20, placements=2)
    [(14, 10, 20, 20), (14, 34, 20, 20)]
    """
    height, width = int(size[0]), int(size[1])
    if not 0 < box <= min(height, width):
        raise ValueError(
            f"occlusion box side must be in 1..{min(height, width)} for a {height}x{width} "
            f"image, got {box}"
        )
    if not 1 <= placements <= len(OCCLUSION_PLACEMENTS):
        raise ValueError(f"placements must be in 1..{len(OCCLUSION_PLACEMENTS)}, got {placements}")
    boxes: list[tuple[int, int, int, int]] = []
    for _, row, col in OCCLUSION_PLACEMENTS[:placements]:
        top = min(max(math.floor(row * height - box / 2 + 0.5), 0), height - box)
        left = min(max(math.floor(col * width - box / 2 + 0.5), 0), width - box)
        boxes.append((top, left, box, box))
    return boxes
