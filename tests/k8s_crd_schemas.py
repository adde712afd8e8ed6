"""Check PyTorchJob and JobSet objects against the models the Kubeflow SDKs generate from their APIs.

Runs inside its own environment (tests/test_k8s.py builds it: kubeflow-training carries the
training-operator v1 models, PyTorchJob included; kubeflow-trainer-api carries JobSet v1alpha2), reads
``[{"name": ..., "object": {...}}, ...]`` as JSON on stdin and prints ``{name: [error, ...]}``.

Strict: a key the model does not define is an error, as is a value of the wrong type or a missing
required field. The SDKs' own deserializers drop unknown keys, so the keys are walked here first;
the deserializers then check types and required fields.
"""

from __future__ import annotations

import json
import re
import sys
import typing
from typing import Any


def _primitive_ok(value: Any, type_name: str) -> bool:
    if type_name == "object":
        return True
    if type_name == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if type_name == "int":
        return isinstance(value, int)
    if type_name == "float":
        return isinstance(value, (int, float))
    return isinstance(value, str)  # str, date, datetime


SWAGGER_PRIMITIVES = ("str", "int", "float", "bool", "object", "date", "datetime")


def _swagger_class(name: str) -> type:
    import kubeflow.training.models as kubeflow_models
    import kubernetes.client.models as kubernetes_models

    for module in (kubeflow_models, kubernetes_models):
        if hasattr(module, name):
            return getattr(module, name)
    raise LookupError(f"no model class {name}")


def walk_swagger(data: Any, type_name: str, path: str, errors: list[str]) -> None:
    """Keys and primitive types of ``data`` against a swagger-codegen model type (kubeflow-training)."""
    if data is None:
        return
    listed = re.fullmatch(r"list\[(.*)\]", type_name)
    if listed:
        if not isinstance(data, list):
            errors.append(f"{path}: expected a list, got {type(data).__name__}")
            return
        for i, item in enumerate(data):
            walk_swagger(item, listed.group(1), f"{path}[{i}]", errors)
        return
    mapped = re.fullmatch(r"dict\(([^,]*), (.*)\)", type_name)
    if mapped:
        if not isinstance(data, dict):
            errors.append(f"{path}: expected a mapping, got {type(data).__name__}")
            return
        for key, value in data.items():
            walk_swagger(value, mapped.group(2), f"{path}.{key}", errors)
        return
    if type_name in SWAGGER_PRIMITIVES:
        if not _primitive_ok(data, type_name):
            errors.append(f"{path}: expected {type_name}, got {data!r}")
        return
    cls = _swagger_class(type_name)
    if not isinstance(data, dict):
        errors.append(f"{path}: expected a {type_name} mapping, got {data!r}")
        return
    by_json_key = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    for key, value in data.items():
        if key not in by_json_key:
            errors.append(f"{path}: unknown field {key!r} for {type_name} (known: {sorted(by_json_key)})")
            continue
        walk_swagger(value, cls.openapi_types[by_json_key[key]], f"{path}.{key}", errors)


def check_pytorchjob(obj: dict[str, Any]) -> list[str]:
    from kubeflow.training.api_client import ApiClient

    errors: list[str] = []
    walk_swagger(obj, "KubeflowOrgV1PyTorchJob", "PyTorchJob", errors)
    try:  # constructs every model, which checks the required fields
        ApiClient()._ApiClient__deserialize(obj, "KubeflowOrgV1PyTorchJob")  # type: ignore[attr-defined]
    except (TypeError, ValueError, AttributeError) as exc:
        errors.append(f"PyTorchJob: {exc}")
    return errors


def _unwrap(annotation: Any) -> Any:
    """Optional[X] and Annotated[X, ...] -> X (unions of several types are left as they are)."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if origin is typing.Union:
            options = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(options) == 1:
                annotation = options[0]
                continue
        return annotation


def walk_pydantic(data: Any, annotation: Any, path: str, errors: list[str]) -> None:
    """Keys of ``data`` against an openapi-generator pydantic model (kubeflow-trainer-api)."""
    from pydantic import BaseModel

    annotation = _unwrap(annotation)
    if data is None:
        return
    origin = typing.get_origin(annotation)
    if origin is list:
        if isinstance(data, list):
            for i, item in enumerate(data):
                walk_pydantic(item, typing.get_args(annotation)[0], f"{path}[{i}]", errors)
        return
    if origin is dict:
        if isinstance(data, dict):
            for key, value in data.items():
                walk_pydantic(value, typing.get_args(annotation)[1], f"{path}.{key}", errors)
        return
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return
    if "actual_instance" in annotation.model_fields:  # a oneOf wrapper (Quantity, IntOrString)
        return
    if not isinstance(data, dict):
        return  # the model's own validation reports it
    model = annotation.__name__
    fields = {(info.alias or name): info for name, info in annotation.model_fields.items()}
    for key, info in fields.items():
        # from_dict fills a missing required string with "", so absence is checked here
        if info.is_required() and key not in data:
            errors.append(f"{path}: required field {key!r} of {model} is missing")
    for key, value in data.items():
        if key not in fields:
            errors.append(f"{path}: unknown field {key!r} for {model} (known: {sorted(fields)})")
            continue
        walk_pydantic(value, fields[key].annotation, f"{path}.{key}", errors)


def check_jobset(obj: dict[str, Any]) -> list[str]:
    from kubeflow_trainer_api.models import JobsetV1alpha2JobSet
    from pydantic import ValidationError

    errors: list[str] = []
    walk_pydantic(obj, JobsetV1alpha2JobSet, "JobSet", errors)
    try:  # the value types (the models use strict types)
        JobsetV1alpha2JobSet.from_dict(obj)
    except (ValidationError, TypeError, ValueError, AttributeError) as exc:
        errors.append(f"JobSet: {exc}")
    return errors


CHECKS = {
    ("kubeflow.org/v1", "PyTorchJob"): check_pytorchjob,
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): check_jobset,
}


def main() -> int:
    report = {}
    for item in json.load(sys.stdin):
        obj = item["object"]
        check = CHECKS.get((obj.get("apiVersion"), obj.get("kind")))
        if check is None:
            report[item["name"]] = [f"no schema here for {obj.get('apiVersion')} {obj.get('kind')}"]
        else:
            report[item["name"]] = check(obj)
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
