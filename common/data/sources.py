"""Load real face data sets from disk into a :class:`~fedface.common.data.faceset.FaceSet`.

Supported layouts (``layout=`` name, what the root directory holds):

``"orl"``
    ORL / AT&T Database of Faces: ``sN/M.pgm`` (identities ``s1`` .. ``s40``).
``"olivetti"``
    scikit-learn's Olivetti cache: the ``data_home`` directory holding ``olivetti_py3.pkz``
    (the name scikit-learn >= 0.20 writes; a bare ``olivetti.pkz`` is accepted too). The 400
    images of targets 0..39 are named ``s1`` .. ``s40``: the same people as ORL.
``"yale-a"``
    Yale Face Database: ``subjectNN.<condition>`` files, with or without a ``.gif`` extension.
``"extended-yale-b"``
    Extended Yale B, cropped: ``yaleBNN/yaleBNN_P00A+AAAE+EE.pgm``.
``"image-folder"``
    ``<identity>/<image>`` with png, jpg, jpeg, pgm, ppm, bmp, gif, tif, tiff or webp files.
``"expression-folder"``, ``"fer2013"``, ``"jaffe"``
    Facial-expression sets (FER2013, CK+, JAFFE): see :mod:`fedface.common.data.expressions`;
    labels are subjects and ``attributes["expression"]`` the expression.

Every image is decoded, converted to 8-bit grey (PIL ``convert("L")``), cropped when a crop
is given (or the layout has one: JAFFE), resized to ``size = (height, width)`` with a Lanczos
filter (the aspect ratio is not kept) and scaled to float32 in [0, 1].
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import numpy as np
from fedface.common.data.faceset import FaceSet, SkippedFile
from fedface.common.data.expressions import (
    LAYOUT_CROPS,
    list_expression_folder,
    list_fer2013,
    list_jaffe,
    looks_like_expression_folder,
    looks_like_fer2013,
    looks_like_jaffe,
    unknown_subject,
)
from fedface.common.data.files import IMAGE_EXTENSIONS, Entry, dir_has, is_image_name, natural_key, scan
from fedface.common.errors import (
    ConfigError,
    CorruptImageError,
    DataNotFoundError,
    UnknownLayoutError,
)
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "YALE_A_CONDITIONS",
    "Crop",
    "Layout",
    "detect_layout",
    "load_faces",
    "load_image",
]

logger = logging.getLogger(__name__)

Layout = Literal[
    "auto", "orl", "olivetti", "yale-a", "extended-yale-b", "jaffe", "fer2013", "expression-folder", "image-folder"
]
#: A crop box: (top, left, bottom, right) as fractions of the image's height and width.
Crop = tuple[float, float, float, float]
OnError = Literal["skip", "fail"]

#: Concrete layouts, in the order ``layout="auto"`` tries them.
LAYOUTS: tuple[str, ...] = (
    "olivetti", "yale-a", "extended-yale-b", "orl", "jaffe", "expression-folder", "fer2013", "image-folder"
)


#: The eleven Yale A conditions, as they appear in the file names.
YALE_A_CONDITIONS: tuple[str, ...] = (
    "centerlight",
    "glasses",
    "happy",
    "leftlight",
    "noglasses",
    "normal",
    "rightlight",
    "sad",
    "sleepy",
    "surprised",
    "wink",
)

_OLIVETTI_FILES = ("olivetti_py3.pkz", "olivetti.pkz")
_OLIVETTI_SHAPE = (400, 4096)
_OLIVETTI_SIDE = 64
_OLIVETTI_PER_IDENTITY = 10

_YALE_A_RE = re.compile(
    r"^(subject\d+)\.(" + "|".join(YALE_A_CONDITIONS) + r")(?:\.gif)?$", re.IGNORECASE
)
_YALEB_DIR_RE = re.compile(r"^yaleB\d+$")
_YALEB_FILE_RE = re.compile(r"^yaleB\d+_P\d+A([+-]\d+)E([+-]\d+)\.pgm$")
_ORL_DIR_RE = re.compile(r"^s\d+$")
_ORL_FILE_RE = re.compile(r"^\d+\.pgm$")

_EXPECTED = (
    "an Olivetti cache (olivetti_py3.pkz), Yale A files (subjectNN.<condition>[.gif]), "
    "Extended Yale B folders (yaleBNN/yaleBNN_P00A+AAAE+EE.pgm), ORL folders (sN/M.pgm), "
    "JAFFE files (KA.AN1.39.tiff), expression folders (<emotion>/<image>, or FER2013's "
    "<split>/<emotion>/<image>) or one folder of images per identity (ImageFolder: <identity>/<image>)"
)
_PATTERNS = {
    "orl": "ORL images (sN/M.pgm)",
    "yale-a": "Yale A images (subjectNN.<condition>[.gif])",
    "extended-yale-b": "Extended Yale B images (yaleBNN/yaleBNN_P00A+AAAE+EE.pgm)",
    "image-folder": "ImageFolder images (<identity>/<image>.png|jpg|pgm|...)",
    "jaffe": "JAFFE images (<subject>.<code><n>.<number>.tiff, codes AN DI FE HA NE SA SU)",
    "fer2013": "FER2013 images (train/<emotion>/<image>, emotions angry disgust fear happy neutral sad surprise)",
    "expression-folder": "expression images (<emotion>/<image>, emotions angry disgust fear happy neutral sad surprise)",
}

# Below this many files the thread pool costs more than it saves.
_MIN_FILES_FOR_POOL = 64
_MAX_WORKERS = 4
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)


class _Decoded(NamedTuple):
    """A decoded image (pixels and content digest) or the reason it could not be decoded."""

    pixels: np.ndarray | None
    digest: bytes
    error: str


# --------------------------------------------------------------------------------------------
# helpers


def _is_yaleb_name(name: str) -> bool:
    """Whether a file name follows ``yaleBNN_P00A+AAAE+EE.pgm``."""
    return _YALEB_FILE_RE.match(name) is not None


def _is_orl_name(name: str) -> bool:
    """Whether a file name follows ORL's ``M.pgm``."""
    return _ORL_FILE_RE.match(name) is not None


