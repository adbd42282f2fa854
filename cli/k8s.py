"""`lumiere k8s …`: the operator's commands (the library is infra/kuberay.py; see docs/operations.md). Imports
stay light: the kubernetes client is imported inside the commands that talk to a cluster."""

from __future__ import annotations

import typer

from lumiere.errors import LumiereError

k8s_app = typer.Typer(no_args_is_help=True,
                      help="Run ingestion, training and the API on Kubernetes with KubeRay (infra/k8s).")

OVERLAY_HELP = "dev (CPU), gpu, or a directory with a kustomization.yaml."
KUBECONFIG_HELP = "Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then the pod's service account)."
JOB_HELP = "ingest, train-t2i, train-stunet or train-ssr (t2i, stunet, ssr also work)."
COMPONENT_HELP = ("Compose this kustomize component onto the overlay (repeatable): kueue or volcano (gang scheduling "
                  "of the training RayJobs, infra/README.md), or a directory with a Component kustomization.")


def _overrides(**kw):
    from infra.kuberay import JobOverrides

    return JobOverrides(**kw)


@k8s_app.command("render")
def render(
    overlay: str = typer.Option("dev", help=OVERLAY_HELP),
    job: str | None = typer.Option(None, help="Print only this RayJob, with the overrides below. " + JOB_HELP),
    image: str | None = typer.Option(None, help="Image for every pod that runs the project."),
    namespace: str | None = typer.Option(None, help="Namespace instead of the overlay's."),
    component: list[str] = typer.Option([], "--component", help=COMPONENT_HELP),
    only: list[str] = typer.Option([], "--only", help="Print only objects of this kind (repeatable), e.g. RayService."),
    exclude: list[str] = typer.Option(["RayJob"], "--exclude",
                                      help="Leave out this kind (repeatable; default RayJob: jobs are submitted with "
                                           "`lumiere k8s submit`). --exclude none keeps everything."),
    manifests: str | None = typer.Option(None, help="The infra/k8s directory (default: this checkout's)."),
):
    """Print the overlay's manifests as YAML (pipe into `kubectl apply -f -`)."""
    from infra.kuberay import apply_job_overrides, job_from_overlay, render_overlay, set_image, set_namespace, to_yaml

    objs = render_overlay(overlay, manifests, component)
    kinds = {o["kind"] for o in objs}
    for k in [*only, *exclude]:
        if k not in kinds and k != "none":
            raise LumiereError(f"no objects of kind {k!r} in the overlay; kinds: {', '.join(sorted(kinds))}")
    if image:
        set_image(objs, image)
    if namespace:
        set_namespace(objs, namespace)
    if job:
        objs = [apply_job_overrides(job_from_overlay(objs, job), _overrides())]
    elif only:
        objs = [o for o in objs if o["kind"] in only]
    else:
        objs = [o for o in objs if o["kind"] not in exclude]
    typer.echo(to_yaml(objs).rstrip())


@k8s_app.command("submit")
def submit(
    job: str = typer.Argument(..., help=JOB_HELP),
    overlay: str = typer.Option("dev", help=OVERLAY_HELP),
    component: list[str] = typer.Option([], "--component", help=COMPONENT_HELP),
    name: str | None = typer.Option(None, help="RayJob name (default: the manifest's name + a UTC timestamp)."),
    namespace: str | None = typer.Option(None, help="Namespace (default: the overlay's)."),
    image: str | None = typer.Option(None, help="Image (default: the overlay's)."),
    input: str | None = typer.Option(None, "--input", help="ingest: directory or s3:// prefix of videos."),
    output: str | None = typer.Option(None, help="ingest: shards URI; train: run directory on the shared volume."),
    data: str | None = typer.Option(None, help="train: the ingestion output (s3:// or a path on the volume)."),
    config: str | None = typer.Option(None, help="train: model config name/path; ingest: ingest config file."),
    init_from: str | None = typer.Option(None, help="train: checkpoint, run directory or models:/ URI."),
    run_name: str | None = typer.Option(None, help="train: MLflow/Ray Train run name (same name resumes)."),
    num_workers: int | None = typer.Option(None, min=1, help="train: Ray Train workers (one GPU each on GPU)."),
    gpus_per_pod: int | None = typer.Option(
        None, "--gpus-per-pod", "--gpus-per-worker", min=1, max=16,
        help="train on GPU: GPUs per worker pod, = Ray Train workers per pod (default: the overlay's, all 8 of a "
             "node; N nodes x G GPUs: --num-workers N*G --gpus-per-pod G). --gpus-per-worker is its old name."),
    arg: list[str] = typer.Option([], "--arg", help="Extra argument for the lumiere command (repeatable)."),
    dry_run: bool = typer.Option(False, help="Print the RayJob instead of creating it."),
    kubeconfig: str | None = typer.Option(None, help=KUBECONFIG_HELP),
    context: str | None = typer.Option(None, help="Kubeconfig context."),
    manifests: str | None = typer.Option(None, help="The infra/k8s directory (default: this checkout's)."),
):
    """Create a RayJob from the overlay's manifest with your overrides."""
    from infra.kuberay import Cluster, build_job, to_yaml
    from infra.kuberay import submit as do_submit

    ov = _overrides(image=image, namespace=namespace, name=name, input=input, output=output, data=data,
                    config=config, init_from=init_from, run_name=run_name, num_workers=num_workers,
                    gpus_per_pod=gpus_per_pod, extra_args=list(arg))
    body = build_job(overlay, job, ov, manifests, with_components=component)
    if dry_run:
        typer.echo(to_yaml([body]).rstrip())
        return
    created = do_submit(Cluster(kubeconfig, context), body)
    md = created.get("metadata", body["metadata"])
    typer.echo(f"created RayJob {md['namespace']}/{md['name']}")
    typer.echo(f"  entrypoint: {body['spec']['entrypoint']}")
    typer.echo(f"  follow it:  lumiere k8s status {md['name']} --namespace {md['namespace']}; "
               f"lumiere k8s logs {md['name']} --namespace {md['namespace']}")


