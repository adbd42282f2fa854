"""The operators' library behind `lumiere k8s` (cli/k8s.py): render the KubeRay manifests in `infra/k8s` and
drive RayJobs on a Kubernetes cluster. It lives beside the manifests it renders, not in the model package.

- render: `kubectl kustomize` (or `kustomize build`) of an overlay, which also inlines the Serve config
  (infra/k8s/base/serve-config.yaml, a checked copy of `serve/config.yaml`) into the RayService, optionally with
  kustomize components (infra/k8s/components: kueue, volcano); then the user's overrides (image, namespace, data
  paths, workers, GPUs per pod) applied in Python.
- submit: render one RayJob of the overlay with the overrides, give it a unique name and create it through the
  `kubernetes` client (`CustomObjectsApi`, group `ray.io`, version `v1`, plural `rayjobs`), after checking that
  the cluster has the KubeRay CRDs and the namespace.
- status / logs / delete: read the RayJob (or a RayService) and its submitter pod.
- wait-resources: runs *inside* a RayJob, before `lumiere train`, until the job's workers have joined.

Every problem the user can fix (no kubeconfig, no KubeRay, no namespace, a name already taken, no kubectl)
is a `LumiereError`: one line, exit code 2.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lumiere.errors import LumiereError

GROUP, VERSION = "ray.io", "v1"
RAY_KINDS = {"RayJob": "rayjobs", "RayService": "rayservices", "RayCluster": "rayclusters"}
OVERLAYS = ("dev", "gpu")
# short names accepted by `submit` -> metadata.name of the RayJob in the manifests
JOBS = {"ingest": "lumiere-ingest", "train-t2i": "lumiere-train-t2i", "train-stunet": "lumiere-train-stunet",
        "train-ssr": "lumiere-train-ssr"}
JOB_ALIASES = {"t2i": "train-t2i", "stunet": "train-stunet", "ssr": "train-ssr"}
GPU = "nvidia.com/gpu"
PART_OF = "app.kubernetes.io/part-of=lumiere"


# ---------------------------------------------------------------------------------------------------- render


def manifests_dir(path: str | Path | None = None) -> Path:
    """The `infra/k8s` directory: the given one, else the checkout this package runs from, else ./infra/k8s."""
    candidates = [Path(path)] if path else [Path(__file__).resolve().parent / "k8s", Path.cwd() / "infra" / "k8s"]
    for c in candidates:
        if (c / "base" / "kustomization.yaml").is_file():
            return c
    where = ", ".join(str(c) for c in candidates)
    raise LumiereError(f"no KubeRay manifests found at {where}: run from a checkout of the project or pass "
                       "--manifests PATH/infra/k8s")


def kustomize_command(overlay_dir: Path) -> list[str]:
    """kubectl kustomize, or a standalone kustomize, with no extra flags: what `kubectl apply -k` renders. The
    RayService's Serve config is a copy inside the tree (infra/k8s/base/serve-config.yaml, kept equal to
    serve/config.yaml by `make serve-config` and checked by tests/test_infra.py)."""
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(overlay_dir)]
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(overlay_dir)]
    raise LumiereError("rendering the manifests needs kubectl (>= 1.27) or kustomize (>= 5) on PATH; neither found")


def components(manifests: str | Path | None = None) -> list[str]:
    """The kustomize components shipped in infra/k8s/components (kueue, volcano)."""
    d = manifests_dir(manifests) / "components"
    return sorted(p.parent.name for p in d.glob("*/kustomization.yaml"))


def render_overlay(overlay: str, manifests: str | Path | None = None,
                   with_components: Iterable[str] = ()) -> list[dict]:
    """Build an overlay (dev, gpu, or a path to any kustomization) into a list of objects, with the named
    components (infra/k8s/components/NAME, or a path) composed on top."""
    import yaml

    root = manifests_dir(manifests)
    overlay_dir = Path(overlay) if ("/" in overlay or overlay not in OVERLAYS) else root / "overlays" / overlay
    if not (overlay_dir / "kustomization.yaml").is_file():
        raise LumiereError(f"unknown overlay {overlay!r}: choose {', '.join(OVERLAYS)} or a directory with a "
                           "kustomization.yaml")
    comps = []
    for c in with_components:
        d = Path(c) if "/" in c else root / "components" / c
        if not (d / "kustomization.yaml").is_file():
            raise LumiereError(f"unknown component {c!r}: choose {', '.join(components(root)) or '(none)'} or a "
                               "directory with a kustomization.yaml of kind Component")
        comps.append(d.resolve())
    if not comps:
        return _kustomize(overlay_dir, yaml)
    # What an operator's own overlay would say (resources: [the overlay], components: [...]), in a scratch
    # directory. kustomize takes relative paths only.
    with tempfile.TemporaryDirectory(prefix="lumiere-kustomize-") as tmp:
        rel = lambda p: os.path.relpath(p, tmp)  # noqa: E731
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [rel(overlay_dir.resolve())], "components": [rel(c) for c in comps]}))
        return _kustomize(Path(tmp), yaml, shown=overlay_dir)


def _kustomize(directory: Path, yaml, shown: Path | None = None) -> list[dict]:
    proc = subprocess.run(kustomize_command(directory), capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LumiereError(f"kustomize failed on {shown or directory}: {last}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def to_yaml(objs: Iterable[dict]) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def represent_str(dumper, s):
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)

    Dumper.add_representer(str, represent_str)
    return yaml.dump_all(list(objs), Dumper=Dumper, sort_keys=False, width=1000)


def cluster_spec(obj: dict) -> dict:
    """The RayCluster spec inside a RayCluster, RayJob or RayService."""
    spec = obj.get("spec", {})
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec") or {},
            "RayService": spec.get("rayClusterConfig") or {}}.get(obj["kind"], {})


def pod_templates(obj: dict) -> list[dict]:
    """Every pod template of an object: Deployments/StatefulSets, Ray head and worker groups, the submitter."""
    spec = obj.get("spec", {})
    out = []
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        out.append(spec["template"])
    if obj["kind"] in RAY_KINDS:
        cs = cluster_spec(obj)
        if "headGroupSpec" in cs:
            out.append(cs["headGroupSpec"]["template"])
        out += [g["template"] for g in cs.get("workerGroupSpecs", [])]
        if obj["kind"] == "RayJob" and spec.get("submitterPodTemplate"):
            out.append(spec["submitterPodTemplate"])
    return out


def project_image(objs: list[dict]) -> str | None:
    """The image the Ray pods run (the project's image in this rendering)."""
    for o in objs:
        if o["kind"] in RAY_KINDS:
            for t in pod_templates(o):
                return t["spec"]["containers"][0]["image"]
    return None


def set_image(objs: list[dict], image: str) -> None:
    old = project_image(objs)
    for o in objs:
        for t in pod_templates(o):
            for c in t["spec"].get("containers", []) + t["spec"].get("initContainers", []):
                if c.get("image") == old:
                    c["image"] = image


def set_namespace(objs: list[dict], namespace: str) -> None:
    for o in objs:
        if o["kind"] == "Namespace":
            o["metadata"]["name"] = namespace
        elif o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            o["metadata"]["namespace"] = namespace
        if o["kind"] == "RoleBinding":
            for s in o.get("subjects", []):
                if s.get("kind") == "ServiceAccount":
                    s["namespace"] = namespace


@dataclass
class JobOverrides:
    """What `lumiere k8s submit` may change in a RayJob of the manifests (None: keep the overlay's value)."""

    image: str | None = None
    namespace: str | None = None
    name: str | None = None
    input: str | None = None  # ingest
    output: str | None = None
    data: str | None = None  # train
    config: str | None = None  # train (model config) or ingest (config file)
    init_from: str | None = None
    run_name: str | None = None
    num_workers: int | None = None
    gpus_per_pod: int | None = None  # GPUs per worker pod = Ray Train workers per pod (gpu: default all of a node's)
    extra_args: list[str] = field(default_factory=list)


def _set_option(argv: list[str], option: str, value: str | None) -> list[str]:
    """Replace `option VALUE` (or `option=VALUE`) in argv, or append it."""
    if value is None:
        return argv
    out = list(argv)
    for i, a in enumerate(out):
        if a == option and i + 1 < len(out):
            out[i + 1] = value
            return out
        if a.startswith(option + "="):
            out[i] = f"{option}={value}"
            return out
    return out + [option, value]


def _get_option(argv: list[str], option: str) -> str | None:
    for i, a in enumerate(argv):
        if a == option and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(option + "="):
            return a.split("=", 1)[1]
    return None


def split_entrypoint(entrypoint: str) -> list[list[str]]:
    """`a --x 1 && b --y 2` -> [[a, --x, 1], [b, --y, 2]] (the manifests chain commands with && only)."""
    return [shlex.split(part) for part in re.split(r"\s&&\s", entrypoint.strip())]


def join_entrypoint(commands: list[list[str]]) -> str:
    return " && ".join(shlex.join(c) for c in commands)


def apply_job_overrides(job: dict, ov: JobOverrides) -> dict:
    """Apply the overrides to one RayJob (in place) and return it."""
    spec = job["spec"]
    commands = split_entrypoint(spec["entrypoint"])
    main = commands[-1]
    is_train = len(main) > 2 and main[:2] == ["lumiere", "train"]
    is_ingest = main[:2] == ["lumiere", "ingest"]
    if not (is_train or is_ingest):
        raise LumiereError(f"RayJob {job['metadata']['name']} does not run `lumiere train` or `lumiere ingest`")
    if is_ingest:
        for opt, val in (("--data", ov.data), ("--init-from", ov.init_from), ("--run-name", ov.run_name),
                         ("--num-workers", ov.num_workers), ("--gpus-per-pod", ov.gpus_per_pod)):
            if val is not None:
                raise LumiereError(f"{opt} applies to training jobs, not to ingest")
        main = _set_option(main, "--input", ov.input)
        main = _set_option(main, "--output", ov.output)
        main = _set_option(main, "--config", ov.config)
    else:
        if ov.input is not None:
            raise LumiereError("--input applies to the ingest job; training reads --data")
        main = _set_option(main, "--data", ov.data)
        main = _set_option(main, "--output", ov.output)
        main = _set_option(main, "--config", ov.config)
        main = _set_option(main, "--init-from", ov.init_from)
        main = _set_option(main, "--run-name", ov.run_name)
        gpu = "--gpu" in main
        workers = ov.num_workers or int(_get_option(main, "--num-workers") or 1)
        main = _set_option(main, "--num-workers", str(workers))
        if ov.gpus_per_pod is not None and not gpu:
            raise LumiereError("--gpus-per-pod needs a GPU training job (the gpu overlay)")
        groups = cluster_spec(job).get("workerGroupSpecs", [])
        if len(groups) != 1:
            raise LumiereError(f"RayJob {job['metadata']['name']} should have one worker group, has {len(groups)}")
        group = groups[0]
        container = group["template"]["spec"]["containers"][0]
        if gpu:
            res = container.setdefault("resources", {})
            have = int(res.get("limits", {}).get(GPU) or res.get("requests", {}).get(GPU) or 1)
            # Ray Train runs one worker per GPU; the pods hold them: workers = pods x GPUs per pod. Fewer workers
            # than the overlay's pod holds: one pod with just those GPUs.
            per_pod = ov.gpus_per_pod or min(have, workers)
            if workers % per_pod:
                raise LumiereError(f"--num-workers {workers} does not fill pods of {per_pod} GPUs (the last pod "
                                   f"would hold idle GPUs): pass a multiple of {per_pod}, or a --gpus-per-pod that "
                                   f"divides {workers} (N nodes x G GPUs: --num-workers N*G --gpus-per-pod G)")
            if per_pod != have:  # scale the pod's CPU, memory and /dev/shm with its GPUs
                factor = per_pod / have
                for kind in ("requests", "limits"):
                    r = res.setdefault(kind, {})
                    for key in ("cpu", "memory"):
                        if key in r:
                            r[key] = _scale_quantity(r[key], factor)
                    r[GPU] = per_pod
                for v in group["template"]["spec"].get("volumes", []):
                    if v["name"] == "dshm" and (v.get("emptyDir") or {}).get("sizeLimit"):
                        v["emptyDir"]["sizeLimit"] = _scale_quantity(v["emptyDir"]["sizeLimit"], factor)
            pods = workers // per_pod
        else:
            pods = workers
        group["replicas"] = group["minReplicas"] = group["maxReplicas"] = pods
        for i, c in enumerate(commands[:-1]):  # keep `lumiere k8s wait-resources` in step
            if c[:3] == ["lumiere", "k8s", "wait-resources"]:
                c = [a for j, a in enumerate(c) if a not in ("--cpus", "--gpus") and
                     (j == 0 or c[j - 1] not in ("--cpus", "--gpus"))]
                commands[i] = c + (["--gpus", str(workers)] if gpu else ["--cpus", str(workers)])
    main = main + list(ov.extra_args)
    commands[-1] = main
    spec["entrypoint"] = join_entrypoint(commands)
    if ov.image:
        set_image([job], ov.image)
    if ov.namespace:
        job["metadata"]["namespace"] = ov.namespace
    return job


def _scale_quantity(q: str | int, factor: float) -> str:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(q))
    if not m:
        return str(q)
    value = float(m.group(1)) * factor
    return f"{value:g}{m.group(2)}"


