"""Supervised finetuning of the seed models on labeled datasets (nnU-Net raw layout), resumable and distributed.

``load_config`` (YAML recipe + ``key=value`` overrides), ``open_dataset`` / ``validate_dataset`` / ``split_cases``,
``finetune`` (the training loop); the datasets and metrics are shared with :mod:`dinomed.evaluate` (a model folder
scored on a labeled dataset).
"""
from .config import CONFIG_DIR, DEFAULTS, dump_config, find_config, load_config, parse_overrides
from .dataset import DatasetError, DatasetSpec, LabelMapping, load_case, open_dataset, split_cases, validate_dataset
from .metrics import class_metrics, summarize
from .trainer import FinetuneResult, finetune

__all__ = [
    "CONFIG_DIR", "DEFAULTS", "DatasetError", "DatasetSpec", "FinetuneResult", "LabelMapping", "class_metrics",
    "dump_config", "find_config", "finetune", "load_case", "load_config", "open_dataset", "parse_overrides",
    "split_cases", "summarize", "validate_dataset",
]