def _namespace(namespace: str | None, overlay: str) -> str:
    if namespace:
        return namespace
    return {"dev": "lumiere-dev", "gpu": "lumiere"}.get(overlay) or _fail("pass --namespace")


def _fail(msg: str):
    raise LumiereError(msg)


@k8s_app.command("status")
def status(
    name: str | None = typer.Argument(None, help="RayJob (or with --service, RayService) name; none: list all."),
    service: bool = typer.Option(False, help="NAME is a RayService."),
    namespace: str | None = typer.Option(None, help="Default: the overlay's namespace."),
    overlay: str = typer.Option("dev", help="Only used for the default namespace."),
    kubeconfig: str | None = typer.Option(None, help=KUBECONFIG_HELP),
    context: str | None = typer.Option(None, help="Kubeconfig context."),
):
    """Show a RayJob (its deployment and Ray job status) or a RayService; without a name, list the project's."""
    from infra.kuberay import Cluster, describe

    ns = _namespace(namespace, overlay)
    cl = Cluster(kubeconfig, context)
    plural = "rayservices" if service else "rayjobs"
    cl.check_kuberay(plural)
    if name:
        for line in describe(cl.get(ns, plural, name)):
            typer.echo(line)
        return
    items = cl.list(ns, plural)
    if not items:
        typer.echo(f"no {plural} of the project in namespace {ns}")
    for obj in items:
        st = obj.get("status") or {}
        state = (st.get("serviceStatus") if service else
                 f"{st.get('jobDeploymentStatus') or 'New'}/{st.get('jobStatus') or '-'}")
        typer.echo(f"{obj['metadata']['name']}  {state}")


@k8s_app.command("logs")
def logs(
    name: str = typer.Argument(..., help="RayJob name."),
    follow: bool = typer.Option(True, help="Keep streaming until the submitter exits."),
    namespace: str | None = typer.Option(None, help="Default: the overlay's namespace."),
    overlay: str = typer.Option("dev", help="Only used for the default namespace."),
    kubeconfig: str | None = typer.Option(None, help=KUBECONFIG_HELP),
    context: str | None = typer.Option(None, help="Kubeconfig context."),
):
    """Stream the RayJob's submitter pod log: the entrypoint's output (`ray job logs --follow`)."""
    from infra.kuberay import Cluster

    ns = _namespace(namespace, overlay)
    cl = Cluster(kubeconfig, context)
    cl.check_kuberay("rayjobs")
    job = cl.get(ns, "rayjobs", name)
    pods = cl.submitter_pods(ns, name)
    if not pods:
        st = (job.get("status") or {}).get("jobDeploymentStatus") or "New"
        raise LumiereError(f"RayJob {name} has no submitter pod yet (deployment status {st}); try again shortly")
    for line in cl.stream_log(ns, pods[-1].metadata.name, follow):
        typer.echo(line)


@k8s_app.command("delete")
def delete(
    name: str = typer.Argument(..., help="RayJob (or with --service, RayService) name."),
    service: bool = typer.Option(False, help="NAME is a RayService."),
    namespace: str | None = typer.Option(None, help="Default: the overlay's namespace."),
    overlay: str = typer.Option("dev", help="Only used for the default namespace."),
    kubeconfig: str | None = typer.Option(None, help=KUBECONFIG_HELP),
    context: str | None = typer.Option(None, help="Kubeconfig context."),
):
    """Delete a RayJob (its Ray cluster and submitter go with it) or a RayService."""
    from infra.kuberay import Cluster

    ns = _namespace(namespace, overlay)
    cl = Cluster(kubeconfig, context)
    plural = "rayservices" if service else "rayjobs"
    cl.check_kuberay(plural)
    cl.delete(ns, plural, name)
    typer.echo(f"deleted {plural[:-1]} {ns}/{name}")


@k8s_app.command("wait-resources")
def wait_resources(
    cpus: float = typer.Option(0, min=0, help="CPUs the cluster must have."),
    gpus: float = typer.Option(0, min=0, help="GPUs the cluster must have."),
    timeout: float = typer.Option(1800, min=1, help="Seconds before giving up."),
    address: str = typer.Option("auto", help="Ray address (inside a RayJob: auto)."),
):
    """Inside a RayJob: wait until the job's Ray cluster has its workers (used before `lumiere train`)."""
    from infra.kuberay import wait_for_resources

    wait_for_resources(cpus, gpus, timeout, address)