def resolve_job(job: str) -> str:
    job = JOB_ALIASES.get(job, job)
    if job not in JOBS:
        raise LumiereError(f"unknown job {job!r}: choose one of {', '.join(JOBS)}")
    return job


def job_from_overlay(objs: list[dict], job: str) -> dict:
    name = JOBS[resolve_job(job)]
    for o in objs:
        if o["kind"] == "RayJob" and o["metadata"]["name"] == name:
            return o
    raise LumiereError(f"the overlay has no RayJob named {name}")


def build_job(overlay: str, job: str, ov: JobOverrides, manifests: str | Path | None = None,
              now: Callable[[], float] = time.time, with_components: Iterable[str] = ()) -> dict:
    """The RayJob `submit` creates: the overlay's (with the components), with the overrides and a unique name."""
    objs = render_overlay(overlay, manifests, with_components)
    body = job_from_overlay(objs, job)
    apply_job_overrides(body, ov)
    base = body["metadata"]["name"]
    name = ov.name or f"{base}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now()))}"
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,45}[a-z0-9])?", name):
        raise LumiereError(f"--name {name!r} is not a valid RayJob name (lowercase letters, digits and '-', at "
                           "most 47 characters: KubeRay derives longer names from it)")
    body["metadata"]["name"] = name
    labels = body["metadata"].setdefault("labels", {})
    labels["lumiere.io/job"] = resolve_job(job)
    return body


