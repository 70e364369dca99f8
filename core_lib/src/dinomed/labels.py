"""The standard labels dinomed knows by name: colour and SNOMED-CT terminology (``model.json["labels"]`` entries).

A finetuning dataset whose labels carry these names gets these colours and codes in its model.json; the synthetic
phantoms use them with fixed values (:mod:`dinomed.synthetic.labels`). Colours follow 3D Slicer's
GenericAnatomyColors where there is one.
"""
from __future__ import annotations

import copy

_ANATOMY = ["SCT", "123037004", "Anatomical Structure"]

STANDARD_LABELS: tuple[dict, ...] = (
    {"name": "lesion", "color": [230, 30, 30], "lesion": True,
     "terminology": {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                     "type": ["SCT", "108369006", "Neoplasm"]}},
    {"name": "liver", "color": [221, 130, 101], "terminology": {"category": _ANATOMY, "type": ["SCT", "10200004", "Liver"]}},
    {"name": "spleen", "color": [157, 108, 162],
     "terminology": {"category": _ANATOMY, "type": ["SCT", "78961009", "Spleen"]}},
    {"name": "kidney", "color": [185, 102, 83], "terminology": {"category": _ANATOMY, "type": ["SCT", "64033007", "Kidney"]}},
    {"name": "lung", "color": [197, 165, 145], "terminology": {"category": _ANATOMY, "type": ["SCT", "39607008", "Lung"]}},
    {"name": "heart", "color": [206, 110, 84], "terminology": {"category": _ANATOMY, "type": ["SCT", "80891009", "Heart"]}},
    {"name": "urinary_bladder", "color": [222, 198, 101],
     "terminology": {"category": _ANATOMY, "type": ["SCT", "89837001", "Urinary bladder"]}},
    {"name": "bone", "color": [241, 214, 145],
     "terminology": {"category": _ANATOMY, "type": ["SCT", "272673000", "Bone structure"]}},
    {"name": "brain", "color": [250, 250, 225], "terminology": {"category": _ANATOMY, "type": ["SCT", "12738006", "Brain"]}},
)


def standard_label_entries() -> dict[str, dict]:
    """Each standard label's entry (without a value) by name; a fresh copy the caller may edit."""
    return {entry["name"]: copy.deepcopy(entry) for entry in STANDARD_LABELS}
