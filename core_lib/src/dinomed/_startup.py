"""What ``dinomed`` does to its own process when it runs as a program (``python -m dinomed``, the ``dinomed``
script, the children the Slicer module, DINOPretrain and the web page start); never when dinomed is imported into
another process (Slicer's own Python, a notebook, a test), whose objects it must not touch.

**torch, torchvision and timm are imported with Python's cyclic garbage collector paused, and what exists after
each is frozen** (:func:`gc.freeze`: "move all objects tracked by the garbage collector into a permanent
generation, i.e. ignore them in all the future collections"). A full (generation 2) collection walks every
tracked object, and after ``import torch`` there are about 180 000 of them, nearly all module-level functions,
classes and tables that live as long as the process. Measured in one ``dinomed segment`` of the sample data
(gc callbacks): five full collections while torch and timm were imported took 0.61 s (0.03 to 0.23 s each,
growing with the heap) and the final collection at exit 0.27 s; none of them found more than 40 objects to free.
Frozen objects are still freed by reference counting when their last reference goes; only a reference cycle
among objects that existed at a freeze is never collected, and the import-time objects are what a freeze holds.
``DINOMED_KEEP_GC=1`` leaves the collector alone.
"""
from __future__ import annotations

import gc
import importlib.abc
import importlib.machinery
import os
import sys

# The imports that pause the collector: the big ones every model command makes (timm imports torchvision).
PAUSED_IMPORTS = ("torch", "torchvision", "timm")


class _PausedGCImport(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder for the top-level packages in ``names``: it finds each through the normal path
    finder and runs its loader with the collector paused, then freezes the heap and resumes collecting. It acts
    once per name and removes itself when all have been imported."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.names or fullname in sys.modules:
            return None
        self.names.discard(fullname)
        if not self.names and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):  # on this spec's own loader object only
            if not gc.isenabled():  # nested in another paused import, or the host turned it off
                return run(module)
            gc.disable()
            try:
                return run(module)
            finally:
                gc.freeze()
                gc.enable()

        loader.exec_module = exec_module
        return spec


def pause_gc_in_heavy_imports() -> None:
    """Install the finder (at most once; a no-op with ``DINOMED_KEEP_GC=1``). Called by ``dinomed.cli.main`` when
    it runs as a program."""
    if os.environ.get("DINOMED_KEEP_GC") == "1":
        return
    if any(isinstance(f, _PausedGCImport) for f in sys.meta_path):
        return
    pending = [name for name in PAUSED_IMPORTS if name not in sys.modules]
    if pending:
        sys.meta_path.insert(0, _PausedGCImport(pending))
