"""Python packages DINOSeg needs inside Slicer, installed on first use.

- ``dinomed`` from the ``core_lib`` bundled with the extension (its path is relative to this file), so the
  CLI that the child process runs is exactly the code this module was written against;
- ``torch`` through the PyTorch extension's ``PyTorchUtils`` when it is installed (it picks the CUDA
  build that fits the machine), else from PyPI;
- Slicer's own SimpleITK (and numpy, VTK) is never replaced: pip is told to keep installed packages
  (``--upgrade-strategy only-if-needed``; and SimpleITK is pinned to the installed version).

Uses Slicer's ``pip_ensure`` where the Slicer version has it (``slicer.pydeps``, 5.11+), else
``slicer.util.pip_install`` with constraints that pin Slicer's own packages.
Nothing here imports torch or dinomed: it only asks importlib what is installed.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]


def bundled_core_lib() -> Path | None:
    """The ``core_lib`` folder shipped with the extension: beside the module folder in a source checkout
    (``<repo>/core_lib``) or copied into the module's resources in an installed extension."""
    for candidate in (MODULE_DIR.parent / "core_lib", MODULE_DIR / "Resources" / "core_lib"):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return None


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def core_lib_version(core_lib: Path) -> str | None:
    """The version written in the bundled core_lib's pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return None
    with open(core_lib / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle).get("project", {}).get("version")


@dataclass
class InstallPlan:
    """What is missing: ``torch`` (install through PyTorchUtils when available) and the pip requirements."""

    torch: bool
    pip_requirements: list[str]

    @property
    def empty(self) -> bool:
        return not self.torch and not self.pip_requirements


def plan_installation() -> InstallPlan:
    """Decide what to install, without installing anything."""
    requirements: list[str] = []
    core_lib = bundled_core_lib()
    wanted = core_lib_version(core_lib) if core_lib else None
    have = installed_version("dinomed")
    if have is None or (wanted is not None and have != wanted):
        if core_lib is None:
            requirements.append("dinomed")
        else:
            requirements.append(str(core_lib))
    return InstallPlan(torch=importlib.util.find_spec("torch") is None, pip_requirements=requirements)


def _keep_slicer_packages() -> list[str]:
    """pip constraints that keep the packages Slicer ships at their installed versions."""
    pins = []
    for name in ("SimpleITK", "numpy", "vtk"):
        version = installed_version(name)
        if version:
            pins.append(f"{name}=={version}")
    return pins


def install_torch() -> None:
    """torch via the PyTorch extension (right CUDA build) when present, else the default PyPI wheel."""
    try:
        import PyTorchUtils  # the Slicer PyTorch extension's module

        PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True)
        return
    except ImportError:
        pass
    _pip(["torch"])


def requirement_strings(requirements: list[str]) -> list[str]:
    """pip requirement strings; a local folder (the bundled core_lib) becomes ``dinomed @ file:///…``."""
    out = []
    for requirement in requirements:
        path = Path(requirement)
        out.append(f"dinomed @ {path.resolve().as_uri()}" if path.is_dir() else requirement)
    return out


def _pip(requirements: list[str]) -> None:
    """Install with Slicer's pip helpers: ``slicer.pydeps.pip_ensure`` (Slicer 5.11+; the issue names it
    ``slicer.packaging``, accepted too), which can skip packages Slicer provides; else ``pip_install``."""
    import slicer

    requirements = requirement_strings(requirements)
    for module_name in ("pydeps", "packaging"):
        try:
            helpers = importlib.import_module(f"slicer.{module_name}")
        except ImportError:
            continue
        pip_ensure = getattr(helpers, "pip_ensure", None)
        if pip_ensure is not None:
            from packaging.requirements import Requirement

            pip_ensure([Requirement(r) for r in requirements], skip_packages=["SimpleITK", "torch"], requester="DINOSeg")
            return
    constraints = _keep_slicer_packages()
    args = " ".join(f'"{r}"' for r in requirements)
    if constraints:
        constraint_file = Path(slicer.app.temporaryPath) / "dinoseg-constraints.txt"
        constraint_file.write_text("\n".join(constraints) + "\n")
        args += f' --upgrade-strategy only-if-needed -c "{constraint_file}"'
    slicer.util.pip_install(args)


def ensure_dependencies(confirm=None) -> bool:
    """Install what is missing (asks ``confirm(message) -> bool`` first when given); True when ready."""
    plan = plan_installation()
    if plan.empty:
        return True
    what = (["PyTorch"] if plan.torch else []) + [os.path.basename(r) or r for r in plan.pip_requirements]
    if confirm is not None and not confirm(f"DINOSeg needs to install: {', '.join(what)}. This can take a few "
                                           "minutes and a few GB of disk. Install now?"):
        return False
    if plan.torch:
        install_torch()
    if plan.pip_requirements:
        _pip(plan.pip_requirements)
    importlib.invalidate_caches()
    return plan_installation().empty