def _check_root(path: Path) -> None:
    """Raise :class:`DataNotFoundError` unless ``path`` is a directory or an Olivetti cache."""
    if not path.exists():
        raise DataNotFoundError(
            f"data directory {path} does not exist: pass the directory that holds the face "
            "images (e.g. ../shared/data/orl) or fix data.root"
        )
    if path.is_file() and path.name not in _OLIVETTI_FILES:
        raise DataNotFoundError(
            f"{path} is a file, not a directory: pass the directory that holds the face images"
        )


def _olivetti_cache(path: Path) -> Path | None:
    """The Olivetti cache file at or directly under ``path``, if there is one."""
    if path.is_file():
        return path if path.name in _OLIVETTI_FILES else None
    for name in _OLIVETTI_FILES:
        candidate = path / name
        if candidate.is_file():
            return candidate
    return None


def _one_line(text: str) -> str:
    """Collapse a message onto one line."""
    return " ".join(text.split())


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    """Validate ``size = (height, width)``."""
    ok = (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size
        )
    )
    if not ok:
        raise ConfigError(f"size must be (height, width) with two positive integers, got {size!r}")
    return int(size[0]), int(size[1])


# --------------------------------------------------------------------------------------------
# decoding


def _check_crop(crop: Crop | None) -> Crop | None:
    """Validate a crop box of fractions, 0 <= top < bottom <= 1 and 0 <= left < right <= 1."""
    if crop is None:
        return None
    ok = isinstance(crop, (tuple, list)) and len(crop) == 4 and all(isinstance(c, (int, float)) for c in crop)
    if not ok or not (0.0 <= crop[0] < crop[2] <= 1.0 and 0.0 <= crop[1] < crop[3] <= 1.0):
        raise ConfigError(
            f"crop must be (top, left, bottom, right) fractions with 0 <= top < bottom <= 1 and "
            f"0 <= left < right <= 1, got {crop!r}"
        )
    return (float(crop[0]), float(crop[1]), float(crop[2]), float(crop[3]))


