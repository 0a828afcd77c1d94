"""Facial-expression data sets: one label vocabulary, their layouts, and their crops.

Every expression data set is read into a :class:`~fedface.common.data.faceset.FaceSet`
whose labels are the **subjects** (so that splits can hold people out) and whose
``attributes["expression"]`` holds each image's expression, named in the shared vocabulary
:data:`EXPRESSION_CLASSES` (FER2013's seven classes). A model's class index ``k`` is always
``EXPRESSION_CLASSES[k]``, whatever data set it was trained on, so a model trained on FER2013
is evaluated on CK+ or JAFFE as it is.

Layouts (``layout=`` name, what the root holds):

``"expression-folder"``
    ``<emotion>/<image>``: FER2013's ``train/`` folder, CK+ 48x48 (``anger``, ``sadness``,
    ...), or any folder named by expressions (the names and their synonyms in
    :data:`EXPRESSION_ALIASES`). The subject is read from CK+ file names
    (``S010_004_00000017.png``: subject ``S010``); other files are each their own subject
    (FER2013 does not say who is who), except that pixel-identical copies (FER2013 train has
    1,035 groups of them, 2,271 images) are one subject, so a split never puts a copy of a test
    image into training.
``"fer2013"``
    FER2013's release: ``<split>/<emotion>/<image>``. Only ``train/`` is read (``attributes
    ["part"]``), so a copy that also holds ``test/`` never deals its test images into training
    folds; point ``--data`` at ``test/`` itself (an expression folder) to evaluate on it.
``"jaffe"``
    JAFFE: ``KA.AN1.39.tiff`` files directly in the root (subject ``KA``, expression code
    ``AN``, AN DI FE HA NE SA SU).

CK+'s **contempt** is not one of FER2013's seven classes: those images (18 sequences, 54
frames in CK+48) are left out, and the loader logs how many. That keeps one 7-class
vocabulary across data sets, at the cost of CK+'s eighth expression (docs/data.md).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from fedface.common.data.faceset import FaceSet
from fedface.common.data.files import Entry, dir_has, is_image_name, natural_key, scan
from fedface.common.errors import ConfigError

__all__ = [
    "EXPRESSIONS",
    "EXPRESSION_ALIASES",
    "EXPRESSION_CLASSES",
    "EXPRESSION_LAYOUTS",
    "FER2013_PART",
    "JAFFE_CODES",
    "LAYOUT_CROPS",
    "canonical_expression",
    "expression_classes",
    "expression_labels",
    "list_expression_folder",
    "list_fer2013",
    "list_jaffe",
    "looks_like_expression_folder",
    "looks_like_fer2013",
    "looks_like_jaffe",
    "unknown_subject",
]

logger = logging.getLogger(__name__)

#: The shared expression vocabulary, in class-index order (FER2013's classes).
EXPRESSION_CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")

#: Folder names (lower case) that name an expression, mapped to the vocabulary; None: a known
#: expression outside it (left out with a log line).
EXPRESSION_ALIASES: dict[str, str | None] = {
    **{name: name for name in EXPRESSION_CLASSES},
    "anger": "angry",
    "disgusted": "disgust",
    "fearful": "fear",
    "afraid": "fear",
    "happiness": "happy",
    "joy": "happy",
    "sadness": "sad",
    "surprised": "surprise",
    "contempt": None,
}

#: JAFFE's expression codes (the second part of a file name).
JAFFE_CODES: dict[str, str] = {
    "AN": "angry",
    "DI": "disgust",
    "FE": "fear",
    "HA": "happy",
    "NE": "neutral",
    "SA": "sad",
    "SU": "surprise",
}

#: The crop (top, left, bottom, right as fractions of the image) a layout applies before
#: resizing when ``data.crop`` is not set: JAFFE's 256x256 photographs show the head and
#: shoulders; this box keeps brows to chin, as FER2013's and CK+'s crops do (measured on
#: the mean JAFFE face).
LAYOUT_CROPS: dict[str, tuple[float, float, float, float]] = {"jaffe": (0.28, 0.23, 0.88, 0.77)}

#: The layouts this module lists.
EXPRESSION_LAYOUTS: tuple[str, ...] = ("jaffe", "fer2013", "expression-folder")

_JAFFE_RE = re.compile(r"^([A-Z]{2})\.([A-Z]{2})\d*\.\d+\.tiff?$", re.IGNORECASE)
_CKPLUS_RE = re.compile(r"^(S\d{3})_\d{3}_\d+", re.IGNORECASE)


#: Yale A's conditions that are facial expressions (the others are lighting and glasses): Yale
#: A's own six-class vocabulary.
EXPRESSIONS: tuple[str, ...] = ("happy", "normal", "sad", "sleepy", "surprised", "wink")


def expression_classes(faces: FaceSet) -> tuple[str, ...]:
    """The expression vocabulary of a data set: the shared seven classes
    (:data:`~fedface.common.data.expressions.EXPRESSION_CLASSES`) for the expression layouts,
    Yale A's own six (:data:`EXPRESSIONS`) for Yale A."""
    if "expression" in faces.attributes:
        return EXPRESSION_CLASSES
    if "condition" in faces.attributes:
        return EXPRESSIONS
    raise ConfigError(
        f"training.task = 'expression' needs faces labelled with expressions (FER2013, CK+ or any <emotion>/<image> "
        f"folder, JAFFE, Yale A); the {faces.layout or 'loaded'} data at data.root has none: point --data at one of those"
    )


