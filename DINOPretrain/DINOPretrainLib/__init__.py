"""DINOPretrain's module logic, free of Qt: launch ``dinomed pretrain|finetune … --events`` through DINOSeg's
process runner, turn ``metric`` events into a table of loss/Dice curves, stop, resume, and register a
finetuned model folder in DINOSeg's models directory."""
from .logic import METRIC_TABLE_COLUMNS, MODES, MetricsTable, TrainingRunLogic

__all__ = ["METRIC_TABLE_COLUMNS", "MODES", "MetricsTable", "TrainingRunLogic"]
