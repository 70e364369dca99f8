"""DINOSeg's module logic, free of Qt: MRML <-> files with geometry, segmentation nodes with terminology,
lesion tables, feature overlays, the training-set export, dependencies and the ``dinomed`` child process.

Every function takes the scene (or nodes) as arguments; nothing here imports torch or ``dinomed``.
"""
from .events import Progress, parse_event
from .jobs import Job, JobError, JobState
from .logic import DINOSegError, DINOSegLogic, FeaturesJob, InputRemovedError, SegmentationJob, SegmentationResult, SuvJob
from .models import BUNDLED_MODELS_DIR, LabelInfo, ModelInfo, add_model_folder, list_model_folders, read_model_info

__all__ = [
    "BUNDLED_MODELS_DIR", "DINOSegError", "DINOSegLogic", "FeaturesJob",
    "InputRemovedError", "Job", "JobError", "JobState", "LabelInfo", "ModelInfo", "Progress", "SegmentationJob",
    "SegmentationResult", "SuvJob", "add_model_folder", "list_model_folders", "parse_event", "read_model_info",
]
