"""Write deploy/requirements.txt: exact pins of kflow's runtime dependency closure, as installed here.

Run from a virtualenv where kflow is installed with every extra (``pip install -e '.[all]'``) after
changing ``[project].dependencies`` or the extras; the image runs every role (engine, worker,
connectors, visibility), so it pins the closure of the dependencies plus the ``all`` extra. The
image installs exactly these versions, and
``tests/unit/test_deploy_files.py`` fails when a runtime dependency is not pinned.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
HEADER = ["# Exact pins of kflow's runtime dependencies (the closure of [project].dependencies) for the image.",
          "# Regenerate after changing dependencies: python deploy/lock.py (from a venv with kflow installed).", ""]


def closure(requirements: list[str]) -> dict[str, tuple[str, set[str]]]:
    """Installed ``name -> (version, extras)`` of ``requirements`` and everything they need on this platform."""
    env = default_environment()
    seen: dict[str, tuple[str, set[str]]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            raise SystemExit(f"{req} is not installed: pip install -e '.[all]' first") from None
        key = dist.metadata["Name"].lower().replace("_", "-")
        extras = set(req.extras)
        if key in seen and extras <= seen[key][1]:
            continue
        seen[key] = (dist.version, seen.get(key, (dist.version, set()))[1] | extras)
        for line in dist.requires or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in (seen[key][1] or {""})):
                todo.append(dep)
    return seen


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    deps = list(project["dependencies"])
    for name in ("all",):
        for req in extras[name]:  # "kflow[mqtt,sql,...]": the extras it names, expanded
            r = Requirement(req)
            deps += [d for extra in r.extras for d in extras[extra]] if r.name == project["name"] else [req]
    pins = closure(deps)
    lines = HEADER + [f"{name}{'[' + ','.join(sorted(extras)) + ']' if extras else ''}=={version}"
                      for name, (version, extras) in sorted(pins.items())]
    (ROOT / "deploy" / "requirements.txt").write_text("\n".join(lines) + "\n")
    print(f"pinned {len(pins)} packages")


if __name__ == "__main__":
    main()