def _preprocess(grey: Image.Image, size: tuple[int, int], crop: Crop | None = None) -> tuple[np.ndarray, bytes]:
    """Digest the decoded 8-bit grey pixels, then crop, resize to ``size`` and scale to [0, 1]."""
    width, height = grey.size
    digest = hashlib.blake2b(
        f"{width}x{height}:".encode() + grey.tobytes(), digest_size=16
    ).digest()
    if crop is not None and crop != (0.0, 0.0, 1.0, 1.0):
        top, left, bottom, right = crop
        box = (round(left * width), round(top * height), round(right * width), round(bottom * height))
        grey = grey.crop((box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1)))
    if grey.size != (size[1], size[0]):
        grey = grey.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    return pixels, digest


def _decode(path: Path, size: tuple[int, int], crop: Crop | None = None) -> _Decoded:
    """Read one image file; never raises for a bad file, returns the reason instead."""
    try:
        if path.stat().st_size == 0:
            return _Decoded(None, b"", "empty file (0 bytes)")
        with Image.open(path) as im:
            grey = im.convert("L")
    except UnidentifiedImageError:
        return _Decoded(None, b"", "not a recognised image format (corrupt header or not an image)")
    except _DECODE_ERRORS as exc:
        return _Decoded(None, b"", _one_line(f"{type(exc).__name__}: {exc}"))
    pixels, digest = _preprocess(grey, size, crop)
    return _Decoded(pixels, digest, "")


def load_image(path: str | Path, size: tuple[int, int] = (64, 64), crop: Crop | None = None) -> np.ndarray:
    """One image file, preprocessed exactly as :func:`load_faces` does: (H, W) float32 in [0, 1].

    Raises
    ------
    DataNotFoundError
        If ``path`` is not a file.
    CorruptImageError
        If it cannot be decoded (the reason is given).
    ConfigError
        If ``size`` is invalid.
    """
    p = Path(path)
    out_size = _check_size(size)
    box = _check_crop(crop)
    if not p.is_file():
        raise DataNotFoundError(f"image {p} not found" + (" (it is a directory)" if p.is_dir() else ""))
    decoded = _decode(p, out_size, box)
    if decoded.pixels is None:
        raise CorruptImageError(str(p), decoded.error)
    return decoded.pixels


def _decode_all(entries: Sequence[Entry], size: tuple[int, int], crop: Crop | None = None) -> list[_Decoded]:
    """Decode every entry, in order, on a small thread pool when there are many."""
    workers = min(_MAX_WORKERS, os.cpu_count() or 1)
    if len(entries) < _MIN_FILES_FOR_POOL or workers < 2:
        return [_decode(e.path, size, crop) for e in entries]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedface-load") as pool:
        return list(pool.map(lambda e: _decode(e.path, size, crop), entries))


# --------------------------------------------------------------------------------------------
# listers: root -> entries in a deterministic order (identity natural order, then file order)


def _list_orl(root: Path) -> list[Entry]:
    """ORL: ``sN/M.pgm``."""
    _, dirs = scan(root)
    entries: list[Entry] = []
    for name in dirs:
        if not _ORL_DIR_RE.match(name):
            continue
        files, _ = scan(root / name)
        entries.extend(Entry(root / name / f, name, ()) for f in files if _ORL_FILE_RE.match(f))
    return entries


def _list_yale_a(root: Path) -> list[Entry]:
    """Yale A: ``subjectNN.<condition>[.gif]`` directly under the root."""
    files, _ = scan(root)
    found: list[tuple[str, str, str]] = []
    for f in files:
        match = _YALE_A_RE.match(f)
        if match:
            found.append((match.group(1), match.group(2).lower(), f))
    found.sort(key=lambda t: (natural_key(t[0]), t[1], t[2]))
    return [Entry(root / f, subject, (("condition", cond),)) for subject, cond, f in found]


def _list_yaleb(root: Path) -> list[Entry]:
    """Extended Yale B cropped: ``yaleBNN/yaleBNN_P00A+AAAE+EE.pgm``; ambient shots left out."""
    _, dirs = scan(root)
    entries: list[Entry] = []
    ignored = 0
    for name in dirs:
        if not _YALEB_DIR_RE.match(name):
            continue
        files, _ = scan(root / name)
        for f in files:
            match = _YALEB_FILE_RE.match(f)
            if match:
                attrs = (("azimuth", match.group(1)), ("elevation", match.group(2)))
                entries.append(Entry(root / name / f, name, attrs))
            elif is_image_name(f):
                ignored += 1
    if ignored:
        logger.info(
            "ignored %d Extended Yale B images without azimuth/elevation in the name "
            "(e.g. *_Ambient.pgm) under %s",
            ignored,
            root,
        )
    return entries


