"""The Python packages DINOSeg needs inside Slicer (5.10 to 5.13), installed on first use after ONE confirmation.

- ``dinomed`` (the core library) ALWAYS from the ``core_lib`` folder bundled with the extension, never from
  the package index (no project of that name there belongs to us). It is reinstalled whenever the bundled
  copy differs from the installed one: another version, other dependencies, or other source files (compared
  with the sha256 hashes pip wrote into the installed distribution's RECORD), so an extension update that
  keeps the version number still updates the code.
- ``torch`` through the PyTorch extension (``PyTorchUtils``, which picks the CUDA build that fits the
  machine) when it is installed, else from the package index together with core_lib's other dependencies.
- Slicer's own packages are kept: a constraints file pins SimpleITK and numpy (and an installed torch) to
  their installed versions, so pip fails with a message rather than replacing them.

Slicer >= 5.11 has ``slicer.packaging``: ``pip_install(..., constraints=, requester=)`` shows its progress
dialog (the GUI stays responsive) and its error dialog with pip's log. ``pip_ensure`` is not used on purpose:
its ``pip_check`` takes a URL requirement (``dinomed @ file://…``) as met by any installed version, and its
``skip_packages`` path rebuilds each requirement as name + version (``pip install dinomed`` from the index).
Slicer 5.10 has no ``slicer.packaging``, and its ``slicer.util.pip_install`` reads pip's output on the GUI
thread until pip ends; there pip is started with ``slicer.util.launchConsoleProcess`` and watched from a progress
dialog (with Cancel) while Slicer keeps processing events.

Nothing here imports torch or dinomed: installed versions come from ``importlib.metadata``.
"""
from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

MODULE_DIR = Path(__file__).resolve().parents[1]
REQUESTER = "DINOSeg"
DISTRIBUTION = "dinomed"
# packages Slicer ships; pip may not replace them (a constraint pins each to its installed version)
SLICER_PACKAGES = ("SimpleITK", "numpy")


class DependencyError(RuntimeError):
    """Something DINOSeg needs cannot be installed; the message says what and what the user can do."""


def bundled_core_lib() -> Path | None:
    """The ``core_lib`` folder shipped with the extension: beside the module folder in a source checkout
    (``<repo>/core_lib``) or copied into the module's resources in an installed extension."""
    for candidate in (MODULE_DIR.parent / "core_lib", MODULE_DIR / "Resources" / "core_lib"):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return None


def installed_version(distribution: str, path: list[str] | None = None) -> str | None:
    """The installed version of ``distribution`` (looked up on ``path``, default ``sys.path``), or None."""
    for dist in importlib.metadata.distributions(name=distribution, **({"path": path} if path is not None else {})):
        return dist.version
    return None


def _pyproject(core_lib: Path) -> dict:
    text = (core_lib / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib  # Python >= 3.11 (Slicer 5.10 ships 3.12)
    except ImportError:  # pragma: no cover - older Pythons: the two fields read here, by pattern
        version = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
        deps = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.M | re.S)
        return {"project": {"version": version.group(1) if version else None,
                            "dependencies": re.findall(r'"([^"]+)"', deps.group(1)) if deps else []}}
    return tomllib.loads(text)


def core_lib_version(core_lib: Path) -> str | None:
    """The version written in the bundled core_lib's pyproject.toml."""
    return _pyproject(core_lib).get("project", {}).get("version")


def core_lib_requirements(core_lib: Path) -> list[str]:
    """The bundled core_lib's dependencies (``[project] dependencies``), as written."""
    return list(_pyproject(core_lib).get("project", {}).get("dependencies", []))


