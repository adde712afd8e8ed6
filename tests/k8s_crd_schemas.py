"""Check PyTorchJob, JobSet and RayJob objects against their APIs' schemas.

Runs inside its own environment (tests/test_k8s.py builds it: kubeflow-training carries the
training-operator v1 models, PyTorchJob included; kubeflow-trainer-api carries JobSet v1alpha2), reads
``[{"name": ..., "object": {...}}, ...]`` as JSON on stdin and prints ``{name: [error, ...]}``.

Strict: a key the model does not define is an error, as is a value of the wrong type or a missing
required field. The SDKs' own deserializers drop unknown keys, so the keys are walked here first;
the deserializers then check types and required fields. KubeRay publishes no Python models, so the
RayJob is checked against RAYJOB_V1, a transcription of its CRD's OpenAPI schema (below).
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


# ------------------------------------------------------------------------------------ RayJob (KubeRay)
# The openAPIV3Schema of ray.io/v1 RayJob as KubeRay v1.3 generates it (controller-gen) from
# ray-project/kuberay ray-operator/apis/ray/v1/rayjob_types.go (RayJobSpec, SubmitterConfig) and
# raycluster_types.go (RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, AutoscalerOptions,
# GcsFaultToleranceOptions), as installed by ray-operator/config/crd/bases/ray.io_rayjobs.yaml and
# listed in KubeRay's API reference. Every field of these types is here with its type; a field is required
# where its json tag has no omitempty and no +optional. Kubernetes' own types inside (PodTemplateSpec,
# Service, ResourceRequirements, EnvVar, ...) are opaque objects here: tests/test_k8s.py validates the pod
# templates strictly as Kubernetes PodTemplates. KubeRay 1.4 made rayStartParams optional and later
# releases add fields; an object that passes here is accepted by 1.3 and by those.
_INT32 = {"type": "integer", "format": "int32"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_NUMBER = {"type": "number"}
_OBJECT = {"type": "object"}  # a Kubernetes type, checked elsewhere or not at all
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_STR_LIST = {"type": "array", "items": _STR}
_ONE_OF = "x-one-of"  # the CEL rule `self in [...]` of an XValidation marker, checked as an enum

_HEAD_GROUP = {
    "type": "object",
    "properties": {
        "template": _OBJECT,  # corev1.PodTemplateSpec
        "headService": _OBJECT,  # corev1.Service
        "enableIngress": _BOOL,
        "rayStartParams": _STR_MAP,
        "serviceType": _STR,
    },
    "required": ["rayStartParams", "template"],
}
_WORKER_GROUP = {
    "type": "object",
    "properties": {
        "suspend": _BOOL,
        "groupName": _STR,
        "replicas": _INT32,
        "minReplicas": _INT32,
        "maxReplicas": _INT32,
        "idleTimeoutSeconds": _INT32,
        "rayStartParams": _STR_MAP,
        "template": _OBJECT,  # corev1.PodTemplateSpec
        "scaleStrategy": {"type": "object", "properties": {"workersToDelete": _STR_LIST}},
        "numOfHosts": _INT32,
    },
    "required": ["groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"],
}
_AUTOSCALER = {
    "type": "object",
    "properties": {
        "resources": _OBJECT,
        "image": _STR,
        "imagePullPolicy": _STR,
        "securityContext": _OBJECT,
        "idleTimeoutSeconds": _INT32,
        "upscalingMode": {"type": "string", "enum": ["Default", "Aggressive", "Conservative"]},
        "env": {"type": "array", "items": _OBJECT},
        "envFrom": {"type": "array", "items": _OBJECT},
        "volumeMounts": {"type": "array", "items": _OBJECT},
    },
}
_REDIS_CREDENTIAL = {"type": "object", "properties": {"valueFrom": _OBJECT, "value": _STR}}
_MANAGED_BY = {"type": "string", _ONE_OF: ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]}
RAY_CLUSTER_SPEC = {
    "type": "object",
    "properties": {
        "suspend": _BOOL,
        "managedBy": _MANAGED_BY,
        "autoscalerOptions": _AUTOSCALER,
        "headServiceAnnotations": _STR_MAP,
        "enableInTreeAutoscaling": _BOOL,
        "gcsFaultToleranceOptions": {
            "type": "object",
            "properties": {
                "redisUsername": _REDIS_CREDENTIAL,
                "redisPassword": _REDIS_CREDENTIAL,
                "externalStorageNamespace": _STR,
                "redisAddress": _STR,
            },
            "required": ["redisAddress"],
        },
        "headGroupSpec": _HEAD_GROUP,
        "rayVersion": _STR,
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    },
    "required": ["headGroupSpec"],
}
RAYJOB_V1 = {
    "type": "object",
    "properties": {
        "apiVersion": _STR,
        "kind": _STR,
        "metadata": _OBJECT,
        "spec": {
            "type": "object",
            "properties": {
                "activeDeadlineSeconds": _INT32,
                "backoffLimit": _INT32,
                "rayClusterSpec": RAY_CLUSTER_SPEC,
                "submitterPodTemplate": _OBJECT,  # corev1.PodTemplateSpec
                "metadata": _STR_MAP,
                "clusterSelector": _STR_MAP,
                "submitterConfig": {"type": "object", "properties": {"backoffLimit": _INT32}},
                "managedBy": _MANAGED_BY,
                "deletionPolicy": {
                    "type": "string",
                    _ONE_OF: ["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"],
                },
                "entrypoint": _STR,
                "runtimeEnvYAML": _STR,
                "jobId": _STR,
                "submissionMode": _STR,  # K8sJobMode (default), HTTPMode, InteractiveMode: no enum in the CRD
                "entrypointResources": _STR,
                "entrypointNumCpus": _NUMBER,
                "entrypointNumGpus": _NUMBER,
                "ttlSecondsAfterFinished": _INT32,
                "shutdownAfterJobFinishes": _BOOL,
                "suspend": _BOOL,
            },
        },
        "status": _OBJECT,
    },
}
_JSON_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "integer": int,
    "number": (int, float),
}


def walk_openapi(data: Any, schema: dict[str, Any], path: str, errors: list[str]) -> None:
    """``data`` against the structural subset of OpenAPI v3 that CRDs use (type, format int32,
    properties, additionalProperties, items, required, enum), unknown fields being errors as the API
    server's strict field validation makes them."""
    kind = schema["type"]
    is_bool = isinstance(data, bool)  # a bool is an int in Python, never in JSON
    if not isinstance(data, _JSON_TYPES[kind]) or (is_bool and kind in ("integer", "number")):
        errors.append(f"{path}: expected {kind}, got {data!r}")
        return
    if schema.get("format") == "int32" and not -(2**31) <= data < 2**31:
        errors.append(f"{path}: {data} does not fit int32")
    allowed = schema.get("enum", schema.get(_ONE_OF))
    if allowed is not None and data not in allowed:
        errors.append(f"{path}: {data!r} is not one of {allowed}")
    if kind == "array":
        for i, item in enumerate(data):
            walk_openapi(item, schema["items"], f"{path}[{i}]", errors)
    if kind != "object" or ("properties" not in schema and "additionalProperties" not in schema):
        return
    for key in schema.get("required", []):
        if key not in data:
            errors.append(f"{path}: required field {key!r} is missing")
    properties = schema.get("properties", {})
    for key, value in data.items():
        if key in properties:
            walk_openapi(value, properties[key], f"{path}.{key}", errors)
        elif "additionalProperties" in schema:
            walk_openapi(value, schema["additionalProperties"], f"{path}.{key}", errors)
        else:
            errors.append(f"{path}: unknown field {key!r} (known: {sorted(properties)})")


def check_rayjob(obj: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    walk_openapi(obj, RAYJOB_V1, "RayJob", errors)
    return errors


CHECKS = {
    ("kubeflow.org/v1", "PyTorchJob"): check_pytorchjob,
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): check_jobset,
    ("ray.io/v1", "RayJob"): check_rayjob,
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
