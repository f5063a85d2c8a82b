"""Offline contract check of request bodies against the official OpenSearch API specification.

The specification (OpenAPI 3.1, one merged JSON document) almost never forbids unknown keys, so a
misspelled key would pass a plain check. `SpecContract` makes it strict: every schema position where a
new JSON object starts (the request body itself, each property value, array items, map values) gets
`unevaluatedProperties: false` when its schema describes properties. Putting the keyword on the
*position* rather than on the named schemas keeps the schemas used as `allOf` bases open (an
`unevaluatedProperties` inside a base would reject the properties its extension adds), and lets
`oneOf`/`anyOf` branches contribute the properties they evaluate.

Known gaps of the specification are patched through the explicit, commented `KNOWN_GAPS` list;
`TIGHTENINGS` narrows a few free strings to the values this project sends.

Locating the spec: env `SHOPSEARCH_OPENSEARCH_SPEC` (the JSON file or its directory), else
`<repo root>/../shared/opensearch-api-spec/opensearch-openapi.json`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPEC_ENV = "SHOPSEARCH_OPENSEARCH_SPEC"
SPEC_FILE = "opensearch-openapi.json"
SPEC_URI = "urn:shopsearch:opensearch-openapi"
_REPO_ROOT = Path(__file__).resolve().parents[2]


class SpecNotFoundError(FileNotFoundError):
    """The specification file is not where the env var or the default path says."""


class ContractError(ValueError):
    """A request body does not match the specification (strict mode)."""

    def __init__(self, target: str, errors: list[str]) -> None:
        super().__init__(f"{target}: " + "; ".join(errors))
        self.target = target
        self.errors = errors


def find_spec() -> Path:
    """The spec file, or SpecNotFoundError naming where it was looked for."""
    env = os.environ.get(SPEC_ENV)
    candidates = [Path(env)] if env else [_REPO_ROOT.parent / "shared" / "opensearch-api-spec"]
    for candidate in candidates:
        path = candidate / SPEC_FILE if candidate.is_dir() else candidate
        if path.is_file():
            return path
    where = env or str(candidates[0])
    raise SpecNotFoundError(f"OpenSearch API spec not found at {where} (set {SPEC_ENV})")


# ---------------------------------------------------------------- patches


@dataclass(frozen=True)
class SpecPatch:
    pointer: str  # JSON pointer into the document
    apply: Callable[[dict[str, Any]], None]  # edits the schema at `pointer` in place
    reason: str


def _add_enum(*values: str) -> Callable[[dict[str, Any]], None]:
    def apply(schema: dict[str, Any]) -> None:
        schema["enum"] = [*schema["enum"], *[v for v in values if v not in schema["enum"]]]

    return apply


def _set(**keys: Any) -> Callable[[dict[str, Any]], None]:
    def apply(schema: dict[str, Any]) -> None:
        schema.update(copy.deepcopy(keys))

    return apply


_S = "/components/schemas/"

# The spec is behind the server here; each entry is a fact checked against the OpenSearch docs.
KNOWN_GAPS: tuple[SpecPatch, ...] = (
    SpecPatch(
        _S + "search_pipeline._common___ScoreNormalizationTechnique",
        _add_enum("z_score"),
        "normalization-processor accepts z_score since OpenSearch 3.0; the spec lists only min_max and l2",
    ),
    SpecPatch(
        _S + "_common___SortCombinations",
        lambda schema: schema.update(anyOf=schema.pop("oneOf")),
        "sort branches overlap: {'_score': {'order': 'desc'}} is both `options` and `field_with_order` "
        "(a field named _score), and the server takes either reading, so any branch will do",
    ),
    SpecPatch(
        _S + "_common___SortOptions",
        _set(unevaluatedProperties=False),
        "sort options are exactly _score / _geo_distance / _script; the spec leaves other keys open, so "
        "every field sort ({'price': {...}}) also matched it, and a misspelt option passed",
    ),
    SpecPatch(
        _S + "_core.search___TermSuggester/allOf/1/properties",
        _set(accuracy={"type": "number", "format": "float"}),
        "the term suggester takes `accuracy` (minimum similarity of a suggestion, default 0.5; "
        "TermSuggestionBuilder ACCURACY_FIELD); the spec omits it",
    ),
)

# Free strings / free objects in the spec, narrowed to what k-NN actually accepts, so a typo fails here.
_HNSW_PARAMETERS = {
    "type": "object",
    "properties": {
        "m": {"type": "integer", "minimum": 2},
        "ef_construction": {"type": "integer", "minimum": 2},
        "ef_search": {"type": "integer", "minimum": 2},
        "encoder": {
            "type": "object",
            "properties": {
                "name": {"enum": ["sq", "pq", "flat", "binary"]},
                "parameters": {
                    "type": "object",
                    "properties": {
                        "type": {"enum": ["fp16", "int8"]},
                        "clip": {"type": "boolean"},
                        "bits": {"type": "integer"},
                    },
                },
            },
            "required": ["name"],
        },
    },
}
_SPACE_TYPES = ["l2", "l1", "linf", "cosinesimil", "innerproduct", "hamming"]
TIGHTENINGS: tuple[SpecPatch, ...] = (
    SpecPatch(
        _S + "_common.mapping___KnnVectorMethod/properties/engine",
        _set(enum=["faiss", "lucene", "nmslib"]),
        "engine is a free string in the spec",
    ),
    SpecPatch(
        _S + "_common.mapping___KnnVectorMethod/properties/space_type",
        _set(enum=_SPACE_TYPES),
        "space_type is a free string in the spec",
    ),
    SpecPatch(
        _S + "_common.mapping___KnnVectorMethod/properties/parameters",
        lambda s: (s.clear(), s.update(copy.deepcopy(_HNSW_PARAMETERS))),
        "method parameters are a free object in the spec; these are the HNSW/faiss ones",
    ),
    SpecPatch(
        _S + "_common.mapping___KnnVectorProperty/allOf/1/properties/space_type",
        _set(enum=_SPACE_TYPES),
        "space_type is a free string in the spec",
    ),
    SpecPatch(
        _S + "_common.mapping___KnnVectorProperty/allOf/1/properties/mode",
        _set(enum=["in_memory", "on_disk"]),
        "mode is a free string in the spec",
    ),
    SpecPatch(
        _S + "_common.query_dsl___KnnQuery/allOf/1/properties/method_parameters",
        _set(
            properties={"ef_search": {"type": "integer", "minimum": 1}, "nprobes": {"type": "integer"}},
            additionalProperties=False,
        ),
        "method_parameters is a free object in the spec; k-NN knows ef_search (HNSW) and nprobes (IVF)",
    ),
)


def _pointer_get(doc: Any, pointer: str) -> Any:
    node = doc
    for raw in pointer.lstrip("/").split("/"):
        key = raw.replace("~1", "/").replace("~0", "~")
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


# ---------------------------------------------------------------- strict mode

_OPEN, _DESCRIBED, _FREE, _NEUTRAL = "open", "described", "free", "neutral"
_IN_PLACE = ("allOf", "anyOf", "oneOf")
_VALUE_KEYWORDS = {"enum", "const", "items", "prefixItems", "format", "pattern", "minimum", "maximum"}


class _Shapes:
    """What a schema says about object keys, following `$ref` and in-place applicators.

    open: every key is evaluated anyway (additionalProperties) — nothing to add;
    described: known properties — a strict position rejects others;
    free: any object without annotations (e.g. `{"type": "object"}`) — must stay open;
    neutral: says nothing about keys (strings, `required` only, ...).
    """

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.memo: dict[str, str] = {}

    def of(self, schema: Any, stack: frozenset[str] = frozenset()) -> str:
        if schema is True:
            return _FREE
        if not isinstance(schema, dict):
            return _NEUTRAL
        ref = schema.get("$ref")
        ref_shape = _NEUTRAL
        if isinstance(ref, str) and ref.startswith("#/"):
            if ref in stack:
                ref_shape = _DESCRIBED  # recursive schemas here are all property-described containers
            elif ref in self.memo:
                ref_shape = self.memo[ref]
            else:
                ref_shape = self.of(_pointer_get(self.doc, ref[1:]), stack | {ref})
                self.memo[ref] = ref_shape
        extra = schema.get("additionalProperties", schema.get("unevaluatedProperties"))
        if extra is not None and extra is not False:
            return _OPEN
        shapes = [ref_shape] if ref else []
        if "properties" in schema or "patternProperties" in schema:
            shapes.append(_DESCRIBED)
        for key in ("anyOf", "oneOf"):
            branches = [self.of(b, stack) for b in schema.get(key, [])]
            if any(b in (_OPEN, _FREE) for b in branches):
                return _OPEN  # a free alternative: unknown keys are legitimately allowed
            shapes += branches
        shapes += [self.of(b, stack) for b in schema.get("allOf", [])]
        if _OPEN in shapes:
            return _OPEN
        if _DESCRIBED in shapes:
            return _DESCRIBED
        if ref or any(k in schema for k in _IN_PLACE):
            return _NEUTRAL
        declared = schema.get("type")
        types = declared if isinstance(declared, list) else [declared] if declared else []
        if "object" in types or (not types and not (_VALUE_KEYWORDS & schema.keys())):
            return _FREE
        return _NEUTRAL


def _child_positions(schema: dict[str, Any]) -> Iterable[tuple[Any, bool]]:
    """(subschema, starts_new_instance_location) for every subschema of `schema`."""
    for key in ("properties", "patternProperties", "$defs", "dependentSchemas"):
        for sub in (schema.get(key) or {}).values():
            yield sub, key in ("properties", "patternProperties")
    for key in ("additionalProperties", "items", "contains", "unevaluatedItems"):
        if isinstance(schema.get(key), dict):
            yield schema[key], True
    for sub in schema.get("prefixItems", []) or []:
        yield sub, True
    for key in _IN_PLACE:
        for sub in schema.get(key, []) or []:
            yield sub, False
    for key in ("not", "if", "then", "else"):
        if isinstance(schema.get(key), dict):
            yield schema[key], False


def _strictify(doc: dict[str, Any]) -> None:
    shapes = _Shapes(doc)
    roots: list[tuple[Any, bool]] = [(s, False) for s in doc["components"]["schemas"].values()]
    for body in doc["components"].get("requestBodies", {}).values():
        for media in body.get("content", {}).values():
            roots.append((media.get("schema"), True))
    stack = roots
    seen: set[int] = set()
    while stack:
        schema, is_position = stack.pop()
        if not isinstance(schema, dict) or id(schema) in seen:
            continue
        seen.add(id(schema))
        children = list(_child_positions(schema))  # before we add keys to it
        if is_position and shapes.of(schema) == _DESCRIBED:
            schema["unevaluatedProperties"] = False
        stack.extend(children)


def _discriminator_values(doc: dict[str, Any], schema: Any, prop: str, depth: int = 0) -> list[Any]:
    """The values `prop` may take in a oneOf branch (its enum/const, through $ref and allOf)."""
    if not isinstance(schema, dict) or depth > 8:
        return []
    if isinstance(schema.get("$ref"), str):
        return _discriminator_values(doc, _pointer_get(doc, schema["$ref"][1:]), prop, depth + 1)
    field = (schema.get("properties") or {}).get(prop) or {}
    values = list(field.get("enum", [])) + ([field["const"]] if "const" in field else [])
    for sub in schema.get("allOf", []):
        values += _discriminator_values(doc, sub, prop, depth + 1)
    return values


def _discriminate(doc: dict[str, Any]) -> None:
    """Rewrite `oneOf` + `discriminator` as if/then on the discriminator value.

    Same meaning (the spec's own discriminator picks the branch), but each object is checked against
    one branch instead of all of them: with strict mode on, validating a mapping goes from seconds
    to milliseconds (unevaluatedProperties re-walks every applicator).
    """
    for schema in doc["components"]["schemas"].values():
        disc = schema.get("discriminator") if isinstance(schema, dict) else None
        branches = schema.get("oneOf") if disc else None
        if not disc or not branches or not all("$ref" in b for b in branches):
            continue
        prop = disc["propertyName"]
        rules: list[dict[str, Any]] = []
        known: list[Any] = []
        default_ref = None
        for branch in branches:
            values = _discriminator_values(doc, branch, prop)
            if not values:
                break
            known += values
            rules.append(
                {"if": {"properties": {prop: {"enum": values}}, "required": [prop]}, "then": {"$ref": branch["$ref"]}}
            )
            if disc.get("x-default") in values:
                default_ref = branch["$ref"]
        else:
            if default_ref:
                rules.append({"if": {"not": {"required": [prop]}}, "then": {"$ref": default_ref}})
            del schema["oneOf"]
            schema["properties"] = {prop: {"enum": known}}
            if not default_ref:
                schema["required"] = [prop]
            schema["allOf"] = [*schema.get("allOf", []), *rules]


# ---------------------------------------------------------------- the contract


class SpecContract:
    """Validates request bodies against the strict copy of the spec. Build once (≈1 s), reuse."""

    def __init__(self, spec_path: Path | None = None) -> None:
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        path = spec_path or find_spec()
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        for patch in (*KNOWN_GAPS, *TIGHTENINGS):
            patch.apply(_pointer_get(doc, patch.pointer))
        _discriminate(doc)
        _strictify(doc)
        self.doc = doc
        resource = Resource.from_contents(doc, default_specification=DRAFT202012)
        self._registry = Registry().with_resource(SPEC_URI, resource)
        self._validator_cls = Draft202012Validator
        self._validators: dict[str, Any] = {}

    def _validator(self, pointer: str) -> Any:
        validator = self._validators.get(pointer)
        if validator is None:
            root: dict[str, Any] = {"$ref": f"{SPEC_URI}#{pointer}"}
            if _Shapes(self.doc).of(_pointer_get(self.doc, pointer)) == _DESCRIBED:
                root["unevaluatedProperties"] = False  # the body itself is a position too
            validator = self._validator_cls(root, registry=self._registry)
            self._validators[pointer] = validator
        return validator

    def errors_at(self, pointer: str, instance: Any) -> list[str]:
        """Messages for `instance` against the schema at `pointer` ([] = valid)."""
        errors = sorted(self._validator(pointer).iter_errors(instance), key=lambda e: list(e.path))
        return [_describe(e) for e in errors]

    def request_body_errors(self, name: str, body: Any) -> list[str]:
        """e.g. name="search", "indices.create", "cluster.put_component_template"."""
        return self.errors_at(f"/components/requestBodies/{name}/content/application~1json/schema", body)

    def schema_errors(self, name: str, instance: Any) -> list[str]:
        return self.errors_at(f"/components/schemas/{name.replace('/', '~1')}", instance)

    def check_request_body(self, name: str, body: Any) -> None:
        errors = self.request_body_errors(name, body)
        if errors:
            raise ContractError(name, errors)

    def bulk_errors(
        self,
        pairs: Iterable[tuple[Mapping[str, Any], Mapping[str, Any] | None]],
        mappings: Mapping[str, Any],
    ) -> list[str]:
        """`_bulk` NDJSON checked line by line (the spec barely checks the NDJSON body as a whole):
        each action line against the bulk operation schema, each source line against the update
        action schema or, for documents, against the index mapping (which is `dynamic: strict`)."""
        document = document_schema(mappings)
        partial = {**document, "required": []}
        from jsonschema import Draft202012Validator

        errors: list[str] = []
        for i, (action, source) in enumerate(pairs):
            where = f"bulk item {i}"
            errors += [f"{where} action: {m}" for m in self.schema_errors("_core.bulk___OperationContainer", action)]
            op = next(iter(action), None)
            if op in ("index", "create"):
                validator = Draft202012Validator(document)
                errors += [f"{where} document: {_describe(e)}" for e in validator.iter_errors(source)]
            elif op == "update":
                errors += [f"{where} update: {m}" for m in self.schema_errors("_core.bulk___UpdateAction", source)]
                if isinstance(source, Mapping) and "doc" in source:
                    validator = Draft202012Validator(partial)
                    errors += [f"{where} update doc: {_describe(e)}" for e in validator.iter_errors(source["doc"])]
            elif op == "delete" and source is not None:
                errors.append(f"{where}: a delete action has no source line")
        return errors


def _describe(error: Any) -> str:
    path = "/".join(str(p) for p in error.absolute_path) or "(body)"
    message = error.message
    if len(message) > 300:
        message = message[:300] + "…"
    return f"{path}: {message}"


_FIELD_TYPES: dict[str, dict[str, Any]] = {
    "text": {"type": ["string", "array", "null"], "items": {"type": "string"}},
    "keyword": {"type": ["string", "array", "null"], "items": {"type": "string"}},
    "long": {"type": ["integer", "null"]},
    "integer": {"type": ["integer", "null"]},
    "double": {"type": ["number", "null"]},
    "float": {"type": ["number", "null"]},
    "object": {"type": ["object", "null"]},
}


def document_schema(mappings: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON schema of the documents an index mapping accepts (top level; dynamic strict)."""
    properties: dict[str, Any] = {}
    for name, field in mappings.get("properties", {}).items():
        kind = field.get("type", "object")
        if kind == "knn_vector":
            dim = field["dimension"]
            properties[name] = {"type": "array", "items": {"type": "number"}, "minItems": dim, "maxItems": dim}
        else:
            properties[name] = _FIELD_TYPES.get(kind, {})
    strict = mappings.get("dynamic") in ("strict", False, "false")
    return {"type": "object", "properties": properties, "additionalProperties": not strict, "required": ["id"]}


@functools.lru_cache(maxsize=2)
def load_contract(spec_path: str | None = None) -> SpecContract:
    """One shared contract per spec file (building the strict copy takes about a second)."""
    return SpecContract(Path(spec_path) if spec_path else None)