def _record_hash(path: Path) -> str:
    """A file's hash as pip writes it into RECORD (PEP 376/427: urlsafe base64 sha256 without padding)."""
    digest = hashlib.sha256(path.read_bytes()).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _bundled_sources(core_lib: Path) -> dict[str, Path]:
    """The package files of the bundled core_lib, keyed as RECORD names them (``dinomed/cli.py``)."""
    src = core_lib / "src"
    return {p.relative_to(src).as_posix(): p for p in sorted((src / DISTRIBUTION).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")}


def _normalized(requirement: str) -> str:
    """One spelling of a requirement: no spaces or marker, lower case, and the version clauses sorted (the installed
    metadata writes ``timm>=1.0.31,<1.1`` as ``timm<1.1,>=1.0.31``)."""
    text = re.sub(r"\s+", "", requirement.split(";")[0]).lower().replace("_", "-")
    match = re.search(r"[<>=!~]", text)
    if not match:
        return text
    return text[:match.start()] + ",".join(sorted(text[match.start():].split(",")))


def _local_path(url: str) -> Path | None:
    parsed = urlparse(url)
    return Path(unquote(parsed.path)).resolve() if parsed.scheme == "file" else None


@dataclass
class CoreLibStatus:
    """How the installed ``dinomed`` compares with the bundled core_lib."""

    current: bool
    reason: str  # why it must be (re)installed, or what is installed
    installed: str | None = None


def core_lib_status(core_lib: Path, path: list[str] | None = None) -> CoreLibStatus:
    """Compare the installed ``dinomed`` (on ``path``, default ``sys.path``) with the bundled ``core_lib``."""
    dists = list(importlib.metadata.distributions(name=DISTRIBUTION, **({"path": path} if path is not None else {})))
    if not dists:
        return CoreLibStatus(False, "not installed")
    dist = dists[0]
    have, want = dist.version, core_lib_version(core_lib)
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    source = _local_path(direct.get("url", ""))
    if direct.get("dir_info", {}).get("editable"):
        # a developer's editable install: current when it is this very folder (the code is live)
        if source == core_lib.resolve():
            return CoreLibStatus(True, f"{have}, editable install of {core_lib}", have)
        return CoreLibStatus(False, f"an editable install of {source} is not the bundled copy", have)
    if have != want:
        return CoreLibStatus(False, f"installed {have}, bundled {want}", have)
    installed_reqs = sorted(_normalized(r) for r in (dist.requires or []) if "extra ==" not in r)
    bundled_reqs = sorted(_normalized(r) for r in core_lib_requirements(core_lib))
    if installed_reqs != bundled_reqs:
        return CoreLibStatus(False, f"{have}: the bundled copy has other dependencies", have)
    record = {str(f.as_posix()): f.hash for f in (dist.files or []) if f.hash is not None}
    bundled = _bundled_sources(core_lib)
    installed_py = {name for name in record if name.startswith(f"{DISTRIBUTION}/") and name.endswith(".py")}
    bundled_py = {name for name in bundled if name.endswith(".py")}
    if installed_py != bundled_py:
        changed = sorted(installed_py ^ bundled_py)
        return CoreLibStatus(False, f"{have}: the bundled copy has other source files ({', '.join(changed[:3])}…)", have)
    for name, file in bundled.items():
        expected = record.get(name)
        if expected is not None and f"{expected.mode}={expected.value}" != _record_hash(file):
            return CoreLibStatus(False, f"{have}: the bundled copy changed ({name})", have)
    return CoreLibStatus(True, f"{have}, same files as the bundled copy", have)


def _version_requirement(core_lib: Path | None, name: str) -> str:
    """The version specifier core_lib asks for ``name`` (``">=2.4"`` for torch), "" when it names none."""
    for requirement in core_lib_requirements(core_lib) if core_lib else []:
        match = re.match(rf"^{name}(?![\w.-])\s*([^;]*)", requirement.strip())
        if match:
            return match.group(1).strip()
    return ""


def pytorch_extension_available() -> bool:
    """True when the PyTorch extension's ``PyTorchUtils`` module can be imported."""
    return importlib.util.find_spec("PyTorchUtils") is not None


def _specifier_allows(specifier: str, version: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet  # in Slicer's Python (slicer.packaging uses it)
    except ImportError:  # pragma: no cover - pip always carries a copy
        from pip._vendor.packaging.specifiers import SpecifierSet

    return SpecifierSet(specifier).contains(version, prereleases=True)


@dataclass
class InstallPlan:
    """What DINOSeg would install, decided without installing anything."""

    core_lib: Path | None  # the bundled folder to (re)install with pip, None when it is current
    core_lib_reason: str
    torch: str | None  # None: torch is fine; "extension": through PyTorchUtils; "pip": from the package index
    torch_requirement: str = ""  # e.g. ">=2.4"
    torchvision_requirement: str = ""
    torch_installed: str | None = None
    problems: list[str] = field(default_factory=list)  # what cannot be installed, in plain words

    @property
    def empty(self) -> bool:
        return self.core_lib is None and self.torch is None and not self.problems

    def describe(self) -> list[str]:
        """One line per thing to install, for the confirmation dialog."""
        lines = []
        if self.torch == "extension":
            lines.append(f"PyTorch (torch{self.torch_requirement}) through the PyTorch extension"
                         + (f", replacing {self.torch_installed}" if self.torch_installed else ""))
        elif self.torch == "pip":
            lines.append(f"PyTorch (torch{self.torch_requirement}) from the Python package index"
                         + (f", replacing {self.torch_installed}" if self.torch_installed else "")
                         + " (install the PyTorch extension first for a GPU build that fits this computer)")
        if self.core_lib is not None:
            lines.append(f"the DINOSeg core library (dinomed) from the copy bundled with the extension "
                         f"({self.core_lib_reason}), with the packages it needs (timm, MONAI, …)")
        return lines


def plan_installation(force: bool = False, core_lib: Path | None = None, path: list[str] | None = None) -> InstallPlan:
    """Decide what to install. ``force`` reinstalls the bundled core_lib even when it is current (the
    "Install/upgrade dependencies" button); torch is then only installed when missing or too old."""
    searched = [core_lib] if core_lib else [MODULE_DIR.parent / "core_lib", MODULE_DIR / "Resources" / "core_lib"]
    core_lib = core_lib or bundled_core_lib()
    problems = []
    if core_lib is None or not (core_lib / "pyproject.toml").is_file():
        core_lib = None
        problems.append("The DINOSeg extension is incomplete: the core library it bundles (core_lib, with its "
                        f"pyproject.toml) was not found in {' nor in '.join(str(p) for p in searched)}. "
                        "Reinstall the DINOSeg extension from the Extensions Manager.")
        status = CoreLibStatus(False, "bundled copy missing")
    else:
        status = core_lib_status(core_lib, path)
    requirement = _version_requirement(core_lib, "torch")
    have_torch = installed_version("torch", path)
    torch_ok = have_torch is not None and (not requirement or _specifier_allows(requirement, have_torch))
    torch = None if torch_ok else ("extension" if pytorch_extension_available() else "pip")
    reinstall = core_lib is not None and (force or not status.current)
    reason = status.reason if not status.current else f"reinstall requested; {status.reason}"
    return InstallPlan(core_lib if reinstall else None, reason, torch, requirement,
                       _version_requirement(core_lib, "torchvision"), have_torch, problems)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def unmanaged_slicer_packages() -> list[str]:
    """Slicer's own packages that Python can import but pip cannot see (no distribution metadata)."""
    return [name for name in SLICER_PACKAGES
            if installed_version(name) is None and importlib.util.find_spec(name) is not None]


def constraints_text(path: list[str] | None = None) -> str:
    """pip constraints that keep Slicer's own packages, and an installed torch, at their installed versions."""
    lines = []
    for name in (*SLICER_PACKAGES, "torch"):
        version = installed_version(name, path)
        if version:
            lines.append(f"{name}=={version}")
    return "".join(line + "\n" for line in lines)


def _install_torch_with_extension(torch_requirement: str, torchvision_requirement: str) -> None:
    """PyTorchUtils.installTorch (light-the-torch picks the CUDA build); our dialog already asked."""
    import subprocess

    import PyTorchUtils  # the PyTorch extension's module

    message = ("PyTorch could not be installed through the PyTorch extension. Open the 'PyTorch Utils' module to "
               "install it (it shows why), then try again.")
    try:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=torch_requirement or None,
            torchvisionVersionRequirement=torchvision_requirement or None)
    except (subprocess.CalledProcessError, ImportError) as exc:
        raise DependencyError(f"{message} ({exc})") from exc
    if torch is None:
        raise DependencyError(message)


def _pip_install(args: list[str], constraints: Path) -> None:
    """pip install through Slicer: ``slicer.packaging.pip_install`` (>= 5.11) with its progress dialog, else
    (5.10) pip started with ``slicer.util.launchConsoleProcess`` under a progress dialog of our own."""
    try:
        from slicer import packaging as slicer_packaging  # Slicer >= 5.11
    except ImportError:
        slicer_packaging = None
    if slicer_packaging is not None and hasattr(slicer_packaging, "pip_install"):
        slicer_packaging.pip_install(args, constraints=str(constraints), requester=REQUESTER,
                                     blocking=True, show_progress=True)
    else:
        _pip_install_with_progress(["install", *args, "-c", str(constraints)])


def _pip_install_with_progress(pip_args: list[str]) -> None:
    """Slicer 5.10: its ``slicer.util.pip_install`` reads pip's output on the GUI thread until pip ends (Slicer
    is frozen during a download). Here pip runs with ``launchConsoleProcess`` (as 5.10's pip_install does), a
    thread reads its output, and the GUI thread keeps processing events under a progress dialog that shows
    pip's latest line; Cancel ends pip. Failure: Slicer's error popup with pip's log, then CalledProcessError."""
    import os
    import shutil
    import subprocess
    import sys
    import threading
    import time

    import slicer

    python = shutil.which("PythonSlicer") or os.path.join(os.path.dirname(sys.executable), "PythonSlicer")
    proc = slicer.util.launchConsoleProcess([python, "-m", "pip", *pip_args], useStartupEnvironment=False)
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    dialog = slicer.util.createProgressDialog(windowTitle=f"{REQUESTER} - Installing Python packages",
                                              labelText="Installing Python packages…", maximum=0)
    try:
        while proc.poll() is None or reader.is_alive():
            if dialog.wasCanceled and proc.poll() is None:
                proc.terminate()
            if lines:
                dialog.labelText = lines[-1][:120]
            slicer.app.processEvents()
            time.sleep(0.05)
    finally:
        dialog.close()
    print("\n".join(lines))  # the Python console keeps pip's log
    if proc.returncode != 0:
        slicer.util.errorDisplay("Package installation failed.", windowTitle=f"{REQUESTER} - Installation failed",
                                 detailedText="\n".join(lines))
        raise subprocess.CalledProcessError(proc.returncode, proc.args)


def _clean_copy(core_lib: Path, target: Path) -> Path:
    """The bundled core_lib copied for pip: pip builds a local folder in place (setuptools writes build/ and
    *.egg-info into it, and a stale build/lib can carry files the sources no longer have), and the extension's
    folder may be read-only. The copy holds only what the build needs."""
    shutil.copytree(core_lib, target, ignore=shutil.ignore_patterns(
        "__pycache__", "*.pyc", "*.egg-info", "build", "dist", "tests", ".*"))
    return target


def install(plan: InstallPlan) -> None:
    """Carry out ``plan`` (no questions asked): torch first, so that pip then finds it installed."""
    import subprocess

    if plan.problems:
        raise DependencyError("\n".join(plan.problems))
    if plan.torch == "extension":
        _install_torch_with_extension(plan.torch_requirement, plan.torchvision_requirement)
    pip_args = []
    if plan.torch == "pip":
        pip_args.append(f"torch{plan.torch_requirement}")
    if pip_args or plan.core_lib is not None:
        with tempfile.TemporaryDirectory(prefix="dinoseg-pip-") as folder:
            calls = []
            if plan.core_lib is not None:
                copy = str(_clean_copy(plan.core_lib, Path(folder) / "core_lib"))
                unmanaged = unmanaged_slicer_packages()
                if unmanaged:
                    # a package Slicer ships without pip metadata (a constraint cannot protect it): core_lib
                    # without its dependencies, then those dependencies but that package
                    calls.append(["--no-deps", copy])
                    pip_args += [r for r in core_lib_requirements(plan.core_lib)
                                 if _requirement_name(r) not in {_canonical(n) for n in unmanaged}]
                else:
                    pip_args.append(copy)
            if pip_args:
                calls.append(pip_args)
            constraints = Path(folder) / "constraints.txt"
            # torch is being installed from the index: do not pin the old one
            keep = [line for line in constraints_text().splitlines()
                    if not (plan.torch == "pip" and line.startswith("torch=="))]
            constraints.write_text("".join(line + "\n" for line in keep))
            for args in calls:
                try:
                    _pip_install(args, constraints)
                except subprocess.CalledProcessError as exc:
                    raise DependencyError(
                        f"pip could not install {' and '.join(plan.describe())} (pip exited with status "
                        f"{exc.returncode}). The Python console shows pip's messages. Check the network connection; "
                        f"if pip reports a conflict with Slicer's own packages ({', '.join(SLICER_PACKAGES)}), "
                        "please report it.") from exc
    importlib.invalidate_caches()


def ensure_dependencies(confirm=None, force: bool = False, core_lib: Path | None = None) -> bool:
    """Install what is missing or outdated after ONE ``confirm(message) -> bool`` (when given).
    True when everything is ready; False when the user declined (nothing is raised then).
    Raises DependencyError with a clear message when something cannot be installed."""
    plan = plan_installation(force=force, core_lib=core_lib)
    if plan.problems:
        raise DependencyError("\n".join(plan.problems))
    if plan.empty:
        return True
    message = ("DINOSeg needs to install:\n" + "\n".join(f"- {line}" for line in plan.describe())
               + "\n\nThis needs a network connection, takes a few minutes and a few GB of disk, and modifies "
                 "Slicer's Python environment. Install now?")
    if confirm is not None and not confirm(message):
        return False
    install(plan)
    after = plan_installation(core_lib=core_lib)
    if not after.empty:
        raise DependencyError("After the installation, DINOSeg still misses: " + "; ".join(after.describe()))
    return True


def ensure_in_slicer(force: bool = False, core_lib: Path | None = None) -> bool:
    """``ensure_dependencies`` with Slicer's confirmation dialog (the one question the user is asked)."""
    import slicer

    def confirm(message: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(message, f"{REQUESTER} - Install Python packages")

    return ensure_dependencies(confirm=confirm, force=force, core_lib=core_lib)
