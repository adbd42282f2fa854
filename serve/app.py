"""The Serve application: `build_app(args)` composes Ingress -> TextEncoder, Generator, Upsampler (optional).

It is the `import_path` of `serve/config.yaml` (`serve.app:build_app`), which `lumiere serve`, `serve deploy`
and the KubeRay RayService use. `args` (the YAML's `args:`; the CLI fills them from its flags):

    checkpoint | model_uri | random_init (+ set: [overrides])   the base model (exactly one)
                                     (env LUMIERE_CHECKPOINT or LUMIERE_MODEL_URI)
    ssr_checkpoint | ssr_model_uri | ssr_random_init           the SSR upsampler (optional)
                                     (env LUMIERE_SSR_CHECKPOINT or LUMIERE_SSR_MODEL_URI)
    device: cpu | cuda               (env LUMIERE_DEVICE; default cpu) cuda: num_gpus on the model deployments
    num_gpus: 1                      (env LUMIERE_NUM_GPUS) GPUs per Generator/Upsampler replica with cuda
    encoder_num_gpus: 0.25           (env LUMIERE_ENCODER_NUM_GPUS) GPUs per TextEncoder replica with cuda (it
                                     shares a GPU: a fraction)
    max_model_replicas: 2            (env LUMIERE_MAX_MODEL_REPLICAS) autoscaling ceiling of the Generator and
                                     Upsampler: the GPU pool's size (the gpu overlay sets 8, its 8 GPU pods)
    max_ingress_replicas: 2          (env LUMIERE_MAX_INGRESS_REPLICAS) the Ingress and TextEncoder ceiling
    data_dir: lumiere-serve          db_url / artifacts default to <data_dir>/jobs.db and <data_dir>/artifacts
    db_url: sqlite:///… | postgresql://…   (env LUMIERE_DB_URL)
    artifacts: a directory | s3://bucket/prefix   (env LUMIERE_ARTIFACTS)
    api_keys: ["KEY" | "KEY TENANT", ..] (default: env LUMIERE_API_KEYS, comma-separated, or the file in
                                     LUMIERE_API_KEYS_FILE, one per line): a key without a tenant is its own tenant
    no_auth: false                   true serves without keys (say so explicitly)
    webhook_secrets: ["TENANT SECRET", ..] (default: env LUMIERE_WEBHOOK_SECRETS or the file in
                                     LUMIERE_WEBHOOK_SECRETS_FILE): tenants that may ask for signed webhooks
    model_name (env LUMIERE_MODEL_NAME), styles_dir (env LUMIERE_STYLES_DIR)
    max_pending_jobs, max_upload_bytes, max_prompt_chars, max_steps, default_steps, …
    deployments: {Name: {deployment options}}   only for `lumiere serve` (Serve applies the YAML's itself)

The YAML is the same file everywhere (`lumiere serve`, `serve deploy`, the RayService's serveConfigV2), so it
names no model, device or store: what differs between deployments comes from the environment (`args_with_env`),
and an arg that is set (in the YAML or by a `lumiere serve` flag) wins over its variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

from ray import serve
from ray.serve import Application

from lumiere.errors import LumiereError

from .api import Ingress, Settings, app
from .deployments import GeneratorDeployment, TextEncoderDeployment, UpsamplerDeployment
from .jobs import sqlite_url
from .models import ModelSpec
from .tenants import parse_keys
from .webhooks import parse_secrets as parse_webhook_secrets

APP_NAME = "lumiere"
CONFIG_YAML = Path(__file__).with_name("config.yaml")


# arg -> the environment variable that fills it when the args leave it unset
MODEL_ENV = {"checkpoint": "LUMIERE_CHECKPOINT", "model_uri": "LUMIERE_MODEL_URI"}
SSR_ENV = {"ssr_checkpoint": "LUMIERE_SSR_CHECKPOINT", "ssr_model_uri": "LUMIERE_SSR_MODEL_URI"}
SETTING_ENV = {"device": "LUMIERE_DEVICE", "num_gpus": "LUMIERE_NUM_GPUS", "model_name": "LUMIERE_MODEL_NAME",
               "styles_dir": "LUMIERE_STYLES_DIR", "encoder_num_gpus": "LUMIERE_ENCODER_NUM_GPUS",
               "max_model_replicas": "LUMIERE_MAX_MODEL_REPLICAS",
               "max_ingress_replicas": "LUMIERE_MAX_INGRESS_REPLICAS"}
# (db_url, artifacts and api_keys read LUMIERE_DB_URL, LUMIERE_ARTIFACTS, LUMIERE_API_KEYS[_FILE] in settings_from_args)


def args_with_env(args: dict, environ: Mapping[str, str] | None = None) -> dict:
    """`args` with what they leave unset filled from the environment: the model (LUMIERE_CHECKPOINT or
    LUMIERE_MODEL_URI, only when no checkpoint/model_uri/random_init is given), the SSR model likewise
    (LUMIERE_SSR_*), LUMIERE_DEVICE, LUMIERE_NUM_GPUS, LUMIERE_MODEL_NAME, LUMIERE_STYLES_DIR."""
    env = os.environ if environ is None else environ
    out = dict(args)

    def model_from_env(names: dict[str, str], prefix: str) -> None:
        if any(out.get(prefix + k) for k in ("checkpoint", "model_uri", "random_init")):
            return
        given = {arg: env[var].strip() for arg, var in names.items() if env.get(var, "").strip()}
        if len(given) > 1:
            raise LumiereError(f"set one of {' or '.join(names.values())}, not both")
        out.update(given)

    model_from_env(MODEL_ENV, "")
    model_from_env(SSR_ENV, "ssr_")
    for arg, var in SETTING_ENV.items():
        if out.get(arg) in (None, "") and env.get(var, "").strip():
            out[arg] = env[var].strip()
    for arg in ("max_model_replicas", "max_ingress_replicas"):
        raw = out.get(arg)
        if raw in (None, ""):
            out[arg] = 2
            continue
        try:
            out[arg] = int(raw)
            if not 1 <= out[arg] <= 1024:
                raise ValueError
        except (TypeError, ValueError):
            raise LumiereError(f"{arg} {raw!r} (args.{arg} or {SETTING_ENV[arg]}): expected a whole number of "
                               "replicas, 1 to 1024") from None
    device = str(out.get("device") or "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise LumiereError(f"device {device!r} (args.device, --device or LUMIERE_DEVICE): expected cpu or cuda")
    out["device"] = device
    if device.startswith("cuda"):
        out["num_gpus"] = _gpus(out, "num_gpus", 1.0, "model replica, e.g. 1 or 0.5")
        out["encoder_num_gpus"] = _gpus(out, "encoder_num_gpus", 0.25, "TextEncoder replica, e.g. 0.25")
    return out


def _gpus(args: dict, arg: str, default: float, per: str) -> float | int:
    """A GPU count per replica from args/env: positive, at most 64; a whole number comes back as an int."""
    raw = args.get(arg)
    try:
        n = default if raw in (None, "") else float(raw)
    except (TypeError, ValueError):
        n = -1.0
    if not 0 < n <= 64:
        raise LumiereError(f"{arg} {raw!r} (args.{arg} or {SETTING_ENV[arg]}): expected a positive number of GPUs "
                           f"per {per}")
    return int(n) if n.is_integer() else n


def _entries(var: str) -> tuple[str, ...]:
    """Entries from `var` (comma-separated) and the file in `var`_FILE (one per line, # comments)."""
    keys = [k.strip() for k in os.environ.get(var, "").split(",")]
    path = os.environ.get(f"{var}_FILE")
    if path:
        try:
            keys += [line.strip() for line in Path(path).read_text().splitlines()]
        except OSError as e:
            raise LumiereError(f"cannot read {var}_FILE {path}: {e.strerror}") from None
    return tuple(k for k in keys if k and not k.startswith("#"))


def read_api_keys() -> tuple[str, ...]:
    return _entries("LUMIERE_API_KEYS")


def settings_from_args(args: dict, spec: ModelSpec) -> dict:
    names = {f.name for f in fields(Settings)}
    s = {k: v for k, v in args.items() if k in names}
    data_dir = Path(args.get("data_dir") or "lumiere-serve").expanduser().resolve()
    s["db_url"] = s.get("db_url") or os.environ.get("LUMIERE_DB_URL") or sqlite_url(data_dir / "jobs.db")
    artifacts = s.get("artifacts") or os.environ.get("LUMIERE_ARTIFACTS") or str(data_dir / "artifacts")
    s["artifacts"] = artifacts if artifacts.startswith("s3://") else str(Path(artifacts).expanduser().resolve())
    s["api_keys"] = tuple(s.get("api_keys") or read_api_keys())
    parse_keys(s["api_keys"], "api_keys (LUMIERE_API_KEYS / LUMIERE_API_KEYS_FILE)")  # malformed: one line, now
    s["webhook_secrets"] = tuple(s.get("webhook_secrets") or _entries("LUMIERE_WEBHOOK_SECRETS"))
    parse_webhook_secrets(s["webhook_secrets"], "webhook_secrets (LUMIERE_WEBHOOK_SECRETS / _FILE)")
    s["webhook_allowed_hosts"] = tuple(s.get("webhook_allowed_hosts") or ())
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
    args = args_with_env(dict(args or {}))
    spec = ModelSpec.from_args(args)
    if spec is None:
        raise LumiereError("no model: give checkpoint, model_uri or random_init (lumiere serve --checkpoint PATH | "
                           "--model-uri models:/NAME/VERSION | --random-init tiny), or set LUMIERE_MODEL_URI or "
                           "LUMIERE_CHECKPOINT")
    ssr = ModelSpec.from_args(args, prefix="ssr_")
    settings = settings_from_args(args, spec)
    overrides = args.get("deployments") or {}
    gpu = args["device"].startswith("cuda")

    def configured(dep, name: str, num_gpus: float | None, max_replicas: int):
        """The deployment with the app's options: GPUs reserved for every deployment that puts a model on CUDA,
        the autoscaling ceiling from the args; then what `deployments:` (lumiere serve) says over them."""
        base = dep._deployment_config.autoscaling_config  # the decorator's
        opts: dict = {"autoscaling_config": {"min_replicas": min(base.min_replicas, max_replicas),
                                             "target_ongoing_requests": base.target_ongoing_requests,
                                             "max_replicas": max_replicas}}
        extra = {k: v for k, v in (overrides.get(name) or {}).items() if k != "name"}
        if gpu and num_gpus:
            actor = dict(dep.ray_actor_options or {})
            actor.setdefault("num_gpus", num_gpus)
            opts["ray_actor_options"] = {**actor, **extra.get("ray_actor_options", {})}
        if "autoscaling_config" in extra:
            opts["autoscaling_config"] = {**opts["autoscaling_config"], **extra["autoscaling_config"]}
        return dep.options(**{**extra, **opts})

    model = vars(spec)
    models_max, front_max = args["max_model_replicas"], args["max_ingress_replicas"]
    encoder = configured(TextEncoderDeployment, "TextEncoder", args.get("encoder_num_gpus"), front_max).bind(model)
    generator = configured(GeneratorDeployment, "Generator", args.get("num_gpus"), models_max).bind(model)
    upsampler = (configured(UpsamplerDeployment, "Upsampler", args.get("num_gpus"), models_max).bind(vars(ssr))
                 if ssr else None)
    # max_queued_requests=-1: the proxy never answers its own plain-text 503 for the Ingress; admission control is
    # the app's (429 with the OpenAI error object and Retry-After), and an Ingress request is short (it queues a
    # job, it does not run it)
    ingress_cls = serve.deployment(
        name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64, max_queued_requests=-1,
        health_check_period_s=5, autoscaling_config={"min_replicas": 1, "max_replicas": 2,
                                                    "target_ongoing_requests": 32},
    )(serve.ingress(app)(Ingress))
    return configured(ingress_cls, "Ingress", None, front_max).bind(encoder, generator, upsampler, settings)
