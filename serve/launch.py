"""`lumiere serve`: read the Serve config YAML, apply the command-line flags to its app args, start Serve."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import yaml

from lumiere.errors import LumiereError

from .app import CONFIG_YAML

LOCAL_HOST = "127.0.0.1"  # `lumiere serve`'s bind address unless --host says otherwise (never the YAML's)


def read_serve_config(path: str | Path | None) -> dict[str, Any]:
    path = Path(path) if path else CONFIG_YAML
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise LumiereError(f"cannot read the Serve config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise LumiereError(f"the Serve config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    apps = data.get("applications") if isinstance(data, dict) else None
    if not apps or not isinstance(apps, list) or not isinstance(apps[0], dict):
        raise LumiereError(f"the Serve config {path} has no applications: list")
    return data


def plan(config: str | Path | None, flags: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(http_options, the application entry, its args with the flags applied) — checked before Ray starts."""
    from .app import args_with_env, settings_from_args
    from .models import ModelSpec

    data = read_serve_config(config)
    entry = data["applications"][0]
    args = dict(entry.get("args") or {})
    model_flags = ("checkpoint", "model_uri", "random_init")
    if any(flags.get(k) for k in model_flags):
        for k in model_flags:
            args.pop(k, None)
    if flags.get("ssr_checkpoint"):
        for k in ("ssr_model_uri", "ssr_random_init"):
            args.pop(k, None)
    args.update({k: v for k, v in flags.items() if v not in (None, False, [], ())})
    args["deployments"] = {d["name"]: d for d in entry.get("deployments") or [] if isinstance(d, dict)}
    args = args_with_env(args)  # what the flags and the YAML leave unset: LUMIERE_MODEL_URI, LUMIERE_DEVICE, …
    spec = ModelSpec.from_args(args)
    if spec is None:
        raise LumiereError("no model: give --checkpoint PATH, --model-uri models:/NAME/VERSION or --random-init tiny "
                           "(or set LUMIERE_MODEL_URI or LUMIERE_CHECKPOINT)")
    spec.config()  # a missing or broken checkpoint fails here, before Ray starts
    ssr = ModelSpec.from_args(args, prefix="ssr_")
    if ssr is not None:
        ssr.config()
    settings_from_args(args, spec)  # API keys
    http = dict(data.get("http_options") or {})
    return http, entry, args


def run_server(config: str | Path | None, flags: dict[str, Any], host: str | None, port: int | None,
               echo=print) -> None:
    from .models import ModelSpec

    http, entry, args = plan(config, flags)
    # the YAML's http_options.host (0.0.0.0) is for `serve deploy` and the RayService, where the proxy must listen
    # on the pod's interfaces; `lumiere serve` binds to --host, 127.0.0.1 unless told otherwise
    http["host"] = host or LOCAL_HOST
    http["port"] = int(port or http.get("port", 8000))
    spec = ModelSpec.from_args(args)
    # the job store every Ingress replica opens (and migrates): checked here first, so an unreachable or unusable
    # database is one line now instead of replicas that crash-loop behind "Deploying application failed"
    from .app import args_with_env, settings_from_args
    from .jobs import JobStore

    JobStore(settings_from_args(args_with_env(dict(args)), spec)["db_url"]).engine.dispose()
    if spec.random_init:
        echo("=" * 78)
        echo(f"WARNING: serving a {spec.describe()}")
        echo("=" * 78)
    if args.get("no_auth"):
        echo("WARNING: --no-auth: the API accepts requests WITHOUT an API key; anyone who can reach "
             f"{http['host']}:{http['port']} can use it")

    import ray
    from ray import serve

    from .app import build_app

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)  # also when started in the background (SIGINT ignored there)
    signal.signal(signal.SIGTERM, stop)  # kubectl delete / docker stop: shut Serve down cleanly
    try:
        if not ray.is_initialized():
            ray.init(log_to_driver=False)
        serve.start(http_options={"host": http["host"], "port": http["port"]})
        name, prefix = entry.get("name", "lumiere"), entry.get("route_prefix", "/")
        serve.run(build_app(args), name=name, route_prefix=prefix)
        base = f"http://{http['host']}:{http['port']}"
        echo(f"serving {name} at {base}{prefix}  (web page {base}/, API {base}/v1, docs {base}/docs)")
        echo(f"model: {spec.describe()}; jobs: {args.get('db_url') or args.get('data_dir') or 'lumiere-serve'}; "
             f"auth: {'OFF (--no-auth)' if args.get('no_auth') else 'Bearer API keys'}")
        echo("ready; Ctrl-C stops")
        while True:
            time.sleep(0.5)  # short: a signal may land on another thread, Python checks between sleeps
    except KeyboardInterrupt:
        echo("stopping")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
