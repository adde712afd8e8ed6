"""k8s/: every overlay renders, fits the Kubernetes, Kubeflow and JobSet schemas, runs command lines
the real jobs accept, and keeps the pod security rules.

Overlays are rendered with `kubectl kustomize` (the tests skip without kubectl). Built-in kinds are
validated strictly with kubernetes-validate; PyTorchJob, JobSet and RayJob with tests/k8s_crd_schemas.py
in an environment of their own, built from PyPI on first use (kubeflow-training and kubeflow-trainer-api
pin their own dependencies). Command lines are expanded as the kubelet expands them ($(VAR) from the
container's env, ConfigMap keys read from the rendered ConfigMaps) and parsed by the jobs' own parsers;
a RayJob's entrypoint as KubeRay's submitter pod runs it.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import fcntl
import hashlib
import importlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
KUBECTL = shutil.which("kubectl")
IMAGE = "cut-pipeline"
PACKAGES = ("cut", "pipeline", "jobs")  # what the image installs
# 1.29: the first release with backoffLimitPerIndex and maxFailedIndexes on by default.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
CRD_KINDS = {"PyTorchJob": "kubeflow.org/v1", "JobSet": "jobset.x-k8s.io/v1alpha2", "RayJob": "ray.io/v1"}
WORKLOAD_KINDS = {"Deployment", "Job", *CRD_KINDS}
PLAIN_KINDS = {"Namespace", "ServiceAccount", "ConfigMap", "Secret", "Service", "PersistentVolumeClaim"}
# Secrets the user creates (docs/kubernetes.md); only prod overlays may reference one they do not render.
EXTERNAL_SECRETS = {"cut-s3", "cut-ray"}
SCHEMA_REQUIREMENTS = ("kubeflow-training==1.9.4", "kubeflow-trainer-api==2.3.0")
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "JOB_COMPLETION_INDEX", "JOB_COMPLETIONS")

Obj = dict[str, Any]
Rendered = dict[str, list[Obj]]


def _kustomizations(root: Path) -> Iterator[tuple[Path, Obj]]:
    for path in sorted(root.rglob("kustomization.yaml")):
        yield path.parent, yaml.safe_load(path.read_text())


OVERLAYS = [
    str(folder.relative_to(K8S / "overlays"))
    for folder, doc in _kustomizations(K8S / "overlays")
    if doc.get("kind", "Kustomization") == "Kustomization"
]


# ------------------------------------------------------------------------------------------ rendering
@pytest.fixture(scope="module")
def rendered() -> Rendered:
    """Every overlay, as `kubectl kustomize` renders it."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the overlays cannot be rendered (kubectl kustomize)")
    out = {}
    for overlay in OVERLAYS:
        proc = subprocess.run(
            [KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            pytest.fail(f"kubectl kustomize k8s/overlays/{overlay} failed:\n{proc.stderr}")
        out[overlay] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return out


def by_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def lookup(objs: list[Obj], kind: str, name: str) -> Obj | None:
    return next((o for o in by_kind(objs, kind) if o["metadata"]["name"] == name), None)


@dataclass
class Pod:
    """A pod template and what its controller adds to the pods it makes."""

    owner: Obj
    where: str
    template: Obj
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    job_spec: Obj | None = None
    role: str = ""  # a RayJob's pods: "ray-head", "ray-worker" or "ray-submitter"

    @property
    def spec(self) -> Obj:
        return self.template["spec"]

    def containers(self) -> list[Obj]:
        return self.spec.get("initContainers", []) + self.spec["containers"]


def pods(objs: list[Obj]) -> list[Pod]:
    out = []
    for obj in objs:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind == "Deployment":
            template = obj["spec"]["template"]
            out.append(Pod(obj, f"Deployment/{name}", template, dict(template["metadata"]["labels"])))
        elif kind == "Job":
            template = obj["spec"]["template"]
            labels = dict(template.get("metadata", {}).get("labels", {}))
            indexed = obj["spec"].get("completionMode") == "Indexed"
            annotations = {"batch.kubernetes.io/job-completion-index": "0"} if indexed else {}
            out.append(Pod(obj, f"Job/{name}", template, labels, annotations, obj["spec"]))
        elif kind == "PyTorchJob":
            for rtype, replica in obj["spec"]["pytorchReplicaSpecs"].items():
                template = replica["template"]
                labels = dict(template.get("metadata", {}).get("labels", {}))
                labels.update(
                    {"training.kubeflow.org/job-name": name, "training.kubeflow.org/replica-index": "0"}
                )
                out.append(Pod(obj, f"PyTorchJob/{name} {rtype}", template, labels))
        elif kind == "JobSet":
            for rjob in obj["spec"]["replicatedJobs"]:
                job_spec = rjob["template"]["spec"]
                template = job_spec["template"]
                labels = dict(template.get("metadata", {}).get("labels", {}))
                labels.update(
                    {
                        "jobset.sigs.k8s.io/jobset-name": name,
                        "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"],
                    }
                )
                annotations = {"batch.kubernetes.io/job-completion-index": "0"}
                out.append(Pod(obj, f"JobSet/{name} {rjob['name']}", template, labels, annotations, job_spec))
        elif kind == "RayJob":
            out.extend(ray_pods(obj))
    return out


def ray_pods(job: Obj) -> list[Pod]:
    """A RayJob's pods: its cluster's head and worker groups (KubeRay labels them with the cluster and
    the group) and the submitter, KubeRay's Job that runs `ray job submit`."""
    name, spec = job["metadata"]["name"], job["spec"]
    cluster = spec["rayClusterSpec"]
    groups = [("ray-head", "head", cluster["headGroupSpec"])]
    groups += [("ray-worker", g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    out = []
    for role, group, spec_of_group in groups:
        template = spec_of_group["template"]
        labels = dict(template.get("metadata", {}).get("labels", {}))
        labels.update({"ray.io/cluster": name, "ray.io/group": group, "ray.io/node-type": role[4:]})
        out.append(Pod(job, f"RayJob/{name} {group}", template, labels, role=role))
    template = spec["submitterPodTemplate"]
    labels = dict(template.get("metadata", {}).get("labels", {}))
    out.append(Pod(job, f"RayJob/{name} submitter", template, labels, role="ray-submitter"))
    return out


def is_ours(container: Obj) -> bool:
    """Whether the container runs the image the Dockerfile builds (under any registry)."""
    return container["image"].rsplit(":", 1)[0].rsplit("/", 1)[-1] == IMAGE


# ------------------------------------------------------------------------- the kubelet's environment
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, others kept, $$ escapes a $."""
    return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _config_map_value(objs: list[Obj], ref: Obj, where: str) -> str | None:
    config_map = lookup(objs, "ConfigMap", ref["name"])
    if config_map is None or ref["key"] not in config_map.get("data", {}):
        if ref.get("optional"):
            return None
        pytest.fail(f"{where}: ConfigMap {ref['name']!r} with key {ref['key']!r} is not in the overlay")
    return config_map["data"][ref["key"]]


def _secret_value(objs: list[Obj], ref: Obj, where: str, overlay: str) -> str:
    secret = lookup(objs, "Secret", ref["name"])
    if secret is None:
        if not (overlay.startswith("prod") and ref["name"] in EXTERNAL_SECRETS):
            pytest.fail(
                f"{where}: Secret {ref['name']!r} is neither in the overlay nor a documented external one"
            )
    elif ref["key"] not in {**secret.get("data", {}), **secret.get("stringData", {})}:
        pytest.fail(f"{where}: Secret {ref['name']!r} has no key {ref['key']!r}")
    return f"<secret {ref['name']}/{ref['key']}>"


def _field_value(pod: Pod, path: str, where: str) -> str:
    if path == "metadata.name":
        return f"{pod.owner['metadata']['name']}-0"
    if path == "metadata.namespace":
        return pod.owner["metadata"].get("namespace", "default")
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    values = pod.labels if m and m.group(1) == "labels" else pod.annotations
    if m is None or m.group(2) not in values:
        pytest.fail(f"{where}: fieldRef {path!r} names nothing the pod will have")
    return values[m.group(2)]


def container_env(pod: Pod, container: Obj, objs: list[Obj], overlay: str) -> dict[str, str]:
    """The container's environment as the kubelet builds it (secrets as placeholders)."""
    where = f"{overlay}: {pod.where} container {container['name']}"
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            config_map = lookup(objs, "ConfigMap", source["configMapRef"]["name"])
            assert config_map is not None, (
                f"{where}: envFrom ConfigMap {source['configMapRef']['name']} missing"
            )
            env.update(config_map.get("data", {}))
        else:
            pytest.fail(f"{where}: envFrom {source} is not modelled by this test")
    for item in container.get("env", []):
        ref = item.get("valueFrom")
        if ref is None:
            env[item["name"]] = expand(item.get("value", ""), env)
        elif "configMapKeyRef" in ref:
            value = _config_map_value(objs, ref["configMapKeyRef"], where)
            if value is not None:
                env[item["name"]] = value
        elif "secretKeyRef" in ref:
            env[item["name"]] = _secret_value(objs, ref["secretKeyRef"], where, overlay)
        elif "fieldRef" in ref:
            env[item["name"]] = _field_value(pod, ref["fieldRef"]["fieldPath"], where)
        else:
            pytest.fail(f"{where}: env {item['name']} has a source this test does not model: {ref}")
    return env


def command_line(container: Obj, env: dict[str, str], where: str) -> list[str]:
    assert container.get("command"), f"{where}: the command is explicit (the image has no entry point)"
    words = [expand(word, env) for word in container["command"] + container.get("args", [])]
    unresolved = [word for word in words if "$(" in word]
    assert not unresolved, f"{where}: references to undefined variables: {unresolved}"
    return words


@contextlib.contextmanager
def process_env(env: dict[str, str]) -> Iterator[None]:
    """os.environ as the container's process sees it, minus what a launcher would set."""
    inherited = {
        k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and not k.startswith(("PET_", "AWS_"))
    }
    with mock.patch.dict(os.environ, {**inherited, **env}, clear=True):
        yield


def parse(call: Callable[[], Any], what: str) -> Any:
    """Run an argparse-based parser; its usage error becomes a test failure that quotes it."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return call()
    except SystemExit:
        pytest.fail(f"{what}: {stderr.getvalue().strip()}")


def mounted_file(pod: Pod, container: Obj, path: str, objs: list[Obj], tmp: Path) -> str:
    """Write the ConfigMap key that the container sees at ``path`` to ``tmp``; return its local path."""
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        volume = next(v for v in pod.spec.get("volumes", []) if v["name"] == mount["name"])
        if "configMap" not in volume:
            pytest.fail(f"{pod.where}: {path} is on volume {volume['name']}, not from a ConfigMap")
        key = path[len(prefix) :]
        text = _config_map_value(objs, {"name": volume["configMap"]["name"], "key": key}, pod.where)
        local = tmp / key
        local.write_text(text or "")
        return str(local)
    pytest.fail(f"{pod.where}: {path} is in no ConfigMap mounted into container {container['name']}")


def gpus(container: Obj) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


# --------------------------------------------------------------------------- the jobs' own parsers
def kubeflow_torchrun_env(job: Obj) -> dict[str, str]:
    """The PET_* variables the training operator gives an elastic PyTorchJob's containers."""
    spec, name = job["spec"], job["metadata"]["name"]
    policy = spec.get("elasticPolicy")
    assert policy is not None, f"PyTorchJob/{name}: training runs elastic (elasticPolicy)"
    port = policy.get("rdzvPort")
    if port is None:
        worker = spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
        ports = [p for c in worker if c["name"] == "pytorch" for p in c.get("ports", [])]
        named = [p["containerPort"] for p in ports if p.get("name") == "pytorchjob-port"]
        assert named, f"PyTorchJob/{name}: the operator needs container 'pytorch' port 'pytorchjob-port'"
        port = named[0]
    env = {
        "PET_RDZV_ENDPOINT": f"{policy.get('rdzvHost', f'{name}-worker-0')}:{port}",
        "PET_RDZV_BACKEND": policy.get("rdzvBackend", "c10d"),
    }
    if "minReplicas" in policy and "maxReplicas" in policy:
        env["PET_NNODES"] = f"{policy['minReplicas']}:{policy['maxReplicas']}"
    else:
        env["PET_NNODES"] = str(spec["pytorchReplicaSpecs"]["Worker"]["replicas"])
    for key, var in (("maxRestarts", "PET_MAX_RESTARTS"), ("nProcPerNode", "PET_NPROC_PER_NODE")):
        if key in policy:
            env[var] = str(policy[key])
    if "rdzvId" in policy:
        env["PET_RDZV_ID"] = policy["rdzvId"]
    if policy.get("rdzvConf"):
        env["PET_RDZV_CONF"] = ",".join(f"{c['key']}={c['value']}" for c in policy["rdzvConf"])
    return env


@dataclass
class Checked:
    """What a container's command line turned into."""

    entry: str
    launch: Any = None  # torchrun's LaunchConfig, for jobs.train
    config: Any = None


def check_command_line(pod: Pod, container: Obj, objs: list[Obj], overlay: str, tmp: Path) -> Checked:
    """Parse the container's command line with the real parser of the job it starts."""
    where = f"{overlay}: {pod.where} container {container['name']}"
    if pod.role:
        return _check_ray_container(pod, container, objs, overlay, where)
    env = container_env(pod, container, objs, overlay)
    words = command_line(container, env, where)
    if words[0] == "torchrun":
        return _check_train(pod, container, objs, env, words, where, tmp)
    if words[:3] == ["python", "-m", "jobs.infer"]:
        return _check_infer(pod, env, words[3:], where)
    if words[:3] == ["python", "-m", "jobs.shard"]:
        from jobs.shard import build_parser as shard_parser

        with process_env(env):
            args = parse(lambda: shard_parser().parse_args(words[3:]), f"{where}: python -m jobs.shard")
        return Checked("jobs.shard", config=args)
    if words[:2] == ["python", "-c"]:
        check_inline_python(words[2], where)
        return Checked("python -c")
    if words[0] == "tensorboard":
        with warnings.catch_warnings():  # its plugins' vendored html5lib warns on loading
            warnings.simplefilter("ignore", DeprecationWarning)
            from tensorboard import program

            board = program.TensorBoard()
            parse(lambda: board.configure(argv=words), f"{where}: tensorboard")
        return Checked("tensorboard", config=board.flags)
    pytest.fail(f"{where}: {words[:3]} starts none of the image's entry points")


def _check_train(
    pod: Pod,
    container: Obj,
    objs: list[Obj],
    env: dict[str, str],
    words: list[str],
    where: str,
    tmp: Path,
) -> Checked:
    from torch.distributed.run import config_from_args, get_args_parser

    from jobs.config import ConfigError
    from jobs.train import build_parser, load_train_config

    launcher_env = kubeflow_torchrun_env(pod.owner) if pod.owner["kind"] == "PyTorchJob" else {}
    with process_env({**env, **launcher_env}):  # torchrun reads PET_* as the defaults of its flags
        launcher = parse(lambda: get_args_parser().parse_args(words[1:]), f"{where}: torchrun")
        # what torchrun makes of its flags before it starts anything (node range, rendezvous conf)
        launch, _, _ = config_from_args(launcher)
    assert launcher.module and launcher.training_script == "jobs.train", f"{where}: torchrun -m jobs.train"
    args = parse(lambda: build_parser().parse_args(launcher.training_script_args), f"{where}: jobs.train")
    args.config = mounted_file(pod, container, args.config, objs, tmp)
    with process_env(env):
        try:
            config = load_train_config(args)
        except ConfigError as exc:
            pytest.fail(f"{where}: jobs.train rejects its config: {exc}")
    return Checked("jobs.train", launch, config)


def _check_infer(pod: Pod, env: dict[str, str], argv: list[str], where: str) -> Checked:
    from jobs.config import ConfigError
    from jobs.infer import build_parser, load_infer_config

    args = parse(lambda: build_parser().parse_args(argv), f"{where}: jobs.infer")
    spec = pod.job_spec or {}
    indexed = spec.get("completionMode") == "Indexed"
    completions = spec.get("completions", 1) if indexed else 1
    config = None
    for index in range(completions):  # the slice each pod of the Indexed Job takes
        pod_env = {**env, "JOB_COMPLETION_INDEX": str(index)} if indexed else env
        with process_env(pod_env):
            try:
                config = load_infer_config(copy.copy(args))
            except ConfigError as exc:
                pytest.fail(f"{where}: jobs.infer rejects its command line at index {index}: {exc}")
        assert (config.worker_index, config.num_workers) == (index, completions), (
            f"{where}: pod {index} of {completions} would be worker {config.worker_index} "
            f"of {config.num_workers}"
        )
    return Checked("jobs.infer", config=config)


def _check_ray_container(pod: Pod, container: Obj, objs: list[Obj], overlay: str, where: str) -> Checked:
    """A RayJob's containers take their commands from KubeRay: `ray start` in the first container of
    the head and of each worker (so the first must be ours), and in the submitter
    `bash -c "... ray job submit --address ... -- <entrypoint> ..."`; the kubelet expands the entrypoint's
    $(VAR)s from the submitter's env, bash splits it into words, and it runs on the head as the driver,
    in the head container's environment."""
    first = pod.spec["containers"][0] is container
    assert not (first and (container.get("command") or container.get("args"))), (
        f"{where}: KubeRay gives this container its command; one here would replace it"
    )
    if pod.role != "ray-submitter":
        assert first, f"{where}: KubeRay starts Ray in the first container only"
        return Checked("ray start")
    env = container_env(pod, container, objs, overlay)
    entrypoint = expand(pod.owner["spec"]["entrypoint"], env)
    unresolved = re.findall(r"\$\([^)]*\)", entrypoint)
    assert not unresolved, f"{where}: the submitter's env does not define {unresolved}"
    # It is spliced into a bash command line between `--` and `; fi`: no shell syntax of its own.
    special = sorted(set(entrypoint) & set(";&|<>`$\\\"'(){}\n*?[]#~"))
    assert not special, f"{where}: the entrypoint holds shell syntax {special}: {entrypoint!r}"
    words = shlex.split(entrypoint)
    (head,) = [p for p in ray_pods(pod.owner) if p.role == "ray-head"]
    driver_env = container_env(head, head.spec["containers"][0], objs, overlay)
    if words[:3] == ["python", "-m", "jobs.infer"]:
        return _check_infer(head, driver_env, words[3:], f"{where}: entrypoint")
    pytest.fail(f"{where}: an entrypoint this test does not know: {words[:3]}")


def check_inline_python(code: str, where: str) -> None:
    """A `python -c` snippet compiles, and what it takes from the project's modules exists."""
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        pytest.fail(f"{where}: python -c does not compile: {exc}")
    modules = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            for alias in node.names:
                attr = getattr(importlib.import_module(node.module), alias.name, None)
                if attr is None:  # a submodule not imported yet
                    with contextlib.suppress(ImportError):
                        attr = importlib.import_module(f"{node.module}.{alias.name}")
                assert attr is not None, f"{where}: {node.module} has no {alias.name}"
                modules[alias.asname or alias.name] = attr
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            owner = modules[node.value.id]
            assert hasattr(owner, node.attr), f"{where}: {owner.__name__} has no {node.attr}"


def our_containers(objs: list[Obj]) -> Iterator[tuple[Pod, Obj]]:
    for pod in pods(objs):
        for container in pod.containers():
            if is_ours(container):
                yield pod, container


# ------------------------------------------------------------------------------------------ tests
def test_every_overlay_renders_known_kinds(rendered: Rendered) -> None:
    assert {"dev", "prod"} <= set(OVERLAYS)
    for overlay, objs in rendered.items():
        assert objs, f"{overlay} renders nothing"
        keys = [(o["kind"], o["metadata"]["name"]) for o in objs]
        assert len(keys) == len(set(keys)), f"{overlay}: duplicate objects"
        unknown = {o["kind"] for o in objs} - WORKLOAD_KINDS - PLAIN_KINDS
        assert not unknown, f"{overlay}: kinds these tests do not check: {unknown}"
        for obj in objs:
            if obj["kind"] in CRD_KINDS:
                assert obj["apiVersion"] == CRD_KINDS[obj["kind"]], f"{overlay}: {obj['kind']} version"


def test_every_workload_component_is_submitted_by_an_overlay() -> None:
    components = {
        folder.resolve() for folder, doc in _kustomizations(K8S / "base") if doc.get("kind") == "Component"
    }
    used = {
        (folder / ref).resolve()
        for folder, doc in _kustomizations(K8S / "overlays")
        for ref in doc.get("components", [])
    }
    assert components, "k8s/base holds the workloads as Components"
    assert components <= used, f"never rendered, so never tested: {sorted(map(str, components - used))}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_match_the_kubernetes_schemas(rendered: Rendered, overlay: str) -> None:
    """Strict: unknown fields are errors. Pod templates inside the CRDs are checked as built-in kinds."""
    documents = []
    for obj in rendered[overlay]:
        name = obj["metadata"]["name"]
        if obj["kind"] == "PyTorchJob":
            for rtype, replica in obj["spec"]["pytorchReplicaSpecs"].items():
                documents.append(
                    (
                        f"PyTorchJob/{name} {rtype} template",
                        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}}
                        | {"template": replica["template"]},
                    )
                )
        elif obj["kind"] == "JobSet":
            for rjob in obj["spec"]["replicatedJobs"]:
                job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}}
                documents.append(
                    (f"JobSet/{name} {rjob['name']} template", job | {"spec": rjob["template"]["spec"]})
                )
        elif obj["kind"] == "RayJob":
            for pod in ray_pods(obj):
                documents.append(
                    (
                        f"{pod.where} template",
                        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}}
                        | {"template": pod.template},
                    )
                )
        else:
            documents.append((f"{obj['kind']}/{name}", obj))
    errors = []
    for version in K8S_VERSIONS:
        for label, doc in documents:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{label} (Kubernetes {version}): {str(exc).splitlines()[0]}")
    assert not errors, f"{overlay}:\n" + "\n".join(errors)


