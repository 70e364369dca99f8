"""Classification with frozen DINOv3 features: the 2D/3D protocols of the DINOv3 medical benchmark.

"Does DINOv3 set a new medical vision standard?" (seed paper 002), sections 2.1, 2.2 and 3.1: images (2D) or
every slice of a volume (3D, slice embeddings mean-pooled into one vector) through a frozen encoder, then a
k-NN classifier, a linear probe (BCE, lr 0.005, batch 1024, 50 epochs) or ABMIL on bags of slice/patch
features; AUC, accuracy, precision and recall per label and their mean.

Workflow (the CLI is ``dinomed classify extract|knn|linear-probe|abmil``)::

    fs = extract_feature_set({"case_001": {"CT": "ct1.nii.gz"}, …}, FeatureExtractor.from_checkpoint(ckpt))
    table = read_labels_table("labels.csv")
    folds = make_folds(table, "kfold", seed=0)
    res = run_classifier("linear-probe", fs, table, {0: folds}, token="cls", params={})
"""
from __future__ import annotations

from .embeddings import FeatureSet, extract_feature_set, find_case_images, read_case_image, slice_embeddings
from .evaluate import METHODS, Results, run_classifier, summary_text, write_results
from .labels import LabelTable, align_cases, read_labels_table
from .metrics import binary_metrics, classification_metrics
from .probes import abmil, build_abmil, knn_probabilities, linear_probe
from .splits import Fold, make_folds

__all__ = [
    "METHODS", "FeatureSet", "Fold", "LabelTable", "Results", "abmil", "align_cases", "binary_metrics",
    "build_abmil", "classification_metrics", "extract_feature_set", "find_case_images", "knn_probabilities",
    "linear_probe", "make_folds", "read_case_image", "read_labels_table", "run_classifier", "slice_embeddings",
    "summary_text", "write_results",
]
