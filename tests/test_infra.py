"""infra/: the Dockerfile, the kustomize overlays and `lumiere k8s`.

No Kubernetes API server runs on these machines, so everything that can be checked offline is: every overlay is
rendered with `kubectl kustomize` (through `infra.kuberay.render_overlay`, the same code `lumiere k8s render` runs,
with no extra flags: what `kubectl apply -k` renders); core objects and every pod template inside the KubeRay
objects are validated with `kubernetes-validate` against the Kubernetes 1.32 schemas; the RayCluster/RayJob/
RayService objects against the upstream KubeRay CRDs in ../shared/kuberay-crds (their openAPIV3Schema, strict about
unknown fields as `kubectl apply` is); the RayJob entrypoints are parsed by the real `lumiere` CLI.

FAKE, declared: `FakeApiServer` below is an HTTP stand-in for the Kubernetes API server (the one fake allowed in
this suite). It records every request and answers with canned JSON, so `lumiere k8s submit/status/logs/delete`
are tested through the real `kubernetes` client, kubeconfig loading and HTTP, without a cluster.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from infra import kuberay as k8s
from lumiere.errors import LumiereError

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S_VERSION = "1.32"
SECRETS = {"lumiere-s3", "lumiere-postgres", "lumiere-api-keys"}
TRAIN_JOBS = ("lumiere-train-t2i", "lumiere-train-stunet", "lumiere-train-ssr")
NAMESPACES = {"dev": "lumiere-dev", "gpu": "lumiere"}

needs_kustomize = pytest.mark.skipif(not (shutil.which("kubectl") or shutil.which("kustomize")),
                                     reason="rendering the overlays needs kubectl or kustomize on PATH")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if not (shutil.which("kubectl") or shutil.which("kustomize")):
        pytest.skip("rendering the overlays needs kubectl or kustomize on PATH")
    return {o: k8s.render_overlay(o) for o in k8s.OVERLAYS}


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind, name):
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def ray_objects(objs):
    return [o for o in objs if o["kind"] in k8s.RAY_KINDS]


def worker_container(group):
    return group["template"]["spec"]["containers"][0]


# ------------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_overlay_renders_every_object(rendered, overlay):
    objs = rendered[overlay]
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    expected = {("Namespace", NAMESPACES[overlay]), ("RayCluster", "lumiere"), ("RayService", "lumiere-api"),
                ("RayJob", "lumiere-ingest"), *(("RayJob", j) for j in TRAIN_JOBS),
                ("Deployment", "lumiere-mlflow"), ("Service", "lumiere-mlflow"),
                ("StatefulSet", "lumiere-postgres"), ("Service", "lumiere-postgres"),
                ("PersistentVolumeClaim", "lumiere-checkpoints"), ("ServiceAccount", "lumiere-submitter"),
                ("Role", "lumiere-submitter"), ("RoleBinding", "lumiere-submitter"),
                ("NetworkPolicy", "lumiere-default-deny-ingress"), ("NetworkPolicy", "lumiere-allow-api")}
    assert expected <= names
    assert len(names) == len(objs), "two objects with the same kind and name"
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == NAMESPACES[overlay], o["metadata"]["name"]
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lumiere"
    # the serve-config ConfigMap is only the source of a replacement, never applied
    assert not [o for o in objs if o["metadata"]["name"] == "lumiere-serve-config"]


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_core_objects_validate_against_kubernetes_schemas(rendered, overlay):
    core = [o for o in rendered[overlay] if o["kind"] not in k8s.RAY_KINDS]
    for obj in core:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    # the pod templates inside the KubeRay objects are core/v1 PodTemplateSpecs: validate them as such
    templates = 0
    for obj in ray_objects(rendered[overlay]):
        for t in k8s.pod_templates(obj):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t}
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
            templates += 1
    assert templates >= 12


def test_kubernetes_validate_catches_a_bad_object(rendered):
    """The validation above is not vacuous: a wrong field and a wrong type are both rejected."""
    bad = json.loads(json.dumps(one(rendered["gpu"], "Deployment", "lumiere-mlflow")))
    bad["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = json.loads(json.dumps(one(rendered["gpu"], "Deployment", "lumiere-mlflow")))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# The upstream KubeRay CRDs, unmodified (source and commit in their README). CI has ../shared; elsewhere
# LUMIERE_KUBERAY_CRDS may point at a copy.
CRDS = Path(os.environ.get("LUMIERE_KUBERAY_CRDS") or ROOT.parent / "shared" / "kuberay-crds")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
# OpenAPI keywords that constrain nothing JSON Schema checks here: documentation, defaults the API server fills
# in, formats (int32, int64, ...), list/map semantics for server-side apply, CEL rules (evaluated by the API
# server only; not checked offline, declared here)
_IGNORED = {"description", "default", "example", "externalDocs", "format", "nullable", "x-kubernetes-validations",
            "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
            "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource"}


def structural_to_jsonschema(node: dict) -> dict:
    """A CRD's openAPIV3Schema (a Kubernetes structural schema) -> JSON Schema, as strict as the API server's
    field validation: an object that lists its properties admits no other field unless it says
    x-kubernetes-preserve-unknown-fields; x-kubernetes-int-or-string admits an integer or a string; nullable
    admits null."""
    out: dict = {}
    for key, value in node.items():
        if key in _IGNORED:
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: structural_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = structural_to_jsonschema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [structural_to_jsonschema(sub) for sub in value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"  # OpenAPI 3.0: a flag on the bound
            if value and bound in node:
                out[key] = node[bound]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)  # controller-gen writes anyOf [integer, string] beside the flag
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-embedded-resource")
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
            and not preserve:
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def kuberay_schemas() -> dict[str, jsonschema.Draft202012Validator]:
    """kind -> a validator for the v1 schema of the upstream KubeRay CRD of that kind."""
    missing = [f for f in CRD_FILES.values() if not (CRDS / f).is_file()]
    if missing:
        reason = (f"the upstream KubeRay CRDs are not at {CRDS} (missing {', '.join(missing)}): the RayCluster/"
                  "RayJob/RayService objects are NOT validated; check out ../shared or set LUMIERE_KUBERAY_CRDS")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):  # CI has ../shared: missing is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    validators = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.safe_load((CRDS / name).read_text())
        assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == k8s.VERSION]
        schema = structural_to_jsonschema(version["schema"]["openAPIV3Schema"])
        jsonschema.Draft202012Validator.check_schema(schema)
        validators[kind] = jsonschema.Draft202012Validator(schema)
    return validators


def crd_errors(validators, obj) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[obj["kind"]].iter_errors(obj)]


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_kuberay_objects_validate_against_the_upstream_crds(rendered, kuberay_schemas, overlay):
    ray = ray_objects(rendered[overlay])
    assert sorted(o["kind"] for o in ray) == ["RayCluster", "RayJob", "RayJob", "RayJob", "RayJob", "RayService"]
    for obj in ray:
        assert obj["apiVersion"] == f"{k8s.GROUP}/{k8s.VERSION}"
        errors = crd_errors(kuberay_schemas, obj)
        assert not errors, (obj["metadata"]["name"], errors)
        for group in k8s.cluster_spec(obj).get("workerGroupSpecs", []):
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


def test_crd_validation_rejects_unknown_fields_wrong_types_and_missing_fields(rendered, kuberay_schemas):
    """The validation above is not vacuous: what `kubectl apply` would refuse is refused here too."""
    copy = lambda o: json.loads(json.dumps(o))  # noqa: E731
    job = one(rendered["dev"], "RayJob", "lumiere-train-t2i")
    typo = copy(job)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in crd_errors(kuberay_schemas, typo))
    deep = copy(job)  # an unknown field deep inside a pod template is refused too
    deep["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    assert crd_errors(kuberay_schemas, deep)
    wrong = copy(job)
    wrong["spec"]["ttlSecondsAfterFinished"] = "1h"
    assert crd_errors(kuberay_schemas, wrong)
    quantity = copy(job)  # int-or-string: a quantity may be either, but not a list
    limits = quantity["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    limits["resources"]["limits"]["cpu"] = 2
    assert not crd_errors(kuberay_schemas, quantity)
    limits["resources"]["limits"]["cpu"] = ["2"]
    assert crd_errors(kuberay_schemas, quantity)
    svc = copy(one(rendered["dev"], "RayService", "lumiere-api"))
    del svc["spec"]["rayClusterConfig"]
    assert any("rayClusterConfig" in e for e in crd_errors(kuberay_schemas, svc))
    cluster = copy(one(rendered["dev"], "RayCluster", "lumiere"))
    del cluster["spec"]["headGroupSpec"]
    assert any("headGroupSpec" in e for e in crd_errors(kuberay_schemas, cluster))


def test_structural_schema_conversion_keeps_preserved_and_free_form_fields_open():
    schema = structural_to_jsonschema({"type": "object", "properties": {
        "strict": {"type": "object", "properties": {"a": {"type": "string"}}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"a": {"type": "string"}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "port": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
        "maybe": {"type": "string", "nullable": True}}})
    v = jsonschema.Draft202012Validator(schema)
    assert v.is_valid({"strict": {"a": "x"}, "open": {"a": "x", "b": 1}, "map": {"k": "v"}, "port": 80, "maybe": None})
    assert v.is_valid({"port": "http"})
    assert not v.is_valid({"strict": {"b": "x"}})
    assert not v.is_valid({"map": {"k": 1}})
    assert not v.is_valid({"other": 1})


# ------------------------------------------------------------------------------- kubectl apply -k, as it is


def test_every_overlay_builds_with_plain_kubectl_kustomize():
    """`kubectl apply -k infra/k8s/overlays/NAME` works with no extra flags: everything kustomize loads is inside
    infra/k8s (kubectl kustomize runs offline; it is what apply -k renders)."""
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not on PATH: `kubectl kustomize` (what `kubectl apply -k` renders) not checked")
    import subprocess

    overlays = sorted(p.parent.name for p in (INFRA / "k8s" / "overlays").glob("*/kustomization.yaml"))
    assert set(overlays) == set(k8s.OVERLAYS)
    for name in overlays:
        proc = subprocess.run(["kubectl", "kustomize", str(INFRA / "k8s" / "overlays" / name)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (name, proc.stderr)
        service = one([d for d in yaml.safe_load_all(proc.stdout) if d], "RayService", "lumiere-api")
        assert service["spec"]["serveConfigV2"] == (ROOT / "serve" / "config.yaml").read_text()


def test_the_serve_config_inside_the_kustomize_tree_is_serve_config_yaml():
    """kustomize loads no file outside its tree, so the RayService's Serve config is a copy; it never drifts
    (after editing serve/config.yaml: `make serve-config`)."""
    copy = INFRA / "k8s" / "base" / "serve-config.yaml"
    assert copy.read_bytes() == (ROOT / "serve" / "config.yaml").read_bytes(), \
        "infra/k8s/base/serve-config.yaml differs from serve/config.yaml: run `make serve-config`"
    base = yaml.safe_load((INFRA / "k8s" / "base" / "kustomization.yaml").read_text())
    (gen,) = [g for g in base["configMapGenerator"] if g["name"] == "lumiere-serve-config"]
    assert gen["files"] == ["serveConfigV2=serve-config.yaml"]


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_rayjobs_run_the_lumiere_cli_and_clean_up(rendered, overlay):
    """Every RayJob runs real `lumiere` commands (parsed by the CLI itself), joins its own Ray cluster and is
    cleaned up after it ends."""
    import click
    import typer

    from cli.main import app

    cli = typer.main.get_command(app)
    jobs = by_kind(rendered[overlay], "RayJob")
    for job in jobs:
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["backoffLimit"] >= 1 and spec["submissionMode"] == "K8sJobMode"
        for argv in k8s.split_entrypoint(spec["entrypoint"]):
            assert argv[0] == "lumiere", argv
            group, args = cli, argv[1:]
            while isinstance(group, click.Group):  # descend to the leaf command, like click does
                group, args = group.get_command(click.Context(group), args[0]), args[1:]
                assert group is not None, argv
            group.make_context(argv[1], list(args))  # raises on an unknown option or a bad value
        main = k8s.split_entrypoint(spec["entrypoint"])[-1]
        assert "--address" in main and main[main.index("--address") + 1] == "auto"
    train = {j["metadata"]["name"]: k8s.split_entrypoint(j["spec"]["entrypoint"]) for j in jobs
             if j["metadata"]["name"] in TRAIN_JOBS}
    assert set(train) == set(TRAIN_JOBS)
    for name, (wait, main) in train.items():
        assert main[:3] == ["lumiere", "train", name.rsplit("-", 1)[1]]
        assert main[main.index("--output") + 1].startswith("/mnt/checkpoints/")
        workers = int(main[main.index("--num-workers") + 1])
        resource = "--gpus" if "--gpu" in main else "--cpus"
        assert wait[:3] == ["lumiere", "k8s", "wait-resources"] and wait[wait.index(resource) + 1] == str(workers)
    stunet = train["lumiere-train-stunet"][1]
    assert stunet[stunet.index("--init-from") + 1] == "/mnt/checkpoints/t2i"


def test_gpu_overlay_requests_gpus_for_everything_that_trains_or_serves(rendered):
    objs = rendered["gpu"]
    groups = []  # (object, group) for every worker group that trains or serves
    for name in TRAIN_JOBS:
        job = one(objs, "RayJob", name)
        assert "--gpu" in k8s.split_entrypoint(job["spec"]["entrypoint"])[-1]
        groups += [(name, g) for g in k8s.cluster_spec(job)["workerGroupSpecs"]]
    service = one(objs, "RayService", "lumiere-api")
    groups += [("lumiere-api", g) for g in k8s.cluster_spec(service)["workerGroupSpecs"]]
    interactive = one(objs, "RayCluster", "lumiere")
    groups += [("lumiere", g) for g in k8s.cluster_spec(interactive)["workerGroupSpecs"]
               if not g["groupName"].startswith("cpu-")]
    assert len(groups) == 5
    for owner, g in groups:
        res = worker_container(g)["resources"]
        assert int(res["requests"][k8s.GPU]) >= 1 and res["limits"][k8s.GPU] == res["requests"][k8s.GPU], owner
        spec = g["template"]["spec"]
        assert {"key": k8s.GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"], owner
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, owner
    # autoscaling: the interactive cluster and the API scale their GPU groups between min and max
    for obj in (interactive, service):
        spec = k8s.cluster_spec(obj)
        assert spec["enableInTreeAutoscaling"] is True
        gpu_groups = [g for g in spec["workerGroupSpecs"] if k8s.GPU in worker_container(g)["resources"]["limits"]]
        assert gpu_groups and all(g["minReplicas"] < g["maxReplicas"] for g in gpu_groups)
    # the dev overlay is CPU-only
    dev = rendered["dev"]
    assert k8s.GPU not in json.dumps(dev)
    assert not any("--gpu" in k8s.split_entrypoint(j["spec"]["entrypoint"])[-1] for j in by_kind(dev, "RayJob"))


_UNITS = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(q) -> float:
    """A Kubernetes quantity (8, '64', '512Gi') as a number (bytes for memory)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?", str(q))
    assert m, q
    return float(m.group(1)) * _UNITS[m.group(2) or ""]