def expression_labels(faces: FaceSet, classes: tuple[str, ...] | None = None) -> tuple[FaceSet, np.ndarray]:
    """The images whose expression is one of ``classes`` (default: the data set's own
    vocabulary), and their class indices in ``classes``."""
    names = classes if classes is not None else expression_classes(faces)
    values = faces.attributes.get("expression") or faces.attributes.get("condition")
    if values is None:
        expression_classes(faces)  # raises the explanation
        raise AssertionError("unreachable")
    keep = np.array([v in names for v in values], dtype=bool)
    if not keep.any():
        raise ConfigError(
            f"none of the {len(values)} images at data.root shows an expression this model knows ({', '.join(names)})"
        )
    subset = faces.subset(np.flatnonzero(keep))
    key = "expression" if "expression" in faces.attributes else "condition"
    labels = np.array([names.index(v) for v in subset.attributes[key]], dtype=np.int64)
    return subset, labels


def canonical_expression(name: str) -> str | None:
    """The vocabulary's name for an expression folder name, or None outside the vocabulary.

    Raises
    ------
    KeyError
        If ``name`` names no known expression.
    """
    return EXPRESSION_ALIASES[name.strip().lower()]


def _expression_dirs(dirs: list[str]) -> list[str]:
    return [d for d in dirs if d.strip().lower() in EXPRESSION_ALIASES]


def looks_like_jaffe(root: Path) -> bool:
    """Whether ``root`` directly holds JAFFE-named files."""
    return dir_has(root, lambda n: _JAFFE_RE.match(n) is not None)


def looks_like_expression_folder(root: Path) -> bool:
    """Whether every (and at least one) image folder under ``root`` is named by an expression."""
    _, dirs = scan(root)
    with_images = [d for d in dirs if dir_has(root / d, is_image_name)]
    return bool(with_images) and len(_expression_dirs(with_images)) == len(with_images)


def looks_like_fer2013(root: Path) -> bool:
    """Whether ``root`` holds split folders that are each an expression folder."""
    _, dirs = scan(root)
    return bool(dirs) and any(looks_like_expression_folder(root / d) for d in dirs)


def _skip_outside(counts: dict[str, int], root: Path) -> None:
    for name, n in counts.items():
        if n:
            logger.info(
                "left out %d %r images under %s: %r is not one of the shared expression classes (%s)",
                n,
                name,
                root,
                name,
                ", ".join(EXPRESSION_CLASSES),
            )


def _subject(file: str) -> str:
    """CK+ names say the subject (``S010_...``); other names say nothing (``""``: the loader
    makes each such image its own subject, pixel-identical copies one subject together)."""
    match = _CKPLUS_RE.match(file)
    return match.group(1).upper() if match else ""


def unknown_subject(entry: Entry) -> str:
    """The subject name of an image whose file name names none: its folder(s) and stem."""
    parts = [v for k, v in entry.attrs if k == "part"]
    return "/".join([*parts, entry.path.parent.name, entry.path.stem])


def list_expression_folder(root: Path, *, part: str | None = None) -> list[Entry]:
    """``<emotion>/<image>``; subjects from CK+ names, else one per image."""
    _, dirs = scan(root)
    entries: list[Entry] = []
    outside: dict[str, int] = {}
    for folder in _expression_dirs(dirs):
        expression = canonical_expression(folder)
        files = [f for f in scan(root / folder)[0] if is_image_name(f)]
        if expression is None:
            outside[folder] = outside.get(folder, 0) + len(files)
            continue
        attrs: tuple[tuple[str, str], ...] = (("expression", expression),)
        if part is not None:
            attrs += (("part", part),)
        entries.extend(Entry(root / folder / f, _subject(f), attrs) for f in files)
    _skip_outside(outside, root)
    entries.sort(key=lambda e: (natural_key(e.identity), natural_key(e.path.name)))
    return entries


#: The split folder of FER2013's release that the ``fer2013`` layout reads.
FER2013_PART = "train"


def list_fer2013(root: Path) -> list[Entry]:
    """``<split>/<emotion>/<image>``: the ``train/`` split folder only (others are logged)."""
    _, dirs = scan(root)
    others = [d for d in dirs if d != FER2013_PART and looks_like_expression_folder(root / d)]
    if others:
        logger.info(
            "fer2013 layout: reading %s/ only under %s; %s left out (pass one of them as --data to use it)",
            FER2013_PART,
            root,
            ", ".join(f"{d}/" for d in others),
        )
    if FER2013_PART not in dirs:
        return []
    return list_expression_folder(root / FER2013_PART, part=FER2013_PART)


def list_jaffe(root: Path) -> list[Entry]:
    """JAFFE: ``<subject>.<code><n>.<number>.tiff`` directly in the root."""
    files, _ = scan(root)
    entries: list[Entry] = []
    unknown = 0
    for f in files:
        match = _JAFFE_RE.match(f)
        if match is None:
            continue
        expression = JAFFE_CODES.get(match.group(2).upper())
        if expression is None:
            unknown += 1
            continue
        entries.append(Entry(root / f, match.group(1).upper(), (("expression", expression),)))
    if unknown:
        logger.warning("left out %d JAFFE files under %s with an unknown expression code (expected %s)", unknown, root, " ".join(JAFFE_CODES))
    entries.sort(key=lambda e: (natural_key(e.identity), natural_key(e.path.name)))
    return entries