# ---------------------------------------------------------------------------------------------------- the API


def _status_message(e: Any) -> str:
    try:
        return json.loads(e.body).get("message") or e.reason
    except Exception:  # noqa: BLE001 - any body: fall back to the HTTP reason
        return str(getattr(e, "reason", e))


class Cluster:
    """A thin layer over the kubernetes client that turns API failures into one-line LumiereErrors."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None):
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        try:
            if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG") \
                    and not Path(os.path.expanduser("~/.kube/config")).exists():
                config.load_incluster_config()
            else:
                path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
                if not Path(path.split(os.pathsep)[0]).exists():
                    raise LumiereError(f"no kubeconfig: {path} does not exist; set KUBECONFIG or pass --kubeconfig "
                                       "(or run inside a pod with a service account)")
                config.load_kube_config(config_file=path, context=context)
        except ConfigException as e:
            raise LumiereError(f"cannot load the kubeconfig: {str(e).splitlines()[0]}") from None
        self.client = client
        self.host = client.Configuration.get_default_copy().host
        self.custom = client.CustomObjectsApi()
        self.core = client.CoreV1Api()

    def call(self, what: str, fn: Callable, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            if e.status in (401, 403):
                raise LumiereError(f"{what}: the API server refused ({e.status}): {_status_message(e)}") from None
            raise
        except (HTTPError, OSError) as e:
            raise LumiereError(f"cannot reach the Kubernetes API server at {self.host}: "
                               f"{type(e).__name__}") from None

    def check_kuberay(self, plural: str = "rayjobs") -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            res = self.call("KubeRay discovery", self.custom.get_api_resources, GROUP, VERSION)
        except ApiException as e:
            if e.status == 404:
                raise LumiereError(f"the KubeRay CRDs are not installed on {self.host} (no {GROUP}/{VERSION} API): "
                                   "install the KubeRay operator first (docs/operations.md)") from None
            raise LumiereError(f"KubeRay discovery failed ({e.status}): {_status_message(e)}") from None
        names = {r.name for r in (res.resources or [])}
        if plural not in names:
            raise LumiereError(f"the KubeRay CRDs on {self.host} have no {plural} ({GROUP}/{VERSION} serves "
                               f"{', '.join(sorted(names)) or 'nothing'}): upgrade the KubeRay operator")

    def check_namespace(self, namespace: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.read_namespace(namespace)
        except ApiException as e:
            if e.status == 404:
                raise LumiereError(_no_namespace(namespace)) from None
            if e.status != 403:  # a least-privilege submitter may not read namespaces: creating will tell
                raise LumiereError(f"reading namespace {namespace} failed ({e.status}): {_status_message(e)}") \
                    from None
        except Exception:  # noqa: BLE001 - connection problems are reported by the next call
            pass

    def create(self, namespace: str, plural: str, body: dict) -> dict:
        from kubernetes.client.exceptions import ApiException

        name = body["metadata"]["name"]
        try:
            return self.call("create", self.custom.create_namespaced_custom_object, GROUP, VERSION, namespace,
                             plural, body)
        except ApiException as e:
            msg = _status_message(e)
            if e.status == 409:
                raise LumiereError(f"a {body['kind']} named {name} already exists in namespace {namespace}: pass "
                                   "another --name or `lumiere k8s delete` it") from None
            if e.status == 404 and "namespace" in msg.lower():
                raise LumiereError(_no_namespace(namespace)) from None
            if e.status == 404:
                raise LumiereError(f"the KubeRay CRDs are not installed on {self.host}: {msg}") from None
            raise LumiereError(f"creating {body['kind']} {name} failed ({e.status}): {msg}") from None

    def get(self, namespace: str, plural: str, name: str) -> dict:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.call("get", self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, plural,
                             name)
        except ApiException as e:
            if e.status == 404:
                kind = {v: k for k, v in RAY_KINDS.items()}[plural]
                raise LumiereError(f"no {kind} named {name} in namespace {namespace}") from None
            raise LumiereError(f"reading {plural}/{name} failed ({e.status}): {_status_message(e)}") from None

    def list(self, namespace: str, plural: str) -> list[dict]:
        from kubernetes.client.exceptions import ApiException

        try:
            out = self.call("list", self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, plural,
                            label_selector=PART_OF)
        except ApiException as e:
            raise LumiereError(f"listing {plural} failed ({e.status}): {_status_message(e)}") from None
        return out.get("items", [])

    def delete(self, namespace: str, plural: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.call("delete", self.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, plural,
                      name, propagation_policy="Background")
        except ApiException as e:
            if e.status == 404:
                raise LumiereError(f"no {plural[:-1]} named {name} in namespace {namespace}") from None
            raise LumiereError(f"deleting {plural}/{name} failed ({e.status}): {_status_message(e)}") from None

    def submitter_pods(self, namespace: str, job: str) -> list:
        from kubernetes.client.exceptions import ApiException

        try:
            pods = self.call("list pods", self.core.list_namespaced_pod, namespace, label_selector=f"job-name={job}")
        except ApiException as e:
            raise LumiereError(f"listing pods failed ({e.status}): {_status_message(e)}") from None
        return sorted(pods.items, key=lambda p: p.metadata.creation_timestamp or 0)

    def stream_log(self, namespace: str, pod: str, follow: bool) -> Iterable[str]:
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self.call("logs", self.core.read_namespaced_pod_log, pod, namespace, follow=follow,
                             _preload_content=False)
        except ApiException as e:
            raise LumiereError(f"reading the log of pod {pod} failed ({e.status}): {_status_message(e)}") from None
        buf = b""
        for chunk in resp.stream(4096):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")
        if buf:
            yield buf.decode("utf-8", "replace")


def _no_namespace(namespace: str) -> str:
    return (f"namespace {namespace} does not exist: apply the manifests first (`lumiere k8s render --overlay ... | "
            f"kubectl apply -f -`) or pass --namespace")


def submit(cluster: Cluster, body: dict) -> dict:
    ns = body["metadata"]["namespace"]
    cluster.check_kuberay("rayjobs")
    cluster.check_namespace(ns)
    return cluster.create(ns, "rayjobs", body)


def describe(obj: dict) -> list[str]:
    """Human-readable status lines for a RayJob or RayService."""
    md, st = obj.get("metadata", {}), obj.get("status") or {}
    lines = [f"{obj.get('kind', '?')} {md.get('namespace', '?')}/{md.get('name', '?')}"]
    if obj.get("kind") == "RayJob":
        fields = [("deployment status", st.get("jobDeploymentStatus") or "New"),
                  ("ray job status", st.get("jobStatus") or "-"), ("ray job id", st.get("jobId")),
                  ("ray cluster", st.get("rayClusterName")), ("dashboard", st.get("dashboardURL")),
                  ("started", st.get("startTime")), ("ended", st.get("endTime")),
                  ("failed attempts", st.get("failed")), ("succeeded", st.get("succeeded")),
                  ("reason", st.get("reason")), ("message", st.get("message")),
                  ("entrypoint", obj.get("spec", {}).get("entrypoint"))]
    else:
        active = (st.get("activeServiceStatus") or {})
        apps = active.get("applicationStatuses") or {}
        fields = [("service status", st.get("serviceStatus") or "-"),
                  ("ray cluster", active.get("rayClusterName")),
                  ("applications", ", ".join(f"{k}: {v.get('status', '?')}" for k, v in apps.items()) or None),
                  ("conditions", ", ".join(f"{c.get('type')}={c.get('status')}" for c in st.get("conditions", []))
                   or None)]
    lines += [f"  {k}: {v}" for k, v in fields if v not in (None, "")]
    return lines


# ------------------------------------------------------------------------------------ inside the RayJob's cluster


def wait_for_resources(cpus: float = 0, gpus: float = 0, timeout: float = 1800, address: str = "auto",
                       log=print) -> dict:
    """Block until the Ray cluster has `cpus` CPUs and `gpus` GPUs (asking the autoscaler for them)."""
    import ray

    want = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v}
    if not want:
        return {}
    ray.init(address=address, log_to_driver=False)
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{k: 1} for k, v in want.items() for _ in range(int(v))])
    except Exception:  # noqa: BLE001 - no autoscaler (fixed-size cluster): just wait
        pass
    deadline = time.monotonic() + timeout
    have: dict = {}
    while time.monotonic() < deadline:
        have = ray.cluster_resources()
        if all(have.get(k, 0) >= v for k, v in want.items()):
            log("[k8s] cluster ready: " + ", ".join(f"{have.get(k, 0):g} {k}" for k in want))
            return have
        time.sleep(5)
    raise LumiereError("timed out after {:g}s waiting for {} (the cluster has {})".format(
        timeout, ", ".join(f"{v:g} {k}" for k, v in want.items()),
        ", ".join(f"{have.get(k, 0):g} {k}" for k in want)))