def _list_image_folder(root: Path) -> list[Entry]:
    """ImageFolder: ``<identity>/<image>``, one level deep."""
    _, dirs = scan(root)
    entries: list[Entry] = []
    for name in dirs:
        files, _ = scan(root / name)
        entries.extend(Entry(root / name / f, name, ()) for f in files if is_image_name(f))
    return entries


_LISTERS: dict[str, Callable[[Path], list[Entry]]] = {
    "orl": _list_orl,
    "yale-a": _list_yale_a,
    "extended-yale-b": _list_yaleb,
    "image-folder": _list_image_folder,
    "jaffe": list_jaffe,
    "fer2013": list_fer2013,
    "expression-folder": list_expression_folder,
}


# --------------------------------------------------------------------------------------------
# public API


def detect_layout(root: str | Path) -> str:
    """Tell which supported layout a directory holds.

    Layouts are tried in the order of :data:`LAYOUTS`: olivetti, yale-a, extended-yale-b, orl,
    jaffe, expression-folder (every image folder named by an expression), fer2013 (split
    folders of expression folders), image-folder; the first that matches wins (an ORL tree is
    also a valid ImageFolder).

    Parameters
    ----------
    root : str or pathlib.Path
        The data directory (or, for Olivetti, the cache file itself).

    Returns
    -------
    str
        One of ``"olivetti"``, ``"yale-a"``, ``"extended-yale-b"``, ``"orl"``,
        ``"image-folder"``.

    Raises
    ------
    DataNotFoundError
        If ``root`` does not exist, is a plain file, or holds no images at all.
    UnknownLayoutError
        If ``root`` holds images but in none of the supported layouts.
    """
    path = Path(root)
    _check_root(path)
    if _olivetti_cache(path) is not None:
        return "olivetti"
    files, dirs = scan(path)
    if any(_YALE_A_RE.match(f) for f in files):
        return "yale-a"
    if any(_YALEB_DIR_RE.match(d) and dir_has(path / d, _is_yaleb_name) for d in dirs):
        return "extended-yale-b"
    if any(_ORL_DIR_RE.match(d) and dir_has(path / d, _is_orl_name) for d in dirs):
        return "orl"
    if looks_like_jaffe(path):
        return "jaffe"
    if looks_like_expression_folder(path):
        return "expression-folder"
    if looks_like_fer2013(path):
        return "fer2013"
    if any(dir_has(path / d, is_image_name) for d in dirs):
        return "image-folder"
    loose = sum(1 for f in files if is_image_name(f))
    if loose:
        raise UnknownLayoutError(
            f"cannot tell the layout of {path}: found {loose} image files directly in it and no "
            f"per-identity folders; expected {_EXPECTED}"
        )
    raise DataNotFoundError(
        f"{path} holds no face images ({len(files)} other files, {len(dirs)} folders without "
        f"images): expected {_EXPECTED}"
    )