@pytest.fixture(scope="session")
def crd_schema_python() -> Path:
    """A Python with kubeflow-training and kubeflow-trainer-api, built once in the user's cache."""
    override = os.environ.get("CUT_K8S_SCHEMA_PYTHON")
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cut-pipeline"
    digest = hashlib.sha256(f"{sys.version_info[:2]} {SCHEMA_REQUIREMENTS}".encode()).hexdigest()[:12]
    venv = cache / f"k8s-schemas-{digest}"
    python, done = venv / "bin" / "python", venv / ".complete"
    if done.exists():
        return python
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"k8s-schemas-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (pytest-xdist, parallel CI jobs)
        if done.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *SCHEMA_REQUIREMENTS,
            ],
        ]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
                pytest.skip(f"cannot build the CRD schema environment {venv} (offline?): {tail}")
        done.touch()
    return python


def test_pytorchjob_jobset_and_rayjob_match_their_own_schemas(
    rendered: Rendered, crd_schema_python: Path
) -> None:
    items = [
        {"name": f"{overlay}: {o['kind']}/{o['metadata']['name']}", "object": o}
        for overlay, objs in rendered.items()
        for o in objs
        if o["kind"] in CRD_KINDS
    ]
    assert {item["object"]["kind"] for item in items} == set(CRD_KINDS), "every custom kind is rendered"
    proc = subprocess.run(
        [str(crd_schema_python), str(Path(__file__).with_name("k8s_crd_schemas.py"))],
        input=json.dumps(items),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == {item["name"] for item in items}
    errors = [f"{name}: {error}" for name, found in report.items() for error in found]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_command_line_is_accepted_by_its_job(
    rendered: Rendered, overlay: str, tmp_path: Path
) -> None:
    """A renamed flag or config key fails here, not on the cluster."""
    objs = rendered[overlay]
    checked = [check_command_line(p, c, objs, overlay, tmp_path) for p, c in our_containers(objs)]
    assert checked, f"{overlay} runs none of the image's jobs"


@pytest.mark.parametrize(
    ("overlay", "old", "new"),
    [
        ("dev/infer", "--checkpoint", "--ckpt"),
        ("dev", "data.a=$(DATA_A)", "data.aa=$(DATA_A)"),
        ("prod/jobset", "--nproc-per-node=8", "--nprocs-per-node=8"),
        ("dev/shard", "--prefix", "--name-prefix"),
    ],
)
def test_a_renamed_flag_or_key_is_caught(
    rendered: Rendered, overlay: str, old: str, new: str, tmp_path: Path
) -> None:
    objs = copy.deepcopy(rendered[overlay])
    pod, container = next(
        (p, c) for p, c in our_containers(objs) if old in c.get("command", []) + c.get("args", [])
    )
    for key in ("command", "args"):
        container[key] = [new if word == old else word for word in container.get(key, [])]
    with pytest.raises(pytest.fail.Exception):
        check_command_line(pod, container, objs, overlay, tmp_path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_unprivileged_on_a_read_only_root(rendered: Rendered, overlay: str) -> None:
    for pod in pods(rendered[overlay]):
        spec, where = pod.spec, f"{overlay}: {pod.where}"
        pod_sc = spec.get("securityContext", {})
        assert not (spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC")), where
        assert not any("hostPath" in v for v in spec.get("volumes", [])), f"{where}: hostPath volume"
        account = lookup(rendered[overlay], "ServiceAccount", spec.get("serviceAccountName", "default")) or {}
        token = spec.get("automountServiceAccountToken", account.get("automountServiceAccountToken"))
        assert token is False, f"{where}: mounts a service account token it never uses"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in pod.containers():
            sc, label = container.get("securityContext", {}), f"{where} container {container['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{label}: runAsNonRoot"
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, (
                f"{label}: a numeric non-root runAsUser (kubelet-verifiable)"
            )
            assert sc.get("allowPrivilegeEscalation") is False, f"{label}: allowPrivilegeEscalation"
            assert not sc.get("privileged"), f"{label}: privileged"
            assert sc.get("readOnlyRootFilesystem") is True, f"{label}: readOnlyRootFilesystem"
            caps = sc.get("capabilities", {})
            assert "ALL" in caps.get("drop", []) and not caps.get("add"), f"{label}: capabilities drop ALL"
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", f"{label}: seccompProfile RuntimeDefault"
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
            assert "emptyDir" in mounts.get("/tmp", {}), f"{label}: writable scratch is an emptyDir on /tmp"
            if gpus(container):
                shm = mounts.get("/dev/shm", {}).get("emptyDir", {})
                assert shm.get("medium") == "Memory", f"{label}: DataLoader workers need /dev/shm in memory"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve_within_the_overlay(rendered: Rendered, overlay: str) -> None:
    objs = rendered[overlay]
    for pod in pods(objs):
        where = f"{overlay}: {pod.where}"
        account = pod.spec.get("serviceAccountName")
        assert account is None or lookup(objs, "ServiceAccount", account), (
            f"{where}: ServiceAccount {account}"
        )
        for volume in pod.spec.get("volumes", []):
            if "configMap" in volume:
                assert lookup(objs, "ConfigMap", volume["configMap"]["name"]), f"{where}: volume {volume}"
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert lookup(objs, "PersistentVolumeClaim", claim), f"{where}: claim {claim}"
        for container in pod.containers():
            container_env(pod, container, objs, overlay)  # fails on a missing ConfigMap, Secret or key
    for service in by_kind(objs, "Service"):
        selector = service["spec"]["selector"]
        targets = [p for p in pods(objs) if selector.items() <= p.labels.items()]
        assert targets, f"{overlay}: Service {service['metadata']['name']} selects no pod"
        names = {p["name"] for t in targets for c in t.spec["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in names | {port["port"]}, f"{overlay}: {port}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_jobs_reach_object_storage_through_the_environment(rendered: Rendered, overlay: str) -> None:
    objs = rendered[overlay]
    for pod, container in our_containers(objs):
        if pod.role == "ray-submitter":
            continue  # it only submits the Ray job to the head's dashboard: no storage, no credentials
        where = f"{overlay}: {pod.where} container {container['name']}"
        refs = {e["name"]: e.get("valueFrom", {}) for e in container.get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in refs.get(key, {}), f"{where}: {key} from a Secret (secretKeyRef)"
        endpoint = container_env(pod, container, objs, overlay).get("AWS_ENDPOINT_URL", "")
        assert re.match(r"https?://[^/]+", endpoint), f"{where}: AWS_ENDPOINT_URL is {endpoint!r}"


def test_training_as_a_pytorchjob_is_elastic_torchrun(rendered: Rendered, tmp_path: Path) -> None:
    seen = 0
    for overlay, objs in rendered.items():
        for job in by_kind(objs, "PyTorchJob"):
            seen += 1
            spec, where = job["spec"], f"{overlay}: PyTorchJob/{job['metadata']['name']}"
            policy, replicas = spec["elasticPolicy"], spec["pytorchReplicaSpecs"]
            assert set(replicas) == {"Worker"}, f"{where}: elastic training has Worker replicas only"
            worker = replicas["Worker"]
            assert policy["rdzvBackend"] == "c10d", where
            assert 1 <= policy["minReplicas"] <= worker["replicas"] <= policy["maxReplicas"], where
            assert policy.get("maxRestarts", 0) >= 1, f"{where}: torchrun may restart the workers"
            assert worker["restartPolicy"] == "OnFailure", where
            assert worker["template"]["spec"]["terminationGracePeriodSeconds"] >= 60, f"{where}: time to save"
            (pod,) = pods([job])
            (container,) = pod.spec["containers"]
            assert container["name"] == "pytorch", f"{where}: the operator looks for container 'pytorch'"
            checked = check_command_line(pod, container, objs, overlay, tmp_path)
            launch = checked.launch
            assert launch.rdzv_backend == "c10d", where
            assert launch.run_id == policy.get("rdzvId") != "none", (
                f"{where}: a named rendezvous id lets a restarted rank 0 take its own run's lease over"
            )
            assert (launch.min_nodes, launch.max_nodes) == (policy["minReplicas"], policy["maxReplicas"]), (
                where
            )
            per_node = max(gpus(container), 1)
            assert launch.nproc_per_node == int(spec["nprocPerNode"]) == per_node, (
                f"{where}: --nproc-per-node, nprocPerNode and nvidia.com/gpu disagree"
            )
            assert checked.config.train.device == ("cuda" if gpus(container) else "cpu"), where
    assert seen, "no overlay renders the PyTorchJob"


def test_training_as_a_jobset_rendezvous_on_its_first_pod(rendered: Rendered, tmp_path: Path) -> None:
    seen = 0
    for overlay, objs in rendered.items():
        for jobset in by_kind(objs, "JobSet"):
            seen += 1
            name, spec = jobset["metadata"]["name"], jobset["spec"]
            where = f"{overlay}: JobSet/{name}"
            assert spec.get("network", {}).get("enableDNSHostnames", True), f"{where}: pods need DNS names"
            subdomain = spec.get("network", {}).get("subdomain", name)
            (rjob,) = spec["replicatedJobs"]
            job = rjob["template"]["spec"]
            assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"], where
            assert job["template"]["spec"]["restartPolicy"] == "Never", where
            assert job["template"]["spec"]["terminationGracePeriodSeconds"] >= 60, f"{where}: time to save"
            (pod,) = pods([jobset])
            (container,) = pod.spec["containers"]
            launch = check_command_line(pod, container, objs, overlay, tmp_path).launch
            nodes = rjob.get("replicas", 1) * job["parallelism"]
            assert launch.min_nodes == launch.max_nodes == nodes, f"{where}: --nnodes is the pod count"
            assert launch.nproc_per_node == max(gpus(container), 1), f"{where}: --nproc-per-node"
            assert launch.rdzv_backend == "c10d", where
            host = launch.rdzv_endpoint.rsplit(":", 1)[0]
            assert host == f"{name}-{rjob['name']}-0-0.{subdomain}", (
                f"{where}: rendezvous on pod 0, got {host}"
            )
    assert seen, "no overlay renders the JobSet"


def test_inference_is_an_indexed_job_with_one_slice_per_index(rendered: Rendered, tmp_path: Path) -> None:
    seen = 0
    for overlay, objs in rendered.items():
        for job in by_kind(objs, "Job"):
            (pod,) = pods([job])
            entries = [c for c in pod.containers() if is_ours(c) and "jobs.infer" in c.get("command", [])]
            if not entries:
                continue
            seen += 1
            spec, where = job["spec"], f"{overlay}: Job/{job['metadata']['name']}"
            assert spec["completionMode"] == "Indexed", where
            assert spec["template"]["spec"]["restartPolicy"] == "Never", where
            assert spec["backoffLimitPerIndex"] >= 1 and spec["maxFailedIndexes"] >= 0, where
            assert 1 <= spec["parallelism"] <= spec["completions"], where
            for container in entries:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert env.get("JOB_COMPLETIONS") == str(spec["completions"]), (
                    f"{where}: env JOB_COMPLETIONS must equal .spec.completions ({spec['completions']})"
                )
                config = check_command_line(pod, container, objs, overlay, tmp_path).config
                assert config.device == ("cuda" if gpus(container) else "cpu"), where
    assert seen, "no overlay renders the inference Job"


def _quantity(value: str | int) -> float:
    """A Kubernetes quantity (CPU or bytes) as a number: "500m" -> 0.5, "20Gi" -> 21474836480."""
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
                "Ti": 2**40}
    number, suffix = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * suffixes.get(suffix, 1)


def test_inference_on_ray_is_a_rayjob_that_reruns_into_the_committed_plan(
    rendered: Rendered, tmp_path: Path
) -> None:
    seen = 0
    for overlay, objs in rendered.items():
        for job in by_kind(objs, "RayJob"):
            seen += 1
            spec, where = job["spec"], f"{overlay}: RayJob/{job['metadata']['name']}"
            assert not spec.get("clusterSelector"), f"{where}: runs on a cluster of its own"
            assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", f"{where}: a submitter pod"
            assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, (
                f"{where}: the cluster goes when the job ends, after time to read its logs"
            )
            assert spec["backoffLimit"] >= 1, f"{where}: a failed Ray job is retried and finishes the plan"
            assert spec["submitterConfig"]["backoffLimit"] >= 1, f"{where}: a lost submitter is replaced"
            cluster = spec["rayClusterSpec"]
            assert not cluster.get("enableInTreeAutoscaling"), f"{where}: a fixed cluster"
            ray = [p for p in pods([job]) if p.role != "ray-submitter"]
            images = {c["image"] for p in pods([job]) for c in p.spec["containers"][:1]}
            assert len(images) == 1, f"{where}: one image, so one Ray version, everywhere: {images}"
            tokens = []
            for pod in pods([job]):  # Ray's token authentication, with one token everywhere
                env = {e["name"]: e for e in pod.spec["containers"][0].get("env", [])}
                mode = env.get("RAY_AUTH_MODE", {}).get("value")
                assert mode == "token", f"{where} {pod.where}: RAY_AUTH_MODE is {mode}"
                tokens.append(env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"])
            assert all(token == tokens[0] for token in tokens), f"{where}: one token: {tokens}"
            worker_gpus = 0
            for pod in ray:
                group = cluster["headGroupSpec"] if pod.role == "ray-head" else next(
                    g for g in cluster["workerGroupSpecs"] if pod.where.endswith(f" {g['groupName']}")
                )
                label, container = f"{where} {pod.where}", pod.spec["containers"][0]
                params = group["rayStartParams"]
                cpus = _quantity(container["resources"]["requests"]["cpu"])
                if pod.role == "ray-head":
                    assert params["num-cpus"] == "0", f"{label}: no pipeline work on the head (the driver's)"
                else:
                    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"], label
                    assert float(params["num-cpus"]) == cpus, f"{label}: num-cpus is the CPU request"
                    worker_gpus += group["replicas"] * gpus(container)
                volumes = {v["name"]: v for v in pod.spec["volumes"]}
                mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
                shm = mounts["/dev/shm"]["emptyDir"]
                assert int(params["object-store-memory"]) <= _quantity(shm["sizeLimit"]), (
                    f"{label}: Ray's object store must fit /dev/shm"
                )
                for probe in ("readinessProbe", "livenessProbe"):
                    assert "httpGet" in container.get(probe, {}), (
                        f"{label}: an HTTP {probe} of our own (KubeRay's default runs wget, not in the image)"
                    )
            (submitter,) = [p for p in pods([job]) if p.role == "ray-submitter"]
            assert submitter.spec["restartPolicy"] == "Never", where
            entry = submitter.spec["containers"][0]
            config = check_command_line(submitter, entry, objs, overlay, tmp_path).config
            assert config.executor == "ray", f"{where}: the entrypoint runs the Ray executor"
            assert (config.worker_index, config.num_workers) == (0, 1), f"{where}: one driver, all units"
            assert config.device == ("cuda" if worker_gpus else "cpu"), f"{where}: --device, workers' GPUs"
            assert config.ray_address == "auto", f"{where}: the driver joins the cluster on its own head"
            if worker_gpus:  # an actor per GPU: the default, or as many as the workers have
                assert config.ray_actors in (None, worker_gpus), f"{where}: --ray-actors {config.ray_actors}"
    assert seen, "no overlay renders the RayJob"


@pytest.mark.parametrize(
    ("old", "new"),
    [("--checkpoint", "--ckpt"), ("$(INFER_OUT)", "$(INFER_OUTPUT)"), ("--no-progress", "--no-progress; rm")],
)
def test_a_broken_rayjob_entrypoint_is_caught(rendered: Rendered, old: str, new: str, tmp_path: Path) -> None:
    """A renamed flag, a variable the submitter does not define, or shell syntax in the entrypoint."""
    objs = copy.deepcopy(rendered["dev/infer-ray"])
    (job,) = by_kind(objs, "RayJob")
    assert old in job["spec"]["entrypoint"]
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace(old, new)
    (submitter,) = [p for p in pods([job]) if p.role == "ray-submitter"]
    with pytest.raises((pytest.fail.Exception, AssertionError)):
        check_command_line(submitter, submitter.spec["containers"][0], objs, "dev/infer-ray", tmp_path)


def test_tensorboard_reads_where_training_writes(rendered: Rendered, tmp_path: Path) -> None:
    from pipeline import storage

    seen = 0
    for overlay, objs in rendered.items():
        for pod, container in our_containers(objs):
            checked = check_command_line(pod, container, objs, overlay, tmp_path)
            if checked.entry != "tensorboard":
                continue
            seen += 1
            run_url = container_env(pod, container, objs, overlay)["RUN_URL"]
            assert checked.config.logdir == storage.join(run_url, "tb"), f"{overlay}: {pod.where}"
    assert seen, "no overlay renders TensorBoard"


def test_dev_jobs_use_the_in_cluster_minio_and_its_bucket(rendered: Rendered) -> None:
    stack = rendered["dev"]
    minio = lookup(stack, "Service", "minio")
    assert minio is not None
    ports = {p["port"] for p in minio["spec"]["ports"]}
    (bucket_job,) = [j for j in by_kind(stack, "Job") if j["metadata"]["name"] == "minio-bucket"]
    mc_args = bucket_job["spec"]["template"]["spec"]["containers"][0]["args"]
    buckets = {arg.split("/", 1)[1] for arg in mc_args if arg.startswith("minio/")}
    for overlay in (o for o in OVERLAYS if o.split("/")[0] == "dev"):
        (params,) = [
            c for c in by_kind(rendered[overlay], "ConfigMap") if "AWS_ENDPOINT_URL" in c.get("data", {})
        ]
        endpoint = params["data"]["AWS_ENDPOINT_URL"]
        match = re.fullmatch(r"http://([^:/]+):(\d+)", endpoint)
        assert match and match.group(1) == "minio" and int(match.group(2)) in ports, f"{overlay}: {endpoint}"
        used = {v.split("/")[2] for v in params["data"].values() if v.startswith("s3://")}
        assert used <= buckets, f"{overlay}: buckets {used - buckets} are never created"


def test_base_configs_are_copies_of_configs() -> None:
    """kustomize reads no file outside k8s/base: the ConfigMap is generated from copies."""
    originals = {p.name: p.read_bytes() for p in (ROOT / "configs").glob("*.yaml")}
    copies = {p.name: p.read_bytes() for p in (K8S / "base" / "configs").glob("*.yaml")}
    assert copies == originals, (
        "configs/ changed: cp configs/*.yaml k8s/base/configs/ (and list new files in k8s/base)"
    )
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    (generated,) = [g for g in base["configMapGenerator"] if g["name"] == "cut-configs"]
    assert sorted(Path(f).name for f in generated["files"]) == sorted(originals)


def test_images_carry_the_package_version_and_the_dockerfile_user(rendered: Rendered) -> None:
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = int(re.search(r"^USER (\d+)", dockerfile, re.M).group(1))
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)
    for overlay, objs in rendered.items():
        for pod, container in our_containers(objs):
            where = f"{overlay}: {pod.where}"
            # A RayJob runs the image built with the Ray extra (Dockerfile: EXTRAS), tagged <version>-ray.
            tag = f"{version}-ray" if pod.role else version
            assert container["image"].rsplit(":", 1)[1] == tag, f"{where}: image tag = {tag}"
            user = container.get("securityContext", {}).get(
                "runAsUser", pod.spec["securityContext"]["runAsUser"]
            )
            assert user == uid, f"{where}: runAsUser is the Dockerfile's USER {uid}"
