"""Vocabulary shared by the phantom generator: label orders, tissue codes, pixel encodings."""

from __future__ import annotations

from ichnode.config import LABELS

# LABELS (from ichnode.config): label order of :attr:`PhantomSeries.labels` and of ``labels.csv``.

SUBTYPES: tuple[str, ...] = LABELS[1:]

RSNA_LABEL_ORDER: tuple[str, ...] = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)
"""Order of the six rows per image in RSNA's ``stage_2_train.csv``."""

TISSUE: dict[str, int] = {
    "air": 0,
    "soft_tissue": 1,
    "fat": 2,
    "bone": 3,
    "grey_matter": 4,
    "white_matter": 5,
    "csf": 6,
    "blood": 7,
    "oedema": 8,
    "calcification": 9,
}
"""Codes of :attr:`PhantomSeries.tissue` (dominant tissue of each voxel)."""

ENCODINGS: tuple[str, ...] = ("u12", "s16", "s16_1024", "rsna_bad_intercept")
"""Pixel encodings :func:`make_series` draws from (or is told to use)."""
