"""DINOSeg's dependency installation, run through Slicer's REAL packaging.py and util.py.

Each scenario runs in a child Python whose ``slicer`` package holds Slicer's unmodified ``util.py`` and
``packaging.py`` (copied from ../shared/slicer-reference) beside a stand-in ``slicer.app``; only the pip process
(``PythonSlicer -m pip``) is a recorder (Testing/slicer_standins/pip_recorder.py) that logs its command line and
writes the metadata pip would write. The tests show what pip is asked to do, and which dialogs the user sees,
in each case: fresh install with and without the PyTorch extension, up to date, after an extension update,
user declines, pip fails, bundled copy missing, and Slicer 5.10 (no slicer.packaging).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from DINOSegLib import dependencies

ROOT = Path(__file__).resolve().parents[1]
STANDINS = Path(__file__).resolve().parent / "slicer_standins"
REFERENCE = ROOT.parent / "shared" / "slicer-reference" / "Base" / "Python" / "slicer"
DEPENDENCIES_PY = ROOT / "DINOSeg" / "DINOSegLib" / "dependencies.py"
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "packaging.py").is_file(),
    reason=f"Slicer's packaging.py/util.py are read from {REFERENCE}, which is absent (../shared not mounted)")

def _load_pip_recorder():
    """The recorder's helpers, loaded by path: STANDINS must not go on sys.path (its `slicer`, `qt` and `ctk`
    stand-ins would shadow the slicer-core wheel that the other tests use)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dinoseg_pip_recorder", STANDINS / "pip_recorder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pip_recorder = _load_pip_recorder()

SLICER_NUMPY, SLICER_SITK = "2.2.6", "2.5.3"  # what a Slicer install ships (any versions do)


