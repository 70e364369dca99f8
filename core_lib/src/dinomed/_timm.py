"""Import timm (and torchvision, which timm imports unconditionally) without importing TorchDynamo.

Importing timm here imported all of TorchDynamo, with sympy and ``torch.distributed.tensor``: 2.0-2.9 s of every
process that builds a model (``python -X importtime``; ``dinomed segment``'s "import models" stage, paid by every
segmentation that the Slicer module and the web page start, since they run ``dinomed segment`` as a child process),
for nothing that inference or training here uses. Two lines do it:

- torchvision 0.29's ``torchvision/ops/roi_align.py`` has ``from torch._dynamo.utils import is_compile_supported``
  at module level, reached from ``import torchvision`` through ``torchvision.models``; only ``roi_align`` calls it,
  on its deterministic path. The same file's ``lazy_compile`` was written so as not to import Dynamo eagerly
  ("importing dynamo has undesirable side effects for eager mode only users", pytorch/vision#8436).
- timm's ``models/naflexvit.py`` decorates methods with ``torch.compiler.disable`` when it is imported, and
  ``torch.compiler.disable`` imports ``torch._dynamo`` to do it. dinomed builds no NaFlexViT.

:func:`import_timm` therefore imports torchvision with a stand-in ``torch._dynamo.utils`` in ``sys.modules`` for
that import only (its ``is_compile_supported`` imports the real function at its first call; any other name asked
of it comes from the real module, so a torchvision that imports more from there gets the real objects and pays
the import as before), and then timm with ``torch.compiler.disable`` replaced, for that import only, by one that
applies the real ``torch.compiler.disable`` to the function at its first call instead of at its definition. After
it, ``torch.compiler.disable`` and timm's own ``disable_compiler`` name are the real function again; only the
functions decorated during the import (naflexvit's) keep the deferred decoration, which ``torch.compile`` still
honours (it breaks the graph there and runs them eagerly; tested). ``torch.compile`` (``dinomed segment --compile``)
imports Dynamo when it is first called, as it would anyway. Nothing is replaced when
timm or Dynamo is already imported, or with ``DINOMED_EAGER_DYNAMO_IMPORT=1``. Every module of dinomed that imports
timm imports this module first; ``tests/test_timm_import.py`` checks that building and running a model imports no
Dynamo and that ``torch.compile``, ``torch.compiler.disable`` and ``roi_align`` work as before after it.
"""
from __future__ import annotations

import functools
import os
import sys
import types

_DYNAMO_UTILS = "torch._dynamo.utils"


def _real_dynamo_utils() -> types.ModuleType:
    module = sys.modules.get(_DYNAMO_UTILS)
    if module is None or getattr(module, "_dinomed_stand_in", False):
        sys.modules.pop(_DYNAMO_UTILS, None)
        import torch._dynamo.utils as module
    return module


def _is_compile_supported(device_type):
    return _real_dynamo_utils().is_compile_supported(device_type)


def _from_real(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(_real_dynamo_utils(), name)


def _import_torchvision() -> None:
    stand_in = types.ModuleType(_DYNAMO_UTILS, "dinomed's stand-in while torchvision is imported (dinomed._timm)")
    stand_in._dinomed_stand_in = True
    stand_in.is_compile_supported = _is_compile_supported
    stand_in.__getattr__ = _from_real
    sys.modules[_DYNAMO_UTILS] = stand_in
    try:
        import torchvision  # noqa: F401
    finally:
        if sys.modules.get(_DYNAMO_UTILS) is stand_in:
            del sys.modules[_DYNAMO_UTILS]


def _deferred_disable(real_disable):
    """``torch.compiler.disable`` with the same signature, applied to ``fn`` at its first call."""

    def disable(fn=None, recursive=True, *, reason=None):
        if fn is None:
            return functools.partial(disable, recursive=recursive, reason=reason)
        disabled = []

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not disabled:
                disabled.append(real_disable(fn, recursive, reason=reason))
            return disabled[0](*args, **kwargs)

        call._dinomed_deferred_disable = True
        return call

    return disable


def _import_timm_itself() -> None:
    import torch

    real_disable = torch.compiler.disable
    torch.compiler.disable = _deferred_disable(real_disable)
    try:
        import timm  # noqa: F401
    finally:
        torch.compiler.disable = real_disable
        for name, module in list(sys.modules.items()):
            if (name == "timm" or name.startswith("timm.")) and getattr(
                    getattr(module, "disable_compiler", None), "__module__", None) == __name__:
                module.disable_compiler = real_disable


def import_timm() -> None:
    """``import timm``, without importing ``torch._dynamo`` (see the module docstring); nothing when timm or Dynamo
    is already imported or with ``DINOMED_EAGER_DYNAMO_IMPORT=1`` (the importing module's own ``import timm`` then
    does it the usual way)."""
    if "timm" in sys.modules or "torch._dynamo" in sys.modules or os.environ.get("DINOMED_EAGER_DYNAMO_IMPORT") == "1":
        return
    if "torchvision" not in sys.modules:
        _import_torchvision()
    _import_timm_itself()


import_timm()
