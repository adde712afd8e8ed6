"""The Dockerfile installs Ray only when asked (--build-arg EXTRAS=export,ray): the default image stays
as it was, and the Ray image the RayJob runs (k8s/base/infer-ray) has Ray.

The Dockerfile is read as Docker reads it: its ARG defaults, overridden by --build-arg values, are
substituted into the `pip install ".[...]"` that installs the dependencies, and the extras it names are
resolved through pyproject.toml (an extra may name others: cut-pipeline[export,lake,ray])."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NAME = PYPROJECT["project"]["name"]
VERSION = PYPROJECT["project"]["version"]


def build_args(given: dict[str, str]) -> dict[str, str]:
    """The ARG values of a build: the Dockerfile's defaults, overridden by --build-arg."""
    defaults = dict(re.findall(r"^ARG (\w+)=(\S*)$", DOCKERFILE, re.M))
    unknown = set(given) - set(defaults)
    assert not unknown, f"the Dockerfile declares no ARG {unknown}"
    return {**defaults, **given}


def installed_extras(given: dict[str, str]) -> list[str]:
    """The extras of the package that the dependency layer's pip install asks for."""
    args = build_args(given)
    (spec,) = re.findall(r"pip install -c \S+ (\S*\.\[\S*\]\S*)", DOCKERFILE)
    spec = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], shlex.split(spec)[0])
    return re.fullmatch(r"\.\[([^\]]*)\]", spec).group(1).split(",")


def requirements(extras: list[str]) -> set[str]:
    """The distributions the package's dependencies and these extras bring in (names, lower case)."""
    optional = PYPROJECT["project"]["optional-dependencies"]
    wanted, seen, out = list(extras), set(), {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    while wanted:
        extra = wanted.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"pyproject.toml has no extra {extra!r}"
        for req in optional[extra]:
            own = re.fullmatch(rf"{NAME}\[([^\]]+)\]", req)
            if own:
                wanted += own.group(1).split(",")
            else:
                out.add(_name(req))
    return out


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def documented_ray_build() -> dict[str, str]:
    """The build arguments and tag of the Ray image, from the build command in the Dockerfile's header."""
    (line,) = [line for line in DOCKERFILE.splitlines() if line.startswith("#") and "EXTRAS=" in line
               and "docker build" in line]
    words = shlex.split(line.lstrip("# ").split("#")[0])
    given = dict(w.split("=", 1) for a, w in itertools.pairwise(words) if a == "--build-arg")
    tag = words[words.index("-t") + 1]
    return {"tag": tag, **given}


def test_the_default_image_has_no_ray() -> None:
    assert installed_extras({}) == ["export"], "the default build installs what it installed before"
    assert "ray" not in requirements(installed_extras({}))


def test_the_extras_argument_installs_ray_beside_the_default() -> None:
    extras = installed_extras({"EXTRAS": "export,ray"})
    assert "ray" in requirements(extras)
    assert requirements(installed_extras({})) < requirements(extras), "the Ray image is the default plus Ray"
    # the build checks what it installed, Ray included when asked
    assert re.search(r'case ",\$\{EXTRAS\}," in \*,ray,\*\).*import ray\.data', DOCKERFILE)


def test_the_documented_ray_build_makes_the_image_the_rayjob_runs() -> None:
    """k8s/base/infer-ray runs cut-pipeline:<version>-ray (tests/test_k8s.py holds the manifests to it)."""
    build = documented_ray_build()
    assert build.pop("tag") == f"{NAME}:{VERSION}-ray"
    assert "ray" in requirements(installed_extras(build))
    rayjob = (ROOT / "k8s" / "base" / "infer-ray" / "rayjob.yaml").read_text()
    assert set(re.findall(r"image: (\S+)", rayjob)) == {f"{NAME}:{VERSION}-ray"}


def test_an_unknown_build_argument_or_extra_is_an_error() -> None:
    with pytest.raises(AssertionError, match="no ARG"):
        build_args({"EXTRA": "ray"})
    with pytest.raises(AssertionError, match="no extra"):
        requirements(installed_extras({"EXTRAS": "export,rays"}))
