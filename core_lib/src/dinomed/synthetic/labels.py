"""The fixed label table of the synthetic phantoms (value, name, colour, SNOMED-CT terminology).

Same entry format as ``model.json["labels"]`` (docs/CONTRACTS.md). Value 1 is the lesion (tumours and
lymph nodes); it overrides any organ in the combined label map. Colours follow 3D Slicer's
GenericAnatomyColors where there is one.
"""
from __future__ import annotations

import copy

_ANATOMY = ["SCT", "123037004", "Anatomical Structure"]

ORGAN_LABELS: tuple[dict, ...] = (
    {"value": 1, "name": "lesion", "color": [230, 30, 30], "lesion": True,
     "terminology": {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                     "type": ["SCT", "108369006", "Neoplasm"]}},
    {"value": 2, "name": "liver", "color": [221, 130, 101],
     "terminology": {"category": _ANATOMY, "type": ["SCT", "10200004", "Liver"]}},
    {"value": 3, "name": "spleen", "color": [157, 108, 162],
     "terminology": {"category": _ANATOMY, "type": ["SCT", "78961009", "Spleen"]}},
    {"value": 4, "name": "kidney", "color": [185, 102, 83],
     "terminology": {"category": _ANATOMY, "type": ["SCT", "64033007", "Kidney"]}},
    {"value": 5, "name": "lung", "color": [197, 165, 145],
     "terminology": {"category": _ANATOMY, "type": ["SCT", "39607008", "Lung"]}},
    {"value": 6, "name": "heart", "color": [206, 110, 84],
     "terminology": {"category": _ANATOMY, "type": ["SCT", "80891009", "Heart"]}},
    {"value": 7, "name": "urinary_bladder", "color": [222, 198, 101],
     "terminology": {"category": _ANATOMY, "type": ["SCT", "89837001", "Urinary bladder"]}},
    {"value": 8, "name": "bone", "color": [241, 214, 145],
     "terminology": {"category": _ANATOMY, "type": ["SCT", "272673000", "Bone structure"]}},
    {"value": 9, "name": "brain", "color": [250, 250, 225],
     "terminology": {"category": _ANATOMY, "type": ["SCT", "12738006", "Brain"]}},
)

LABEL_VALUES: dict[str, int] = {entry["name"]: entry["value"] for entry in ORGAN_LABELS}
LESION_LABEL = LABEL_VALUES["lesion"]


def label_entries() -> list[dict]:
    """A fresh copy of :data:`ORGAN_LABELS` for a ``model.json`` (callers may edit it)."""
    return copy.deepcopy(list(ORGAN_LABELS))


def dataset_labels() -> dict[str, int]:
    """The ``labels`` entry of an nnU-Net ``dataset.json``: background 0, then every label by name."""
    return {"background": 0, **LABEL_VALUES}
