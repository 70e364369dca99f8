"""Dependency planning inside Slicer (what would be installed), checked in the project's environment."""
from __future__ import annotations


from DINOSegLib import dependencies


def test_bundled_core_lib_is_found():
    core_lib = dependencies.bundled_core_lib()
    assert core_lib is not None and (core_lib / "src" / "dinomed" / "__init__.py").is_file()
    import dinomed

    assert dependencies.core_lib_version(core_lib) == dinomed.__version__


def test_nothing_to_install_where_dinomed_and_torch_are_present():
    plan = dependencies.plan_installation()
    assert plan.empty, plan


def test_local_core_lib_becomes_a_direct_reference(tmp_path):
    strings = dependencies.requirement_strings([str(tmp_path), "scipy>=1.10"])
    assert strings == [f"dinomed @ {tmp_path.resolve().as_uri()}", "scipy>=1.10"]
    from packaging.requirements import Requirement

    assert Requirement(strings[0]).url == tmp_path.resolve().as_uri()
