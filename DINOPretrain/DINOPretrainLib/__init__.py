"""DINOPretrain's logic, free of Qt: the training console (check the data, launch finetuning or the three DINOv3
pretraining stages and the export, live curves, graceful stop, continue a run found on disk, evaluate, register)
over DINOSeg's job runner, the run folders on disk, and the options → ``dinomed`` arguments."""
from .console import ConsoleError, DataReport, Step, TrainingConsole, list_recipes
from .curves import CHARTS, MetricsTable, RunCurves
from .options import (CONFIG_FILE, DEVICES, MODES, OptionsError, Recipe, TrainingOptions, family_stages,
                      parse_overrides, path_or_none)
from .runs import RunFolder, RunFolderError, open_run_folder

__all__ = [
    "CHARTS", "CONFIG_FILE", "DEVICES", "MODES", "ConsoleError", "DataReport", "MetricsTable", "OptionsError",
    "Recipe", "RunCurves", "RunFolder", "RunFolderError", "Step", "TrainingConsole", "TrainingOptions",
    "family_stages", "list_recipes", "open_run_folder", "parse_overrides", "path_or_none",
]
