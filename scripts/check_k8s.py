"""Validate Kubernetes manifests with kubernetes-validate, strictly, custom resources included.

kubernetes-validate has no option for extra schemas: it looks a resource's schema up inside its
own package, as ``kubernetes-json-schema/v<version>-local-strict/<kind>-<group>-<version>.json``
(``<group>`` being the API group's first label, e.g. ``scaledobject-keda-v1alpha1.json`` for a
``keda.sh/v1alpha1`` ScaledObject). This wraps that look-up: a file of the same name in
``--schemas`` is used when one is there, so a custom resource is checked like a built-in one,
and its schema may ``$ref`` Kubernetes' own definitions (``_definitions.json``). The tool only
warns about a resource it has no schema for; here that is a failure, so a new kind cannot pass
unchecked.

Usage: ``python scripts/check_k8s.py --schemas deploy/k8s/schemas deploy/k8s/*.yaml``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kubernetes_validate.utils as kv


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


def use_schemas(directory: Path) -> None:
    """Make kubernetes-validate read the schemas in ``directory`` before its own."""
    extra = {path.name: path for path in directory.glob("*.json")}
    packaged = kv.schema_contents

    def schema_contents(filename: str, desired_version: str) -> Any:
        path = extra.get(Path(filename).name)
        if path is None:
            return packaged(filename, desired_version)
        return json.loads(path.read_text())

    kv.schema_contents = schema_contents


def check(paths: Sequence[Path], version: str) -> int:
    """Validate every resource of every file; the number of failures."""
    failures = 0
    for path in paths:
        resources = kv.resources_from_file(str(path))
        if not resources:
            _say(f"ERROR {path}: no resource")
            failures += 1
        for resource in resources:
            name = f"{path}: {kv.kn(resource)}"
            try:
                checked = kv.validate(resource, version, strict=True)
            except kv.ValidationError as exc:
                where = ".".join(str(item) for item in exc.path) or "(top level)"
                _say(f"ERROR {name}: {where}: {exc.message}")
                failures += 1
            except kv.SchemaNotFoundError as exc:
                _say(f"ERROR {name}: {exc.message}")
                failures += 1
            else:
                _say(f"ok    {name} (Kubernetes {checked}, strict)")
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemas", type=Path, required=True, help="extra JSON schemas")
    parser.add_argument(
        "-k", "--kubernetes-version", default=kv.latest_version(), help="default: the latest"
    )
    parser.add_argument("manifests", nargs="+", type=Path)
    args = parser.parse_args(argv)
    use_schemas(args.schemas)
    return 1 if check(args.manifests, args.kubernetes_version) else 0


if __name__ == "__main__":
    sys.exit(main())
