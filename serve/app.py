"""The Serve application: `build_app(args)` composes Ingress -> TextEncoder, Generator, Upsampler (optional).

It is the `import_path` of `serve/config.yaml` (`serve.app:build_app`), which `lumiere serve`, `serve deploy`
and the KubeRay RayService use. `args` (the YAML's `args:`; the CLI fills them from its flags):

    checkpoint | model_uri | random_init (+ set: [overrides])   the base model (exactly one)
    ssr_checkpoint | ssr_model_uri | ssr_random_init           the SSR upsampler (optional)
    device: cpu | cuda                                           cuda adds num_gpus: 1 to the model deployments
    data_dir: lumiere-serve          db_url / artifacts default to <data_dir>/jobs.db and <data_dir>/artifacts
    db_url: sqlite:///… | postgresql://…   (env LUMIERE_DB_URL)
    artifacts: a directory | s3://bucket/prefix   (env LUMIERE_ARTIFACTS)
    api_keys: [..] (default: env LUMIERE_API_KEYS, comma-separated, or the file in LUMIERE_API_KEYS_FILE)
    no_auth: false                   true serves without keys (say so explicitly)
    model_name, max_pending_jobs, max_upload_bytes, max_prompt_chars, max_steps, default_steps, styles_dir, …
    deployments: {Name: {deployment options}}   only for `lumiere serve` (Serve applies the YAML's itself)
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

from ray import serve
from ray.serve import Application

from lumiere.errors import LumiereError

from .api import Ingress, Settings, app
from .deployments import GeneratorDeployment, TextEncoderDeployment, UpsamplerDeployment
from .jobs import sqlite_url
from .models import ModelSpec

APP_NAME = "lumiere"
CONFIG_YAML = Path(__file__).with_name("config.yaml")


def read_api_keys() -> tuple[str, ...]:
    keys = [k.strip() for k in os.environ.get("LUMIERE_API_KEYS", "").split(",")]
    path = os.environ.get("LUMIERE_API_KEYS_FILE")
    if path:
        try:
            keys += [line.strip() for line in Path(path).read_text().splitlines()]
        except OSError as e:
            raise LumiereError(f"cannot read LUMIERE_API_KEYS_FILE {path}: {e.strerror}") from None
    return tuple(k for k in keys if k and not k.startswith("#"))


def settings_from_args(args: dict, spec: ModelSpec) -> dict:
    names = {f.name for f in fields(Settings)}
    s = {k: v for k, v in args.items() if k in names}
    data_dir = Path(args.get("data_dir") or "lumiere-serve").expanduser().resolve()
    s["db_url"] = s.get("db_url") or os.environ.get("LUMIERE_DB_URL") or sqlite_url(data_dir / "jobs.db")
    artifacts = s.get("artifacts") or os.environ.get("LUMIERE_ARTIFACTS") or str(data_dir / "artifacts")
    s["artifacts"] = artifacts if artifacts.startswith("s3://") else str(Path(artifacts).expanduser().resolve())
    s["api_keys"] = tuple(s.get("api_keys") or read_api_keys())
    s["no_auth"] = bool(s.get("no_auth", False))
    if not s["no_auth"] and not s["api_keys"]:
        raise LumiereError("no API keys: set LUMIERE_API_KEYS (comma-separated) or LUMIERE_API_KEYS_FILE, or "
                           "serve without authentication with --no-auth (args.no_auth: true)")
    if not s.get("model_name"):
        s["model_name"] = "lumiere-" + (Path(spec.random_init).stem if spec.random_init else "stunet")
    if s.get("styles_dir"):
        s["styles_dir"] = str(Path(s["styles_dir"]).expanduser().resolve())
    return s


def build_app(args: dict | None = None) -> Application:
    args = dict(args or {})
    spec = ModelSpec.from_args(args)
    if spec is None:
        raise LumiereError("no model: give checkpoint, model_uri or random_init (lumiere serve --checkpoint PATH | "
                           "--model-uri models:/NAME/VERSION | --random-init tiny)")
    ssr = ModelSpec.from_args(args, prefix="ssr_")
    settings = settings_from_args(args, spec)
    overrides = args.get("deployments") or {}
    gpu = str(args.get("device", "cpu")).startswith("cuda")

    def configured(dep, name: str, model_deployment: bool = True):
        opts = {k: v for k, v in (overrides.get(name) or {}).items() if k != "name"}
        if gpu and model_deployment:
            actor = dict(dep.ray_actor_options or {})
            actor.setdefault("num_gpus", 1)
            opts["ray_actor_options"] = {**actor, **opts.get("ray_actor_options", {})}
        return dep.options(**opts) if opts else dep

    model = vars(spec)
    encoder = configured(TextEncoderDeployment, "TextEncoder", model_deployment=False).bind(model)
    generator = configured(GeneratorDeployment, "Generator").bind(model)
    upsampler = configured(UpsamplerDeployment, "Upsampler").bind(vars(ssr)) if ssr else None
    ingress_cls = serve.deployment(
        name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64, max_queued_requests=256,
        autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
    )(serve.ingress(app)(Ingress))
    return configured(ingress_cls, "Ingress", model_deployment=False).bind(encoder, generator, upsampler, settings)
