"""Check real responses against the OpenAPI document served at ``/openapi.json``.

:class:`ResponseChecker` finds the operation a request hit (path template and method), the
response documented for its status (or ``default``), and checks the answer against it: the
media type, the JSON body against its schema (JSON Schema 2020-12 through
openapi-schema-validator's OAS 3.1 validator, ``$ref``s resolved inside the document), and every
documented header (present when required, valid when present). It also records which operations
were exercised, so a test can insist on all of them.

Used by the unit tests (Flask test client) and the integration test (a real server).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from openapi_schema_validator import OAS31Validator, oas31_format_checker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

BASE_URI = "urn:batchsvc:openapi"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


@dataclass
class ResponseChecker:
    document: dict[str, Any]
    #: Path prefix of the server (``/v1`` paths of the document sit below the base URL's root).
    seen: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        resource = Resource.from_contents(self.document, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource(BASE_URI, resource)
        self.templates = [
            (re.compile("^" + re.sub(r"\{[^/}]+\}", "[^/]+", path) + "$"), path)
            for path in self.document["paths"]
        ]

    # -- navigation ---------------------------------------------------------------------------

    def _deref(self, node: dict[str, Any], pointer: str) -> tuple[dict[str, Any], str]:
        """Follow a local ``$ref`` (one hop, as OpenAPI component references are)."""
        ref = node.get("$ref")
        if ref is None:
            return node, pointer
        assert ref.startswith("#/"), ref
        target: Any = self.document
        for token in ref[2:].split("/"):
            target = target[token.replace("~1", "/").replace("~0", "~")]
        return target, ref[1:]

    def operations(self) -> set[tuple[str, str]]:
        """Every documented (method, path template)."""
        return {
            (method, path)
            for path, item in self.document["paths"].items()
            for method in item
            if method in METHODS
        }

    def template(self, path: str) -> str:
        matches = [template for regex, template in self.templates if regex.match(path)]
        assert matches, f"{path} is not a documented path"
        # A literal path wins over a template (/v1/files vs /v1/files/{file_id}).
        return min(matches, key=lambda t: t.count("{"))

    # -- checking -----------------------------------------------------------------------------

    def validate(self, instance: Any, pointer: str) -> None:
        """Validate ``instance`` against the schema at JSON ``pointer`` in the document."""
        validator = OAS31Validator(
            {"$ref": f"{BASE_URI}#{pointer}"},
            registry=self.registry,
            format_checker=oas31_format_checker,
        )
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
        assert not errors, (
            "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])
            + f"\nin {instance!r:.600}"
        )

    def check(
        self,
        method: str,
        path: str,
        status: int,
        headers: Mapping[str, str],
        content_type: str | None,
        body: Any,
    ) -> None:
        """Check one answer. ``body`` is the parsed JSON (ignored for other media types)."""
        template = self.template(path)
        method = method.lower()
        item = self.document["paths"][template]
        assert method in item, f"{method.upper()} {template} is not documented"
        self.seen.add((method, template))
        op_pointer = f"/paths/{_escape(template)}/{method}"
        responses = item[method]["responses"]
        key = str(status) if str(status) in responses else "default"
        assert key in responses, f"{method.upper()} {template}: status {status} not documented"
        response, pointer = self._deref(responses[key], f"{op_pointer}/responses/{key}")

        lowered = {name.lower(): value for name, value in headers.items()}
        for name, header_node in response.get("headers", {}).items():
            header, header_pointer = self._deref(header_node, f"{pointer}/headers/{name}")
            value = lowered.get(name.lower())
            if header.get("required"):
                assert value is not None, f"{method.upper()} {path} {status}: no {name} header"
            if value is not None and "schema" in header:
                self.validate(value, f"{header_pointer}/schema")

        content = response.get("content")
        if content is None:
            return
        media = (content_type or "").split(";")[0].strip()
        assert media in content, f"{method.upper()} {path} {status}: {media} not in {list(content)}"
        if media == "application/json":
            self.validate(body, f"{pointer}/content/{_escape(media)}/schema")
