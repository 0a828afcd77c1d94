"""Real face data: loading, preprocessing, augmentation and reproducible splits.

``load_faces`` reads ORL, scikit-learn's Olivetti cache, Yale A, Extended Yale B (cropped) and
ImageFolder trees into a :class:`FaceSet`; ``augment`` and ``occlude`` work on whole torch
batches; ``split_open_set`` / ``split_closed_set`` make seeded splits that keep
pixel-identical images on one side and record themselves by source path; ``partition_sites``
deals the images among the sites of a federated simulation (identity-disjoint, or with
identities recurring across sites) and records itself the same way.
"""

from fedface.common.data.faceset import FaceSet, SkippedFile
from fedface.common.data.partition import PARTITION_FORMAT, SitePartition, partition_sites
from fedface.common.data.sources import (
    IMAGE_EXTENSIONS,
    LAYOUTS,
    YALE_A_CONDITIONS,
    Layout,
    detect_layout,
    load_faces,
)
from fedface.common.data.splits import (
    SPLIT_FORMAT,
    Split,
    split_closed_set,
    split_gallery_probe,
    split_open_set,
    split_open_set_folds,
)
from fedface.common.data.transforms import (
    OCCLUSION_PLACEMENTS,
    AugmentConfig,
    augment,
    occlude,
    occlusion_boxes,
    to_tensor,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "OCCLUSION_PLACEMENTS",
    "PARTITION_FORMAT",
    "SPLIT_FORMAT",
    "YALE_A_CONDITIONS",
    "AugmentConfig",
    "FaceSet",
    "Layout",
    "SitePartition",
    "SkippedFile",
    "Split",
    "augment",
    "detect_layout",
    "load_faces",
    "occlude",
    "occlusion_boxes",
    "partition_sites",
    "split_closed_set",
    "split_gallery_probe",
    "split_open_set",
    "split_open_set_folds",
    "to_tensor",
]
