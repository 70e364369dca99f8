"""Child process of test_dinoseg_dependencies.py: one dependency scenario in a stand-in Slicer.

sys.path holds only the stand-ins (with Slicer's real util.py and packaging.py), the `packaging` library
and the scenario's site folder, so importlib.metadata sees exactly what the scenario installed. Prints one
JSON object: the function's result or error, and the dialogs the user saw.
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

scenario = json.loads(os.environ["DINOSEG_SCENARIO"])

import ctk  # noqa: E402
import qt  # noqa: E402
import slicer  # noqa: E402
import slicer.util  # noqa: E402

ctk.ANSWERS[:] = scenario.get("answers", [])

if scenario["slicer"] == "5.10":
    # Slicer 5.10 has no slicer.packaging; its util.pip_install ran pip blocking through the same
    # executePythonModule/launchConsoleProcess/logProcessOutput chain (reconstructed here: 5.10's function body)
    assert importlib.util.find_spec("slicer.packaging") is None

    def pip_install_5_10(requirements):
        import logging
        import shlex

        logging.warning("5.10 pip_install called")

        if type(requirements) == str:
            args = "install", *(shlex.split(requirements))
        elif type(requirements) == list:
            args = "install", *requirements
        else:
            raise ValueError("pip_install requirement input must be string or list")
        slicer.util.executePythonModule("pip", list(args))

    slicer.util.pip_install = pip_install_5_10

spec = importlib.util.spec_from_file_location("dinoseg_dependencies", scenario["dependencies_py"])
dependencies = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = dependencies  # dataclasses look their module up
spec.loader.exec_module(dependencies)

result = error = None
try:
    if scenario.get("api") == "old":  # the earlier API: ensure_dependencies(confirm=...)
        result = dependencies.ensure_dependencies(confirm=slicer.util.confirmOkCancelDisplay)
    else:
        result = dependencies.ensure_in_slicer(force=scenario.get("force", False),
                                               core_lib=Path(scenario["core_lib"]) if scenario.get("core_lib") else None)
except Exception as exc:  # what would reach the widget's tryWithErrorDisplay
    error = f"{type(exc).__name__}: {exc}"
print(json.dumps({"result": result, "error": error, "dialogs": ctk.DIALOGS, "cursors_left": len(qt.CURSORS)}))
