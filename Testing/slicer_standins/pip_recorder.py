"""Stand-in for ``PythonSlicer -m pip``: the one process Slicer's packaging code starts.

Run as ``PythonSlicer`` (a wrapper script on PATH), it appends its command line, the text of any
constraints file and a fingerprint of any project folder it is given, to ``$PIP_RECORDER_LOG`` (JSON lines), prints what pip would print, and writes into
``$PIP_RECORDER_SITE`` the distribution metadata that pip would leave there: METADATA, RECORD (with the
sha256 of each installed file, as pip writes it) and direct_url.json for a local project folder, so that
importlib.metadata (and Slicer's pip_check) see the result. ``$PIP_RECORDER_FAIL=1``: print a resolver
error and exit 1. The same helpers build the "already installed" states of a test.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
from pathlib import Path


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_distribution(site: Path, name: str, version: str, requires=(), files: dict[str, bytes] | None = None,
                       direct_url: dict | None = None) -> None:
    """The ``<name>-<version>.dist-info`` folder pip writes (any older one of that name removed first)."""
    for old in site.glob("*.dist-info"):
        if old.name.split("-")[0].lower().replace("_", "-") == name.lower().replace("_", "-"):
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    (info / "METADATA").write_text(metadata)
    rows = [f"{path},{_record_hash(data)},{len(data)}" for path, data in (files or {}).items()]
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))
        rows.append(f"{info.name}/direct_url.json,,")
    rows += [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(rows) + "\n")


def install_project(site: Path, folder: Path, no_deps: bool = False) -> list[tuple[str, str]]:
    """What ``pip install <folder>`` leaves for the core_lib project, plus any of its missing dependencies
    (at the lowest version they allow). Returns the (name, version) pairs installed."""
    import tomllib

    project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    src = folder / "src"
    files = {p.relative_to(src).as_posix(): p.read_bytes() for p in sorted((src / project["name"]).rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts}
    write_distribution(site, project["name"], project["version"], project.get("dependencies", []), files,
                       {"url": folder.resolve().as_uri(), "dir_info": {}})
    installed = [(project["name"], project["version"])]
    for requirement in [] if no_deps else project.get("dependencies", []):
        installed += install_requirement(site, requirement, only_if_missing=True)
    return installed


def install_requirement(site: Path, requirement: str, only_if_missing: bool = False) -> list[tuple[str, str]]:
    match = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:[>=~]=?\s*([0-9][0-9A-Za-z.+]*))?", requirement.strip())
    name, version = match.group(1), match.group(2) or "1.0"
    if only_if_missing and any(p.name.split("-")[0].lower().replace("_", "-") == name.lower().replace("_", "-")
                               for p in site.glob("*.dist-info")):
        return []
    write_distribution(site, name, version)
    return [(name, version)]


def project_fingerprint(folder: Path) -> str:
    """sha256 over a project folder's pyproject.toml and src/ files (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted([folder / "pyproject.toml", *(p for p in (folder / "src").rglob("*") if p.is_file())]):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def main(argv: list[str]) -> int:
    site, log = Path(os.environ["PIP_RECORDER_SITE"]), Path(os.environ["PIP_RECORDER_LOG"])
    assert argv[:2] == ["-m", "pip"], argv
    args = argv[2:]
    constraints = None
    if "-c" in args:
        constraints = Path(args[args.index("-c") + 1]).read_text()
    projects = {a: project_fingerprint(Path(a)) for a in args if (Path(a) / "pyproject.toml").is_file()}
    with log.open("a") as handle:
        handle.write(json.dumps({"args": args, "constraints": constraints, "projects": projects}) + "\n")
    if os.environ.get("PIP_RECORDER_FAIL") == "1":
        print("ERROR: ResolutionImpossible: the requirements conflict with the constraints")
        return 1
    if args[0] != "install":
        return 0
    installed = []
    skip_next = False
    for arg in args[1:]:
        if skip_next or arg.startswith("-"):
            skip_next = arg in ("-c", "-r", "--index-url", "--extra-index-url")
            continue
        path = Path(arg)
        installed += (install_project(site, path, no_deps="--no-deps" in args) if (path / "pyproject.toml").is_file()
                      else install_requirement(site, arg))
    print("Successfully installed " + " ".join(f"{n}-{v}" for n, v in installed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
