"""Where the modules' help text points: the README (section "In 3D Slicer").

No public web address of the project exists yet, so the link is the README file itself: the copy the extension
installs beside the modules (top-level CMakeLists.txt), else the source checkout's. Replace it with the
repository's address once the project is published.
"""
from __future__ import annotations

from pathlib import Path

MODULES_DIR = Path(__file__).resolve().parents[1]  # the folder of DINOSeg.py (installed: qt-scripted-modules)


def readme_url() -> str:
    """A file:// URL of the README, the installed copy first."""
    candidates = (MODULES_DIR / "Resources" / "README.md", MODULES_DIR.parent / "README.md")
    return next((p for p in candidates if p.is_file()), candidates[-1]).as_uri()