def load_faces(
    root: str | Path,
    *,
    layout: Layout = "auto",
    size: tuple[int, int] = (64, 64),
    on_error: OnError = "fail",
    crop: Crop | None = None,
) -> FaceSet:
    """Load, decode and preprocess a face data set.

    Parameters
    ----------
    root : str or pathlib.Path
        The data directory (see the module docstring for the layouts).
    layout : str, default "auto"
        How to read ``root``: ``"orl"``, ``"olivetti"``, ``"yale-a"``, ``"extended-yale-b"``,
        ``"image-folder"``, or ``"auto"`` to call :func:`detect_layout`.
    size : tuple of int, default (64, 64)
        Output (height, width) in pixels. Images are resized without cropping.
    crop : tuple of 4 floats, optional
        (top, left, bottom, right) fractions of each image to keep before resizing (LFW's
        aligned 250x250: ``(0.26, 0.26, 0.74, 0.74)``, the central 120 pixels). Default: the
        layout's own crop (:data:`~fedface.common.data.expressions.LAYOUT_CROPS`: JAFFE), else
        none; ``(0, 0, 1, 1)`` keeps the whole image.
    on_error : {"skip", "fail"}, default "fail"
        What to do with a file that cannot be decoded (truncated, empty, not an image):
        ``"fail"`` raises :class:`CorruptImageError`; ``"skip"`` logs a warning, records the
        file in ``FaceSet.skipped`` and goes on. An identity left without images is dropped.
        The Olivetti cache is one file: a bad cache always raises.

    Returns
    -------
    FaceSet
        Images (N, H, W) float32 in [0, 1], labels 0..K-1 over the identities in natural name
        order, sources (file paths, or ``"olivetti:<index>"``), duplicate groups (hash of the
        decoded 8-bit pixels before resizing) and the layout's attributes.

    Raises
    ------
    DataNotFoundError
        If ``root`` is missing or holds no (readable) images of the layout.
    UnknownLayoutError
        If ``layout`` is not a known name, or ``"auto"`` cannot tell the layout.
    CorruptImageError
        With ``on_error="fail"``, for the first file (in load order) that cannot be decoded;
        always for an unreadable Olivetti cache.
    ConfigError
        If ``size`` or ``on_error`` is invalid.

    Notes
    -----
    The Olivetti cache is a joblib pickle: loading it runs code chosen by whoever wrote it.
    Point ``root`` only at caches you trust, as with scikit-learn itself.
    """
    path = Path(root)
    out_size = _check_size(size)
    box = _check_crop(crop)
    if on_error not in get_args(OnError):
        raise ConfigError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    if layout not in get_args(Layout):
        raise UnknownLayoutError(
            f"unknown layout {layout!r}: expected one of {', '.join(get_args(Layout))}"
        )
    if layout == "auto":
        resolved = detect_layout(path)
    else:
        _check_root(path)
        resolved = layout
    if resolved == "olivetti":
        faces = _load_olivetti(path, out_size, box)
    else:
        faces = _load_files(path, resolved, out_size, on_error, box if box is not None else LAYOUT_CROPS.get(resolved))
    logger.info(
        "loaded %d images of %d identities from %s (layout %s, size %dx%d, %d skipped)",
        len(faces),
        faces.num_identities,
        path,
        resolved,
        out_size[0],
        out_size[1],
        len(faces.skipped),
    )
    return faces


def _load_files(root: Path, layout: str, size: tuple[int, int], on_error: OnError, crop: Crop | None) -> FaceSet:
    """Load one of the file-per-image layouts."""
    if root.is_file():
        raise DataNotFoundError(f"{root} is a file: layout {layout!r} needs a directory")
    entries = _LISTERS[layout](root)
    if not entries:
        raise DataNotFoundError(f"no {_PATTERNS[layout]} found under {root}")
    decoded = _decode_all(entries, size, crop)

    kept: list[tuple[Entry, _Decoded]] = []
    skipped: list[SkippedFile] = []
    for entry, result in zip(entries, decoded, strict=True):
        if result.pixels is not None:
            kept.append((entry, result))
            continue
        if on_error == "fail":
            raise CorruptImageError(str(entry.path), result.error)
        logger.warning("skipping unreadable image %s: %s", entry.path, result.error)
        skipped.append(SkippedFile(str(entry.path), result.error))
    if not kept:
        raise DataNotFoundError(
            f"no readable {_PATTERNS[layout]} under {root}: all {len(entries)} files failed to "
            "decode (see FaceSet.skipped or the warnings above)"
        )

    if any(not e.identity for e, _ in kept):
        # no subject in the name (FER2013): each image its own, pixel-identical copies one together
        first_of: dict[bytes, str] = {}
        kept = [
            (e if e.identity else e._replace(identity=first_of.setdefault(d.digest, unknown_subject(e))), d) for e, d in kept
        ]
    names = sorted({e.identity for e, _ in kept}, key=natural_key)
    named = {e.identity for e in entries if e.identity}
    dropped = len(named) - len(named & set(names))
    if dropped:
        logger.warning("dropped %d identities left without readable images under %s", dropped, root)
    index = {name: i for i, name in enumerate(names)}
    attr_keys = [k for k, _ in kept[0][0].attrs]
    return _assemble(
        images=np.stack([d.pixels for _, d in kept if d.pixels is not None]),
        labels=[index[e.identity] for e, _ in kept],
        names=tuple(names),
        sources=tuple(str(e.path) for e, _ in kept),
        digests=[d.digest for _, d in kept],
        attributes={k: tuple(dict(e.attrs)[k] for e, _ in kept) for k in attr_keys},
        skipped=tuple(skipped),
        layout=layout,
    )


