"""The five cell classes in one fixed order, and the folder names that mean them."""

from __future__ import annotations

import re

# The order is part of every artefact (labels, probability columns): never reorder.
CLASSES: tuple[str, ...] = ("basophil", "erythroblast", "monocyte", "myeloblast", "seg_neutrophil")

# File-name prefixes of the Kaggle set "Blood Cell Images for Cancer Detection".
FILE_PREFIXES: dict[str, str] = {
    "basophil": "BA",
    "erythroblast": "ERB",
    "monocyte": "MO",
    "myeloblast": "MYO",
    "seg_neutrophil": "NGS",
}

# The class the study cares most about (leukaemia-relevant); reported on its own line.
KEY_CLASS = "myeloblast"

_ALIASES: dict[str, str] = {
    "basophil": "basophil",
    "basophils": "basophil",
    "ba": "basophil",
    "erythroblast": "erythroblast",
    "erythroblasts": "erythroblast",
    "normoblast": "erythroblast",
    "nrbc": "erythroblast",
    "erb": "erythroblast",
    "monocyte": "monocyte",
    "monocytes": "monocyte",
    "mo": "monocyte",
    "myeloblast": "myeloblast",
    "myeloblasts": "myeloblast",
    "blast": "myeloblast",
    "myo": "myeloblast",
    "segneutrophil": "seg_neutrophil",
    "segneutrophils": "seg_neutrophil",
    "segmentedneutrophil": "seg_neutrophil",
    "segmentedneutrophils": "seg_neutrophil",
    "neutrophil": "seg_neutrophil",
    "neutrophils": "seg_neutrophil",
    "ngs": "seg_neutrophil",
    "sng": "seg_neutrophil",
}


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.casefold())


def canonical_class(name: str) -> str | None:
    """Return the class a folder name stands for (case, spaces, '-' and '_' ignored), or None."""
    return _ALIASES.get(_normalise(name))