def assert_whole_node_gpu_pod(objs, owner, group):
    """One worker pod with all of a node's 8 GPUs: CPU/memory per GPU as the overlay documents, /dev/shm a Memory
    emptyDir large enough for Ray's default object store (30% of the pod's memory) plus NCCL, the NCCL env."""
    c = worker_container(group)
    res = c["resources"]
    assert res["requests"] == res["limits"], owner
    gpus = int(res["limits"][k8s.GPU])
    assert gpus == 8, owner
    assert quantity(res["limits"]["cpu"]) == 8 * gpus and quantity(res["limits"]["memory"]) == 64 * gpus * 2**30
    spec = group["template"]["spec"]
    (shm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory", owner
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"], owner
    memory, shm_size = quantity(res["limits"]["memory"]), quantity(shm["emptyDir"]["sizeLimit"])
    assert 0.3 * memory < shm_size < 0.5 * memory, owner  # the object store fits, and the processes keep the rest
    assert {"configMapRef": {"name": "lumiere-nccl"}} in c["envFrom"], owner
    nccl = one(objs, "ConfigMap", "lumiere-nccl")["data"]
    assert nccl["NCCL_DEBUG"] == "WARN" and nccl["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "NCCL_ASYNC_ERROR_HANDLING" not in nccl  # the deprecated name, never both
    return gpus


def test_gpu_overlay_trains_with_one_pod_per_node_holding_all_its_gpus(rendered):
    """The default GPU layout: 8 Ray Train workers (`--num-workers 8 --gpu`) on one pod with 8 GPUs (NVLink between
    the ranks), not 8 pods x 1 GPU; workers = pods x GPUs per pod = what wait-resources waits for."""
    objs = rendered["gpu"]
    for name in TRAIN_JOBS:
        job = one(objs, "RayJob", name)
        wait, main = k8s.split_entrypoint(job["spec"]["entrypoint"])
        (group,) = k8s.cluster_spec(job)["workerGroupSpecs"]
        gpus = assert_whole_node_gpu_pod(objs, name, group)
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1, name
        workers = int(main[main.index("--num-workers") + 1])
        assert "--gpu" in main and workers == group["replicas"] * gpus == 8, name
        assert wait[wait.index("--gpus") + 1] == str(workers), name
        head = k8s.cluster_spec(job)["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert k8s.GPU not in head["resources"]["limits"], name  # the driver needs no GPU
    # the interactive cluster's GPU workers are whole nodes too (autoscaled 0..N); the API's stay 1 GPU a replica
    interactive = one(objs, "RayCluster", "lumiere")
    (gpu_group,) = [g for g in k8s.cluster_spec(interactive)["workerGroupSpecs"] if g["groupName"] == "gpu-workers"]
    assert_whole_node_gpu_pod(objs, "lumiere", gpu_group)
    assert gpu_group["minReplicas"] == 0 < gpu_group["maxReplicas"]
    service = one(objs, "RayService", "lumiere-api")
    assert all(int(worker_container(g)["resources"]["limits"][k8s.GPU]) == 1
               for g in k8s.cluster_spec(service)["workerGroupSpecs"])
    # NCCL settings only where NCCL runs
    assert "lumiere-nccl" not in json.dumps(service) and "lumiere-nccl" not in json.dumps(rendered["dev"])


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_no_secret_is_committed_only_referenced(rendered, overlay):
    objs = rendered[overlay]
    assert not by_kind(objs, "Secret")
    referenced = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("secretRef", "secretKeyRef", "secret"):
                    referenced.add(value.get("name") or value.get("secretName"))
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(objs)
    assert referenced == SECRETS
    for path in sorted(INFRA.rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".json", ".env", ""):
            content = path.read_text(errors="replace")
            assert not re.search(r"^kind:\s*Secret\b", content, re.M), path
            assert "secretGenerator" not in content, path
            assert not re.search(r"(?i)(password|secret_access_key|api_keys?)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}",
                                 content.replace("POSTGRES_PASSWORD", "")), path


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_rayservice_serves_the_same_config_file_as_lumiere_serve(rendered, overlay):
    service = one(rendered[overlay], "RayService", "lumiere-api")
    assert service["spec"]["serveConfigV2"] == (ROOT / "serve" / "config.yaml").read_text()
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert [a["import_path"] for a in config["applications"]] == ["serve.app:build_app"]
    assert config["http_options"]["host"] == "0.0.0.0"  # the proxy listens on the pod's interfaces
    # the cluster values the app reads from its environment (the file names no model or device), on the head and
    # the workers: Serve builds the app on either
    for group in [k8s.cluster_spec(service)["headGroupSpec"], *k8s.cluster_spec(service)["workerGroupSpecs"]]:
        c = group["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert {"LUMIERE_DB_URL", "LUMIERE_ARTIFACTS"} <= set(env)
        assert env["LUMIERE_MODEL_URI"] == "models:/lumiere-stunet@production"
        assert env["LUMIERE_DEVICE"] == {"dev": "cpu", "gpu": "cuda"}[overlay]
        assert {"secretRef": {"name": "lumiere-api-keys"}} in c["envFrom"]
        assert group["template"]["metadata"]["labels"]["lumiere.io/api"] == "true"


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_only_the_api_is_reachable_from_outside_the_namespace(rendered, overlay):
    objs = rendered[overlay]
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(objs, "NetworkPolicy")}
    deny = policies["lumiere-default-deny-ingress"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    for name, spec in policies.items():
        for rule in spec.get("ingress", []):
            sources = rule.get("from")
            if name == "lumiere-allow-api":
                assert sources is None and rule["ports"] == [{"protocol": "TCP", "port": 8000}]
            elif name == "lumiere-allow-same-namespace":
                assert sources == [{"podSelector": {}}] and "ports" not in rule
            else:  # the KubeRay operator, from its own namespace, to the dashboard only
                assert all("namespaceSelector" in s and s["namespaceSelector"]["matchLabels"] for s in sources)
                assert {p["port"] for p in rule["ports"]} <= {8265, 52365}
    api_pods = [o["metadata"]["name"] for o in objs for t in k8s.pod_templates(o)
                if (t.get("metadata") or {}).get("labels", {}).get("lumiere.io/api") == "true"]
    assert set(api_pods) == {"lumiere-api"}
    for svc in by_kind(objs, "Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]


def test_submitter_rbac_is_least_privilege(rendered):
    objs = rendered["gpu"]
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    rules = one(objs, "Role", "lumiere-submitter")["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert all("*" not in x for x in granted)
    assert not {r for _, r, _ in granted} & {"secrets", "configmaps", "roles", "rolebindings"}
    writes = {(g, r, v) for g, r, v in granted if v in ("create", "update", "patch", "delete", "deletecollection")}
    assert writes == {("ray.io", "rayjobs", "create"), ("ray.io", "rayjobs", "delete")}
    binding = one(objs, "RoleBinding", "lumiere-submitter")
    assert binding["roleRef"]["name"] == "lumiere-submitter"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lumiere-submitter", "namespace": "lumiere"}]
    ray_sa = one(objs, "ServiceAccount", "lumiere-ray")
    assert ray_sa["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_every_ray_pod_is_non_root_and_mounts_the_checkpoint_volume(rendered, overlay):
    objs = rendered[overlay]
    pvc = one(objs, "PersistentVolumeClaim", "lumiere-checkpoints")
    assert pvc["spec"]["accessModes"] == (["ReadWriteMany"] if overlay == "gpu" else ["ReadWriteOnce"])
    for obj in ray_objects(objs):
        for t in k8s.pod_templates(obj):
            spec = t["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
            c = spec["containers"][0]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert {"name": "checkpoints", "mountPath": "/mnt/checkpoints"} in c["volumeMounts"]
            assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "lumiere-checkpoints"}} \
                in spec["volumes"]
            assert {"configMapRef": {"name": "lumiere-env"}} in c["envFrom"]
    env = one(objs, "ConfigMap", "lumiere-env")["data"]
    assert env["MLFLOW_TRACKING_URI"] == "http://lumiere-mlflow:5000"
    mlflow = one(objs, "Deployment", "lumiere-mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert any(a.startswith("--backend-store-uri=postgresql://") for a in mlflow["args"])
    images = {c["image"] for o in objs for t in k8s.pod_templates(o) for c in t["spec"]["containers"]}
    assert images == {"postgres:16", k8s.project_image(objs)}


# ------------------------------------------------------------------------------ gang scheduling components


@needs_kustomize
@pytest.mark.parametrize("component,labels", [
    ("kueue", {"kueue.x-k8s.io/queue-name": "lumiere"}),
    ("volcano", {"ray.io/scheduler-name": "volcano", "volcano.sh/queue-name": "lumiere"})])
def test_gang_scheduling_component_labels_the_training_rayjobs(kuberay_schemas, component, labels):
    """An opt-in component adds the batch scheduler's labels to the training RayJobs (the fixed gangs) and to
    nothing else; the result is still valid against the KubeRay CRDs, and `submit` keeps the labels."""
    assert component in k8s.components()
    plain = k8s.render_overlay("gpu")
    objs = k8s.render_overlay("gpu", with_components=[component])
    assert len(objs) == len(plain)
    for obj in ray_objects(objs):
        have = obj["metadata"]["labels"]
        if obj["kind"] == "RayJob" and obj["metadata"]["name"] in TRAIN_JOBS:
            assert labels.items() <= have.items(), obj["metadata"]["name"]
            # what Kueue requires of a RayJob it manages, and what Volcano's gang is made of: a fixed cluster
            assert obj["spec"]["shutdownAfterJobFinishes"] is True and "clusterSelector" not in obj["spec"]
            assert not k8s.cluster_spec(obj).get("enableInTreeAutoscaling")
        else:  # ingest (autoscaled), the interactive cluster and the API (long-lived) are not queued
            assert not set(labels) & set(have), obj["metadata"]["name"]
        assert not crd_errors(kuberay_schemas, obj), obj["metadata"]["name"]
    # everything but those labels is the overlay's
    strip = lambda o: json.dumps({**o, "metadata": {**o["metadata"], "labels": {  # noqa: E731
        k: v for k, v in o["metadata"]["labels"].items() if k not in labels}}}, sort_keys=True)
    assert sorted(map(strip, objs)) == sorted(map(strip, plain))
    job = k8s.build_job("gpu", "t2i", k8s.JobOverrides(name="t2i-q"), with_components=[component])
    assert labels.items() <= job["metadata"]["labels"].items()
    # the CLI composes it too
    r = lumiere("render", "--overlay", "gpu", "--component", component, "--only", "RayJob")
    assert r.returncode == 0, r.stderr
    jobs = {o["metadata"]["name"]: o for o in yaml.safe_load_all(r.stdout) if o}
    assert all(labels.items() <= jobs[n]["metadata"]["labels"].items() for n in TRAIN_JOBS)
    r = lumiere("submit", "t2i", "--overlay", "gpu", "--component", component, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert labels.items() <= yaml.safe_load(r.stdout)["metadata"]["labels"].items()


@needs_kustomize
def test_unknown_component_is_a_clear_error():
    r = lumiere("render", "--overlay", "gpu", "--component", "slurm")
    assert_one_line_error(r, "unknown component 'slurm'", "kueue", "volcano")


def test_component_examples_are_examples_only():
    """The example queue manifests are not part of any component (a cluster admin sizes and applies them)."""
    for name in ("kueue", "volcano"):
        d = INFRA / "k8s" / "components" / name
        comp = yaml.safe_load((d / "kustomization.yaml").read_text())
        assert comp["kind"] == "Component" and not comp.get("resources"), name
        examples = list(d.glob("*.example.yaml"))
        assert examples, name
        for ex in examples:
            docs = [o for o in yaml.safe_load_all(ex.read_text()) if o]
            assert docs and all(o["kind"] in ("ResourceFlavor", "ClusterQueue", "LocalQueue", "Queue") for o in docs)


# ----------------------------------------------------------------------------------------- the Docker image


def dockerfile_stages() -> list[list[str]]:
    lines, stages = [], []
    for raw in (INFRA / "docker" / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        (stages[-1] if stages else lines).append(line)
    return stages


def test_dockerfile_is_multistage_non_root_and_pinned():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert all("${CUDA_IMAGE}" in s[0] for s in stages)
    arg = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+-(base|runtime|cudnn-runtime)-ubuntu", arg)
    pip = [line for line in build if "pip install" in line]
    assert pip and all("-c constraints.txt" in line for line in pip)
    assert any("COPY pyproject.toml constraints.txt" in line for line in build)
    final_text = "\n".join(final)
    for tool in ("build-essential", "pip install", "g++", "cmake"):  # no build tools or installs in the final image
        assert tool not in final_text, tool
    # except what torch.compile's Triton needs at run time to build its kernel launchers
    assert all(t in final_text for t in ("gcc", "libc6-dev", "python3.11-dev")), "torch.compile needs a C compiler"
    assert any(line.startswith("COPY --from=build /opt/venv") for line in final)
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "wget" in final_text  # KubeRay's default probes call it
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "mlruns", "demo-output", "data"} <= set(ignored)


# The NVIDIA driver branch each CUDA major.minor needs on the nodes (NVIDIA's CUDA release notes, Linux). Bumping
# CUDA means adding its line here and writing the new requirement into the Dockerfile and infra/README.md.
MIN_DRIVER = {"13.0": 580}


def test_dockerfile_cuda_base_matches_torchs_wheel_and_names_the_driver():
    """The image's CUDA base has the CUDA major.minor of torch's wheel (its nvidia-cuda-runtime pin in
    constraints.txt), and the driver that CUDA needs is written down where operators read it."""
    constraints = (ROOT / "constraints.txt").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", constraints, re.M))
    wheel_cuda = ".".join(pins["nvidia-cuda-runtime"].split(".")[:2])
    assert pins["cuda-toolkit"].startswith(wheel_cuda + "."), "constraints.txt pins two CUDA versions"
    text = (INFRA / "docker" / "Dockerfile").read_text()
    (tag,) = re.findall(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+\.\d+)\.\d+-", text)
    assert tag == wheel_cuda, f"the Dockerfile's CUDA base is {tag}, torch's wheel is built for CUDA {wheel_cuda}"
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.__version__.split("+")[0] == pins["torch"] and torch.version.cuda:
        assert torch.version.cuda == wheel_cuda  # the pin above is the wheel's CUDA, not a stray package
    assert wheel_cuda in MIN_DRIVER, f"CUDA {wheel_cuda}: add its minimum NVIDIA driver to MIN_DRIVER and the docs"
    driver = MIN_DRIVER[wheel_cuda]
    for doc in (text, (INFRA / "README.md").read_text()):
        assert re.search(rf"CUDA {re.escape(wheel_cuda)}", doc) and re.search(rf">=\s*{driver}\b", doc)


# ------------------------------------------------------------------------------------ submit: the overrides


@needs_kustomize
def test_submit_overrides_rewrite_the_rayjob():
    ov = k8s.JobOverrides(image="reg.example/lumiere:1.2", namespace="team-a", name="stunet-exp1",
                          data="s3://bucket/shards-v2", output="/mnt/checkpoints/exp1", num_workers=16,
                          gpus_per_pod=8, run_name="exp1", config="base")
    job = k8s.build_job("gpu", "stunet", ov)
    assert job["metadata"]["name"] == "stunet-exp1" and job["metadata"]["namespace"] == "team-a"
    assert job["metadata"]["labels"]["lumiere.io/job"] == "train-stunet"
    wait, main = k8s.split_entrypoint(job["spec"]["entrypoint"])
    assert wait == ["lumiere", "k8s", "wait-resources", "--gpus", "16"]
    opts = {main[i]: main[i + 1] for i in range(len(main) - 1) if main[i].startswith("--")}
    assert opts["--data"] == "s3://bucket/shards-v2" and opts["--output"] == "/mnt/checkpoints/exp1"
    assert opts["--num-workers"] == "16" and opts["--run-name"] == "exp1" and "--gpu" in main
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2  # 16 workers / 8 GPUs a pod
    res = worker_container(group)["resources"]
    assert res["limits"] == {"cpu": "64", "memory": "512Gi", k8s.GPU: 8}
    images = {c["image"] for t in k8s.pod_templates(job) for c in t["spec"]["containers"]}
    assert images == {"reg.example/lumiere:1.2"}
    ingest = k8s.build_job("dev", "ingest", k8s.JobOverrides(input="s3://raw/videos", output="s3://raw/shards"),
                           now=lambda: 0)
    assert ingest["metadata"]["name"] == "lumiere-ingest-19700101-000000"
    assert shlex.split(ingest["spec"]["entrypoint"])[:6] == ["lumiere", "ingest", "--input", "s3://raw/videos",
                                                             "--output", "s3://raw/shards"]
    with pytest.raises(LumiereError, match="--num-workers applies to training jobs"):
        k8s.build_job("dev", "ingest", k8s.JobOverrides(num_workers=3))
    with pytest.raises(LumiereError, match="unknown job 'train-foo'"):
        k8s.build_job("dev", "train-foo", k8s.JobOverrides())
    with pytest.raises(LumiereError, match="not a valid RayJob name"):
        k8s.build_job("dev", "t2i", k8s.JobOverrides(name="Bad_Name"))


@needs_kustomize
@pytest.mark.parametrize("workers,per_pod,pods,gpus", [
    (None, None, 1, 8),  # the overlay's: one 8-GPU node
    (64, None, 8, 8),  # 8 nodes x 8 GPUs
    (16, 4, 4, 4),  # 4 nodes x 4 GPUs
    (4, None, 1, 4),  # fewer workers than a node's GPUs: one pod with just those
    (2, 1, 2, 1)])  # 1 GPU a pod (the old layout), on request
def test_n_nodes_x_g_gpus_layout(workers, per_pod, pods, gpus):
    """--num-workers N*G --gpus-per-pod G: N pods of G GPUs, Ray Train workers = pods x GPUs per pod, CPU, memory and
    /dev/shm per GPU as in the overlay, and wait-resources waits for all the GPUs."""
    job = k8s.build_job("gpu", "t2i", k8s.JobOverrides(num_workers=workers, gpus_per_pod=per_pod))
    wait, main = k8s.split_entrypoint(job["spec"]["entrypoint"])
    (group,) = k8s.cluster_spec(job)["workerGroupSpecs"]
    res = worker_container(group)["resources"]
    n = int(main[main.index("--num-workers") + 1])
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == pods
    assert int(res["limits"][k8s.GPU]) == int(res["requests"][k8s.GPU]) == gpus and n == pods * gpus
    assert wait == ["lumiere", "k8s", "wait-resources", "--gpus", str(n)]
    assert quantity(res["limits"]["cpu"]) == 8 * gpus and quantity(res["limits"]["memory"]) == 64 * gpus * 2**30
    (shm,) = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert quantity(shm["emptyDir"]["sizeLimit"]) == 24 * gpus * 2**30


@needs_kustomize
def test_a_layout_that_would_leave_gpus_idle_is_refused():
    with pytest.raises(LumiereError, match="--num-workers 12 does not fill pods of 8 GPUs"):
        k8s.build_job("gpu", "t2i", k8s.JobOverrides(num_workers=12))
    with pytest.raises(LumiereError, match="--num-workers 4 does not fill pods of 8 GPUs"):
        k8s.build_job("gpu", "t2i", k8s.JobOverrides(num_workers=4, gpus_per_pod=8))
    with pytest.raises(LumiereError, match="--gpus-per-pod needs a GPU training job"):
        k8s.build_job("dev", "t2i", k8s.JobOverrides(gpus_per_pod=2))
    # the old option name still works
    r = lumiere("submit", "t2i", "--overlay", "gpu", "--num-workers", "16", "--gpus-per-worker", "8", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2


# ------------------------------------------------------------------------- submit/status against an API stand-in


class FakeApiServer:
    """FAKE: an HTTP stand-in for the Kubernetes API server. Records requests; answers from `routes`, a dict
    (METHOD, path) -> (status, JSON body or str); anything else is a 404 Status, as a real API server answers."""

    def __init__(self):
        self.requests: list[dict] = []
        self.routes: dict[tuple[str, str], tuple[int, object]] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                fake.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                      "body": json.loads(raw) if raw else None,
                                      "auth": self.headers.get("Authorization")})
                missing = (404, status_body(404, "NotFound", "the server could not find the requested resource"))
                status, body = fake.routes.get((self.command, url.path), missing)
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def calls(self):
        """The requests made, less the client's GET /version handshake."""
        return [(r["method"], r["path"]) for r in self.requests if r["path"] != "/version"]


def status_body(code, reason, message, details=None):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code, **({"details": details} if details else {})}


RAY_RESOURCES = {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "ray.io/v1", "resources": [
    {"name": p, "singularName": p[:-1], "namespaced": True, "kind": k, "verbs": ["create", "get", "list", "delete"]}
    for k, p in k8s.RAY_KINDS.items()]}


@pytest.fixture
def api(tmp_path):
    server = FakeApiServer()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
        "users": [{"name": "me", "user": {"token": "test-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}]}))
    server.kubeconfig = str(kubeconfig)
    yield server
    server.close()


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def lumiere(*args, kubeconfig=None) -> Run:
    """`lumiere k8s ARGS` in-process through the CLI's real entry point (`main`: one-line errors, exit code 2),
    with KUBECONFIG pointing at `kubeconfig` (default: a file that does not exist)."""
    from cli.main import main

    saved = {k: os.environ.get(k) for k in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    os.environ.pop("KUBERNETES_SERVICE_HOST", None)
    os.environ["KUBECONFIG"] = kubeconfig or "/nonexistent/kubeconfig"
    out, err, argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
    sys.argv = ["lumiere", "k8s", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Run(code, out.getvalue(), err.getvalue())


@needs_kustomize
def test_submit_creates_the_rayjob_and_status_reads_it(api):
    ns = "lumiere-dev"
    jobs_path = f"/apis/ray.io/v1/namespaces/{ns}/rayjobs"
    api.routes[("GET", "/apis/ray.io/v1")] = (200, RAY_RESOURCES)
    api.routes[("GET", f"/api/v1/namespaces/{ns}")] = (200, {"apiVersion": "v1", "kind": "Namespace",
                                                            "metadata": {"name": ns}})

    api.routes[("POST", jobs_path)] = (201, {})
    r = lumiere("submit", "train-t2i", "--overlay", "dev", "--name", "t2i-run1", "--data", "/mnt/checkpoints/d",
                "--num-workers", "3", "--run-name", "r1", kubeconfig=api.kubeconfig)
    assert r.returncode == 0, r.stderr
    assert api.calls() == [("GET", "/apis/ray.io/v1"), ("GET", f"/api/v1/namespaces/{ns}"), ("POST", jobs_path)]
    assert all(req["auth"] == "Bearer test-token" for req in api.requests if req["path"] != "/version")
    body = api.requests[-1]["body"]
    assert body["apiVersion"] == "ray.io/v1" and body["kind"] == "RayJob"
    assert body["metadata"]["name"] == "t2i-run1" and body["metadata"]["namespace"] == ns
    expected = k8s.build_job("dev", "t2i", k8s.JobOverrides(name="t2i-run1", data="/mnt/checkpoints/d",
                                                            num_workers=3, run_name="r1"))
    assert body == expected
    assert body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3
    assert "created RayJob lumiere-dev/t2i-run1" in r.stdout

    # status: one GET of the RayJob, its deployment and Ray job status shown
    job = dict(body, status={"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "jobId": "t2i-run1-x7k",
                             "rayClusterName": "t2i-run1-raycluster-abc", "startTime": "2026-11-21T10:00:00Z"})
    api.routes[("GET", f"{jobs_path}/t2i-run1")] = (200, job)
    api.requests.clear()
    r = lumiere("status", "t2i-run1", kubeconfig=api.kubeconfig)
    assert r.returncode == 0, r.stderr
    assert api.calls() == [("GET", "/apis/ray.io/v1"), ("GET", f"{jobs_path}/t2i-run1")]
    assert "RayJob lumiere-dev/t2i-run1" in r.stdout
    assert "deployment status: Running" in r.stdout and "ray job status: RUNNING" in r.stdout
    assert "ray cluster: t2i-run1-raycluster-abc" in r.stdout

    # status without a name lists the project's RayJobs by label
    api.routes[("GET", jobs_path)] = (200, {"apiVersion": "ray.io/v1", "kind": "RayJobList", "metadata": {},
                                            "items": [job]})
    api.requests.clear()
    r = lumiere("status", kubeconfig=api.kubeconfig)
    assert r.returncode == 0, r.stderr
    assert api.calls()[-1] == ("GET", jobs_path)
    assert api.requests[-1]["query"]["labelSelector"] == ["app.kubernetes.io/part-of=lumiere"]
    assert "t2i-run1  Running/RUNNING" in r.stdout


@needs_kustomize
def test_logs_follow_the_submitter_pod_and_delete_removes_the_job(api):
    ns = "lumiere"
    jobs_path = f"/apis/ray.io/v1/namespaces/{ns}/rayjobs"
    api.routes[("GET", "/apis/ray.io/v1")] = (200, RAY_RESOURCES)
    api.routes[("GET", f"{jobs_path}/ing1")] = (200, {"apiVersion": "ray.io/v1", "kind": "RayJob",
                                                     "metadata": {"name": "ing1", "namespace": ns}})
    api.routes[("GET", f"/api/v1/namespaces/{ns}/pods")] = (200, {"apiVersion": "v1", "kind": "PodList",
        "metadata": {}, "items": [{"metadata": {"name": "ing1-abcde", "namespace": ns,
                                                "creationTimestamp": "2026-11-21T10:00:00Z"}}]})
    api.routes[("GET", f"/api/v1/namespaces/{ns}/pods/ing1-abcde/log")] = (200, "[ingest] 10 clips\ndone\n")
    r = lumiere("logs", "ing1", "--overlay", "gpu", kubeconfig=api.kubeconfig)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[ingest] 10 clips", "done"]
    pods = [q for q in api.requests if q["path"] == f"/api/v1/namespaces/{ns}/pods"]
    assert pods[0]["query"]["labelSelector"] == ["job-name=ing1"]
    assert api.requests[-1]["query"]["follow"] == ["true"]

    api.routes[("DELETE", f"{jobs_path}/ing1")] = (200, status_body(200, "", ""))
    api.requests.clear()
    r = lumiere("delete", "ing1", "--namespace", ns, kubeconfig=api.kubeconfig)
    assert r.returncode == 0, r.stderr
    assert api.calls()[-1] == ("DELETE", f"{jobs_path}/ing1")
    assert api.requests[-1]["query"]["propagationPolicy"] == ["Background"]


def assert_one_line_error(r, *fragments):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@needs_kustomize
def test_clear_errors_no_kubeconfig_no_kuberay_no_namespace_name_taken(api):
    r = lumiere("submit", "t2i")
    assert_one_line_error(r, "no kubeconfig", "/nonexistent/kubeconfig", "KUBECONFIG")

    # no ray.io group on the server: the KubeRay CRDs are missing
    r = lumiere("submit", "t2i", kubeconfig=api.kubeconfig)
    assert_one_line_error(r, "KubeRay CRDs are not installed", api.url)
    assert api.calls() == [("GET", "/apis/ray.io/v1")]

    # the namespace does not exist
    api.routes[("GET", "/apis/ray.io/v1")] = (200, RAY_RESOURCES)
    api.routes[("GET", "/api/v1/namespaces/nope")] = (404, status_body(404, "NotFound", 'namespaces "nope" not found',
                                                                      {"name": "nope", "kind": "namespaces"}))
    r = lumiere("submit", "t2i", "--namespace", "nope", kubeconfig=api.kubeconfig)
    assert_one_line_error(r, "namespace nope does not exist")
    assert ("POST", "/apis/ray.io/v1/namespaces/nope/rayjobs") not in api.calls()

    # a submitter that may not read namespaces (403) learns it from the create's 404 instead
    api.routes[("GET", "/api/v1/namespaces/nope")] = (403, status_body(403, "Forbidden", "forbidden"))
    api.routes[("POST", "/apis/ray.io/v1/namespaces/nope/rayjobs")] = (
        404, status_body(404, "NotFound", 'namespaces "nope" not found', {"name": "nope", "kind": "namespaces"}))
    r = lumiere("submit", "t2i", "--namespace", "nope", kubeconfig=api.kubeconfig)
    assert_one_line_error(r, "namespace nope does not exist")

    # the name is taken
    api.routes[("GET", "/api/v1/namespaces/lumiere-dev")] = (200, {"apiVersion": "v1", "kind": "Namespace",
                                                                  "metadata": {"name": "lumiere-dev"}})
    api.routes[("POST", "/apis/ray.io/v1/namespaces/lumiere-dev/rayjobs")] = (
        409, status_body(409, "AlreadyExists", 'rayjobs.ray.io "t2i" already exists'))
    r = lumiere("submit", "t2i", "--name", "t2i", kubeconfig=api.kubeconfig)
    assert_one_line_error(r, "a RayJob named t2i already exists in namespace lumiere-dev", "--name")

    # status of a job that is not there; an API server that cannot be reached
    r = lumiere("status", "gone", kubeconfig=api.kubeconfig)
    assert_one_line_error(r, "no RayJob named gone in namespace lumiere-dev")
    api.close()
    r = lumiere("status", "gone", kubeconfig=api.kubeconfig)
    assert_one_line_error(r, "cannot reach the Kubernetes API server", api.url)


def test_render_cli_prints_yaml_with_overrides():
    if not (shutil.which("kubectl") or shutil.which("kustomize")):
        pytest.skip("rendering the overlays needs kubectl or kustomize on PATH")
    r = lumiere("render", "--overlay", "gpu", "--image", "reg.example/lumiere:9", "--namespace", "ml")
    assert r.returncode == 0, r.stderr
    objs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert one(objs, "Namespace", "ml")
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {"ml"}
    assert k8s.project_image(objs) == "reg.example/lumiere:9"
    assert not by_kind(objs, "RayJob") and by_kind(objs, "RayService")  # jobs are submitted, not applied
    r = lumiere("render", "--overlay", "dev", "--only", "RayService")
    assert [o["kind"] for o in yaml.safe_load_all(r.stdout)] == ["RayService"]
    r = lumiere("render", "--overlay", "staging")
    assert_one_line_error(r, "unknown overlay 'staging'")


def test_gpu_overlay_serve_reserves_gpus_and_can_use_the_whole_gpu_pool(rendered, monkeypatch):
    """The app built with the gpu overlay's serve environment (as Serve builds it from serveConfigV2): every
    deployment that puts a model on CUDA reserves GPUs, and the model deployments may scale to every GPU of the
    serve worker group (a GPU cannot run here: the config is rendered, not deployed)."""
    from serve.app import build_app

    service = one(rendered["gpu"], "RayService", "lumiere-api")
    workers = k8s.cluster_spec(service)["workerGroupSpecs"][0]
    c = workers["template"]["spec"]["containers"][0]
    for var in list(os.environ):
        if var.startswith("LUMIERE_"):
            monkeypatch.delenv(var)
    for e in c["env"]:
        if e.get("value") is not None:
            monkeypatch.setenv(e["name"], e["value"])
    monkeypatch.setenv("LUMIERE_API_KEYS", "k")  # from the Secret in the cluster
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = build_app(config["applications"][0]["args"])
    encoder, generator, _, _ = app._bound_deployment.init_args
    gpus_per_pod = int(c["resources"]["limits"]["nvidia.com/gpu"])
    pool = workers["maxReplicas"] * gpus_per_pod
    gen = generator._bound_deployment
    assert gen.ray_actor_options["num_gpus"] == 1
    assert gen._deployment_config.autoscaling_config.max_replicas == pool == 8
    assert 0 < encoder._bound_deployment.ray_actor_options["num_gpus"] < 1  # the encoder shares a GPU
    assert "num_gpus" not in app._bound_deployment.ray_actor_options  # the Ingress runs no model
    # and the YAML names no ceiling or actor options that would replace the app's whole
    for d in config["applications"][0]["deployments"]:
        assert "autoscaling_config" not in d, d["name"]
        assert d["name"] == "Ingress" or "ray_actor_options" not in d, d["name"]
