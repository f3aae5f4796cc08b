"""Synthetic head-CT phantoms with labelled intracranial hemorrhage.

No labelled head CT ships with ichnode, so its tests, its default model and
its demos use the series this package writes: real DICOM CT series
(CT Image Storage, Explicit VR Little Endian) of a plausible head, built as an
implicit 3-D model in head coordinates and sampled on the slice planes of a
(possibly gantry-tilted) axial acquisition, with per-slice labels in the
order of :data:`LABELS`.

Anatomy (Hounsfield units): air, scalp with a thin fat layer and temporalis
muscle, a calvarium with cortical tables and diploe whose thickness varies
with position, a skull base with anterior / middle / posterior fossae,
petrous ridges, mastoid air cells, sella, sphenoid / ethmoid / frontal
sinuses and orbits (fat, globe, lens), grey-matter cortex following a
labyrinth of sulci, white matter, deep grey nuclei, lateral ventricles
(butterfly frontal horns, bodies, atria, occipital and temporal horns),
third and fourth ventricles, sylvian and interhemispheric fissures with a
falx, basal cisterns (suprasellar star, perimesencephalic ring, cisterna
magna), brainstem and a foliated cerebellum; optional pineal / choroid
calcification and a head holder; head size, shape, pose and atrophy vary
per patient. Gaussian noise is added and the image mildly smoothed.

Hemorrhage (acute blood 50-90 HU): epidural biconvex lens, subdural
crescent (convexity or parafalcine), subarachnoid blood in sulci, fissures
and / or basal cisterns, intraventricular layering or cast, and
intraparenchymal focus with an oedema rim. Large lesions shift the midline
structures. A subtype is labelled on a slice where a reader could see it:
the lesion covers at least about 3 mm^2 of that slice and its blood stands
out of the noise by the Rose criterion (ideal-observer SNR, the root of the
summed squared HU contrast over the noise sd, at least 5). A lesion visible
on no slice is drawn again, larger.

Modules: :mod:`~training.phantoms.constants` (label orders, tissue codes,
encodings), :mod:`~training.phantoms.numeric` (float32 helpers),
:mod:`~training.phantoms.anatomy` (the head model),
:mod:`~training.phantoms.lesions` (the hemorrhage subtypes),
:mod:`~training.phantoms.geometry` (pose, tilt, slice planes),
:mod:`~training.phantoms.render` (sampling on the slice planes, noise),
:mod:`~training.phantoms.dicom` (pixel encodings, headers),
:mod:`~training.phantoms.series` (:func:`make_series`),
:mod:`~training.phantoms.dataset` (:func:`write_dataset`) and
:mod:`~training.phantoms.cli` (the command line).

Command line::

    python -m training.phantoms --out DIR --series N --seed S \
        [--layout series|rsna] [--matrix 512|256] [--positive-fraction 0.5]
"""

from __future__ import annotations

from training.phantoms.cli import main
from training.phantoms.constants import (
    ENCODINGS,
    LABELS,
    RSNA_LABEL_ORDER,
    SUBTYPES,
    TISSUE,
)
from training.phantoms.dataset import _assign_patients as _assign_patients
from training.phantoms.dataset import write_dataset
from training.phantoms.dicom import MANUFACTURER as MANUFACTURER
from training.phantoms.dicom import rsna_fix_intercept
from training.phantoms.lesions import _random_subtypes as _random_subtypes
from training.phantoms.series import PhantomSeries, make_series

__all__ = [
    "LABELS",
    "SUBTYPES",
    "RSNA_LABEL_ORDER",
    "TISSUE",
    "PhantomSeries",
    "make_series",
    "write_dataset",
    "rsna_fix_intercept",
    "ENCODINGS",
    "main",
]
