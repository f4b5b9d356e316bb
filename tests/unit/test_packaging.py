"""Installs: minimum versions in the package, exact ones in constraints.txt, and they agree."""

from __future__ import annotations

import tomllib

from helpers import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra if not r.startswith("bonnerlab")]
    return reqs


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt pins exact versions only: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_package_declares_minimum_versions_only():
    # An exact torch pin would make `pip install -e .` replace a lab's own CUDA build of torch.
    for req in _requirements():
        # exactly one specifier, a minimum: no specifier at all (any version) is as wrong as a pin
        assert [spec.operator for spec in req.specifier] == [">="], f"{req}: declare a minimum (>=)"


def test_constraints_pin_every_requirement_within_its_minimum():
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} has no exact version in constraints.txt"
        assert req.specifier.contains(pins[name]), (
            f"constraints.txt {name}=={pins[name]} breaks {req}"
        )
    assert pins["torch"] == Version("2.14.1") and pins["torchvision"] == Version("0.29.1")


def test_install_paths_use_the_constraints():
    assert "-c constraints.txt -e '.[dev,all]'" in (REPO / "Makefile").read_text()
    assert "- -c constraints.txt" in (REPO / "environment.yml").read_text()
