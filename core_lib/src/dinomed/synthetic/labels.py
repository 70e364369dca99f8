"""The fixed label table of the synthetic phantoms: a value for each standard label of :mod:`dinomed.labels`.

Same entry format as ``model.json["labels"]`` (docs/CONTRACTS.md). Value 1 is the lesion (tumours and
lymph nodes); it overrides any organ in the combined label map.
"""
from __future__ import annotations

import copy

from ..labels import standard_label_entries

# the phantom's values for the standard labels (their colours and terminology: dinomed.labels), lesion first
PHANTOM_VALUES = ("lesion", "liver", "spleen", "kidney", "lung", "heart", "urinary_bladder", "bone", "brain")
_STANDARD = standard_label_entries()
ORGAN_LABELS: tuple[dict, ...] = tuple({"value": value, **_STANDARD[name]} for value, name in enumerate(PHANTOM_VALUES, 1))

LABEL_VALUES: dict[str, int] = {entry["name"]: entry["value"] for entry in ORGAN_LABELS}
LESION_LABEL = LABEL_VALUES["lesion"]


def label_entries() -> list[dict]:
    """A fresh copy of :data:`ORGAN_LABELS` for a ``model.json`` (callers may edit it)."""
    return copy.deepcopy(list(ORGAN_LABELS))


def dataset_labels() -> dict[str, int]:
    """The ``labels`` entry of an nnU-Net ``dataset.json``: background 0, then every label by name."""
    return {"background": 0, **LABEL_VALUES}