def copy_core_lib(target: Path) -> Path:
    """The bundled core_lib as the extension ships it: pyproject.toml and the package sources."""
    source = dependencies.bundled_core_lib()
    target.mkdir(parents=True)
    shutil.copy2(source / "pyproject.toml", target / "pyproject.toml")
    shutil.copytree(source / "src" / "dinomed", target / "src" / "dinomed",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


class StandInSlicer:
    """A Slicer installation for one test: a site folder with what is installed, the stand-ins with Slicer's
    real util.py/packaging.py, and ``PythonSlicer`` on PATH being the pip recorder."""

    def __init__(self, tmp: Path, version: str = "5.13", pytorch_extension: bool = False):
        self.tmp, self.version = tmp, version
        self.site = tmp / "site-packages"
        self.site.mkdir()
        self.log = tmp / "pip-calls.jsonl"
        self.core_lib = copy_core_lib(tmp / "extension" / "core_lib")
        stubs = tmp / "stubs"
        shutil.copytree(STANDINS, stubs, ignore=shutil.ignore_patterns("__pycache__", "PyTorchUtils.py", "*.md"))
        shutil.copy2(REFERENCE / "util.py", stubs / "slicer" / "util.py")
        if version != "5.10":  # slicer.packaging exists since 5.11
            shutil.copy2(REFERENCE / "packaging.py", stubs / "slicer" / "packaging.py")
        if pytorch_extension:
            shutil.copy2(STANDINS / "PyTorchUtils.py", stubs / "PyTorchUtils.py")
        libs = tmp / "libs"  # the `packaging` library only, without the test environment's other packages
        libs.mkdir()
        import packaging

        os.symlink(Path(packaging.__file__).parent, libs / "packaging")
        bindir = tmp / "bin"
        bindir.mkdir()
        recorder = bindir / "PythonSlicer"
        recorder.write_text(f"#!/bin/sh\nexec {sys.executable} -S {stubs / 'pip_recorder.py'} \"$@\"\n")
        recorder.chmod(recorder.stat().st_mode | stat.S_IEXEC)
        self.pythonpath = os.pathsep.join(str(p) for p in (stubs, libs, self.site))
        self.path = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
        # what Slicer itself ships
        pip_recorder.write_distribution(self.site, "numpy", SLICER_NUMPY)
        pip_recorder.write_distribution(self.site, "SimpleITK", SLICER_SITK)

    def install_as_pip_would(self):
        """core_lib installed from the bundled folder with all its dependencies (a previous session)."""
        pip_recorder.install_project(self.site, self.core_lib)

    def run(self, answers=(), force=False, fail=False, api="new", dependencies_py=DEPENDENCIES_PY, core_lib=None):
        scenario = {"slicer": self.version, "answers": list(answers), "force": force, "api": api,
                    "dependencies_py": str(dependencies_py), "core_lib": str(core_lib or self.core_lib)}
        env = {"PATH": self.path, "PYTHONPATH": self.pythonpath, "DINOSEG_SCENARIO": json.dumps(scenario),
               "PIP_RECORDER_SITE": str(self.site), "PIP_RECORDER_LOG": str(self.log),
               "PIP_RECORDER_FAIL": "1" if fail else "0", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.run([sys.executable, "-S", str(self.tmp / "stubs" / "run_dependencies.py")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outcome = json.loads(proc.stdout.strip().splitlines()[-1])
        outcome["calls"] = [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []
        outcome["log"] = proc.stderr
        return outcome

    def installed(self, name):
        return dependencies.installed_version(name, path=[str(self.site)])


BUNDLED = "<the bundled core_lib>"


def pip_args(call, bundle: Path):
    """A recorded pip command line without the (temporary) constraints file name, a project folder whose files
    are exactly the bundled core_lib's written as BUNDLED (DINOSeg hands pip a clean temporary copy)."""
    args = list(call["args"])
    if "-c" in args:
        del args[args.index("-c"):args.index("-c") + 2]
    same = pip_recorder.project_fingerprint(bundle)
    for i, arg in enumerate(args):
        if call["projects"].get(arg) == same:
            assert Path(arg) != bundle, "pip must build a copy, not the extension's folder"
            args[i] = BUNDLED
    return args


@pytest.fixture
def slicer_513(tmp_path):
    return StandInSlicer(tmp_path, "5.13")


@needs_reference
def test_fresh_install_without_pytorch_extension(slicer_513):
    """One confirmation; torch from the index and core_lib from the bundled folder, in ONE pip call through
    slicer.packaging.pip_install (progress dialog); Slicer's numpy and SimpleITK pinned by a constraints file."""
    out = slicer_513.run(answers=["ok"])
    assert out["error"] is None and out["result"] is True, out
    assert len(out["dialogs"]) == 1
    dialog = out["dialogs"][0]
    assert dialog["title"] == "DINOSeg - Install Python packages"
    assert "PyTorch (torch>=2.4) from the Python package index" in dialog["text"]
    assert "core library (dinomed) from the copy bundled with the extension (not installed)" in dialog["text"]
    assert [pip_args(c, slicer_513.core_lib) for c in out["calls"]] == [["install", "torch>=2.4", BUNDLED]]
    assert out["calls"][0]["constraints"] == f"SimpleITK=={SLICER_SITK}\nnumpy=={SLICER_NUMPY}\n"
    assert not any("dinomed" in a for a in pip_args(out["calls"][0], slicer_513.core_lib))  # never from the index
    assert slicer_513.installed("dinomed") == dependencies.core_lib_version(slicer_513.core_lib)
    assert out["cursors_left"] == 0


@needs_reference
def test_fresh_install_with_pytorch_extension(tmp_path):
    """torch through PyTorchUtils (no second question: askConfirmation=False), then core_lib with pip, with the
    extension's torch pinned so that pip cannot replace the CUDA build."""
    slicer = StandInSlicer(tmp_path, "5.13", pytorch_extension=True)
    out = slicer.run(answers=["ok"])
    assert out["error"] is None and out["result"] is True, out
    assert len(out["dialogs"]) == 1 and "through the PyTorch extension" in out["dialogs"][0]["text"]
    assert out["calls"][0] == {"PyTorchUtils.installTorch": {
        "askConfirmation": False, "torchVersionRequirement": ">=2.4", "torchvisionVersionRequirement": ">=0.19"}}
    assert [pip_args(c, slicer.core_lib) for c in out["calls"][1:]] == [["install", BUNDLED]]
    assert "torch==2.9.1+cu128\n" in out["calls"][1]["constraints"]
    assert slicer.installed("torch") == "2.9.1+cu128"


@needs_reference
def test_up_to_date_asks_nothing_and_runs_no_pip(slicer_513):
    slicer_513.install_as_pip_would()
    out = slicer_513.run(answers=["cancel"])
    assert out["result"] is True and out["error"] is None
    assert out["dialogs"] == [] and out["calls"] == []


@needs_reference
@pytest.mark.parametrize("change", ["source", "version"])
def test_extension_update_reinstalls_the_bundled_core_lib(slicer_513, change):
    """The extension was updated: the bundled core_lib has other sources (same version number) or another
    version. pip reinstalls it from the bundled folder (pip reinstalls a local folder even at the same version);
    torch is left alone."""
    slicer_513.install_as_pip_would()
    if change == "source":
        cli = slicer_513.core_lib / "src" / "dinomed" / "cli.py"
        cli.write_text(cli.read_text() + "\n# changed in the extension update\n")
        reason = "the bundled copy changed (dinomed/cli.py)"
    else:
        pyproject = slicer_513.core_lib / "pyproject.toml"
        pyproject.write_text(pyproject.read_text().replace('version = "', 'version = "9', 1))
        reason = f"installed {slicer_513.installed('dinomed')}, bundled 9{slicer_513.installed('dinomed')}"
    out = slicer_513.run(answers=["ok"])
    assert out["error"] is None and out["result"] is True, out
    assert len(out["dialogs"]) == 1 and reason in out["dialogs"][0]["text"] and "PyTorch" not in out["dialogs"][0]["text"]
    assert [pip_args(c, slicer_513.core_lib) for c in out["calls"]] == [["install", BUNDLED]]
    assert "torch==2.4\n" in out["calls"][0]["constraints"]  # the installed torch is kept
    assert slicer_513.run()["calls"] == out["calls"]  # now current: a second run installs nothing more


@needs_reference
def test_simpleitk_without_metadata_is_left_alone(slicer_513):
    """Where Slicer's SimpleITK is importable but has no pip metadata (a constraint cannot pin it), core_lib
    goes in with --no-deps and then its dependencies without SimpleITK."""
    shutil.rmtree(next(slicer_513.site.glob("SimpleITK-*.dist-info")))
    (slicer_513.site / "SimpleITK").mkdir()
    (slicer_513.site / "SimpleITK" / "__init__.py").write_text("")
    out = slicer_513.run(answers=["ok"])
    assert out["result"] is True and out["error"] is None, out
    calls = [pip_args(c, slicer_513.core_lib) for c in out["calls"]]
    assert calls[0] == ["install", "--no-deps", BUNDLED]
    assert calls[1][:2] == ["install", "torch>=2.4"] and "monai>=1.4" in calls[1]
    assert not any(a.lower().startswith("simpleitk") for call in calls for a in call)
    assert f"numpy=={SLICER_NUMPY}" in out["calls"][1]["constraints"]


@needs_reference
def test_user_declines_returns_false_without_error_or_pip(slicer_513):
    out = slicer_513.run(answers=["cancel"])
    assert out["result"] is False and out["error"] is None
    assert len(out["dialogs"]) == 1 and out["calls"] == []
    assert slicer_513.installed("dinomed") is None


@needs_reference
def test_install_button_reinstalls_a_current_core_lib(slicer_513):
    slicer_513.install_as_pip_would()
    out = slicer_513.run(answers=["ok"], force=True)
    assert out["result"] is True and "reinstall requested" in out["dialogs"][0]["text"]
    assert [pip_args(c, slicer_513.core_lib) for c in out["calls"]] == [["install", BUNDLED]]


@needs_reference
def test_pip_failure_gives_a_clear_message(slicer_513):
    """Slicer's own error dialog with pip's log, then DINOSeg's message saying what could not be installed."""
    out = slicer_513.run(answers=["ok"], fail=True)
    assert out["result"] is None
    assert out["error"].startswith("DependencyError: pip could not install PyTorch (torch>=2.4) from the Python package index")
    assert "exited with status 1" in out["error"]
    assert [d["text"] for d in out["dialogs"]][1] == "Package installation failed."
    assert "ResolutionImpossible" in out["dialogs"][1]["detailedText"]
    assert slicer_513.installed("dinomed") is None


@needs_reference
def test_slicer_5_10_pip_failure_gives_a_clear_message(tmp_path):
    slicer = StandInSlicer(tmp_path, "5.10")
    out = slicer.run(answers=["ok"], fail=True)
    assert out["error"].startswith("DependencyError: pip could not install")
    assert [d["text"] for d in out["dialogs"]][1] == "Package installation failed."
    assert "ResolutionImpossible" in out["dialogs"][1]["detailedText"]


@needs_reference
def test_pytorch_extension_failure_gives_a_clear_message_and_stops(tmp_path):
    slicer = StandInSlicer(tmp_path, "5.13", pytorch_extension=True)
    out = slicer.run(answers=["ok"], fail=True)
    assert out["error"].startswith("DependencyError: PyTorch could not be installed through the PyTorch extension")
    assert [c for c in out["calls"] if "args" in c] == []  # core_lib is not installed without its torch


@needs_reference
def test_too_old_torch_is_upgraded_from_the_index(slicer_513):
    slicer_513.install_as_pip_would()
    pip_recorder.write_distribution(slicer_513.site, "torch", "2.1.0")
    out = slicer_513.run(answers=["ok"])
    assert out["result"] is True and "replacing 2.1.0" in out["dialogs"][0]["text"]
    assert [pip_args(c, slicer_513.core_lib) for c in out["calls"]] == [["install", "torch>=2.4"]]
    assert "torch==" not in out["calls"][0]["constraints"]  # the old torch is not pinned


@needs_reference
def test_missing_bundled_core_lib_is_reported_and_nothing_comes_from_the_index(slicer_513, tmp_path):
    out = slicer_513.run(answers=["ok"], core_lib=tmp_path / "nowhere")
    assert out["error"].startswith("DependencyError: The DINOSeg extension is incomplete")
    assert str(tmp_path / "nowhere") in out["error"] and "Extensions Manager" in out["error"]
    assert out["calls"] == [] and out["dialogs"] == []


@needs_reference
@pytest.mark.parametrize("pytorch_extension", [False, True])
def test_slicer_5_10_without_slicer_packaging(tmp_path, pytorch_extension):
    """5.10: the same requirements and a -c constraints argument, pip started through slicer.util's
    launchConsoleProcess and watched from a progress dialog (5.10's own pip_install would freeze Slicer)."""
    slicer = StandInSlicer(tmp_path, "5.10", pytorch_extension=pytorch_extension)
    out = slicer.run(answers=["ok"])
    assert "5.10 pip_install called" not in out["log"]
    assert out["error"] is None and out["result"] is True, out
    assert len(out["dialogs"]) == 1
    pip_calls = [c for c in out["calls"] if "args" in c]
    expected = ["install", BUNDLED] if pytorch_extension else ["install", "torch>=2.4", BUNDLED]
    assert [pip_args(c, slicer.core_lib) for c in pip_calls] == [expected]
    assert pip_calls[0]["args"][-2] == "-c" and f"numpy=={SLICER_NUMPY}" in pip_calls[0]["constraints"]
    assert slicer.installed("dinomed") is not None
    slicer.log.unlink()
    again = slicer.run(answers=["cancel"])
    assert again["result"] is True and again["dialogs"] == [] and again["calls"] == []


# -- the comparison of the installed distribution with the bundled copy, in this process -------------------

def test_bundled_core_lib_is_found():
    core_lib = dependencies.bundled_core_lib()
    assert core_lib is not None and (core_lib / "src" / "dinomed" / "__init__.py").is_file()
    import dinomed

    assert dependencies.core_lib_version(core_lib) == dinomed.__version__


def test_editable_install_is_current_only_for_the_bundled_folder(tmp_path):
    core_lib = copy_core_lib(tmp_path / "core_lib")
    site = tmp_path / "site"
    version = dependencies.core_lib_version(core_lib)
    pip_recorder.write_distribution(site, "dinomed", version, direct_url={"url": core_lib.as_uri(), "dir_info": {"editable": True}})
    assert dependencies.core_lib_status(core_lib, path=[str(site)]).current
    pip_recorder.write_distribution(site, "dinomed", version, direct_url={"url": (tmp_path / "other").as_uri(), "dir_info": {"editable": True}})
    status = dependencies.core_lib_status(core_lib, path=[str(site)])
    assert not status.current and "editable install" in status.reason


@pytest.mark.slow
def test_a_real_pip_install_of_the_bundled_core_lib_is_recognised(tmp_path):
    """Real pip (no network: --no-deps --no-build-isolation) installs the bundled copy into a folder; its RECORD
    hashes match the bundle; a changed bundled file is detected."""
    core_lib = copy_core_lib(tmp_path / "core_lib")
    shutil.copy2(dependencies.bundled_core_lib() / "README.md", core_lib / "README.md")
    target = tmp_path / "target"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "--target", str(target), str(core_lib)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    status = dependencies.core_lib_status(core_lib, path=[str(target)])
    assert status.current, status
    (core_lib / "src" / "dinomed" / "events.py").write_text("# changed\n")
    status = dependencies.core_lib_status(core_lib, path=[str(target)])
    assert not status.current and "dinomed/events.py" in status.reason
