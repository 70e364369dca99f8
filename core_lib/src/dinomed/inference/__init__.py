"""Inference on whole volumes: a volume -> slices/patches -> model -> label map on the input grid, post-processing.

``predict.py`` (shared with validation during finetuning) turns a normalised channel array into labels;
``segment.py`` is the whole job behind ``dinomed segment`` (reading, PET resampling, devices, post-processing,
outputs, lesion statistics).
"""
from .segment import (SegmentationResult, autocast_dtype, label_sidecar_path, label_table, remove_small_components,
                      resolve_device, segment_files, segment_images)

__all__ = [
    "SegmentationResult", "autocast_dtype", "label_sidecar_path", "label_table", "remove_small_components",
    "resolve_device", "segment_files", "segment_images",
]