def _assemble(
    *,
    images: np.ndarray,
    labels: Sequence[int],
    names: tuple[str, ...],
    sources: tuple[str, ...],
    digests: Sequence[bytes],
    attributes: dict[str, tuple[str, ...]],
    skipped: tuple[SkippedFile, ...],
    layout: str,
) -> FaceSet:
    """Build the FaceSet, numbering duplicate groups by first appearance."""
    group_of: dict[bytes, int] = {}
    groups = np.array([group_of.setdefault(d, len(group_of)) for d in digests], dtype=np.int64)
    label_arr = np.asarray(labels, dtype=np.int64)
    duplicates = len(groups) - len(group_of)
    if duplicates:
        counts = np.bincount(groups)
        multi = np.flatnonzero(counts > 1)
        spanning = sum(1 for g in multi if len(np.unique(label_arr[groups == g])) > 1)
        logger.info(
            "found %d groups of pixel-identical images (%d images) under layout %s",
            len(multi),
            int(counts[multi].sum()),
            layout,
        )
        if spanning:
            logger.warning(
                "%d groups of pixel-identical images span more than one identity: "
                "check the data for mislabelled copies",
                spanning,
            )
    return FaceSet(
        images=np.ascontiguousarray(images, dtype=np.float32),
        labels=label_arr,
        identity_names=names,
        sources=sources,
        groups=groups,
        attributes=attributes,
        skipped=skipped,
        layout=layout,
    )


def _load_olivetti(root: Path, size: tuple[int, int], crop: Crop | None = None) -> FaceSet:
    """Read scikit-learn's Olivetti cache exactly as ``fetch_olivetti_faces`` does."""
    cache = _olivetti_cache(root)
    if cache is None:
        raise DataNotFoundError(
            f"no scikit-learn Olivetti cache ({' or '.join(_OLIVETTI_FILES)}) in {root}: run "
            "sklearn.datasets.fetch_olivetti_faces(data_home=...) once and pass that data_home"
        )
    # scikit-learn's own dependency; imported here to keep the module import light
    import joblib  # type: ignore[import-untyped]

    try:
        raw = joblib.load(cache)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable cache
        raise CorruptImageError(str(cache), _one_line(f"{type(exc).__name__}: {exc}")) from exc
    array = np.asarray(raw)
    if array.shape != _OLIVETTI_SHAPE or not np.issubdtype(array.dtype, np.number):
        raise CorruptImageError(
            str(cache),
            f"expected a numeric {_OLIVETTI_SHAPE} array as scikit-learn writes it, "
            f"found {array.dtype} {array.shape}",
        )
    # Same normalisation and orientation as sklearn.datasets.fetch_olivetti_faces.
    faces = array.astype(np.float32)
    faces -= faces.min()
    peak = faces.max()
    if peak > 0:
        faces /= peak
    side = _OLIVETTI_SIDE
    faces = faces.reshape((_OLIVETTI_SHAPE[0], side, side)).transpose(0, 2, 1)
    grey = np.rint(faces * 255.0).astype(np.uint8)
    processed = [_preprocess(Image.fromarray(np.ascontiguousarray(img)), size, crop) for img in grey]
    n = _OLIVETTI_SHAPE[0]
    return _assemble(
        images=np.stack([p for p, _ in processed]),
        labels=[i // _OLIVETTI_PER_IDENTITY for i in range(n)],
        names=tuple(f"s{k + 1}" for k in range(n // _OLIVETTI_PER_IDENTITY)),
        sources=tuple(f"olivetti:{i}" for i in range(n)),
        digests=[d for _, d in processed],
        attributes={},
        skipped=(),
        layout="olivetti",
    )
