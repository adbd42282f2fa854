"""Where the served models come from: a checkpoint directory, an MLflow model URI (`models:/name/version`,
`runs:/…`), or — for tests and demos only — a randomly initialised named config. Every replica resolves the same
`ModelSpec`, so the text encoder, generator and upsampler deployments agree on the weights. URIs and directories
are resolved by `lumiere.model_uri`, as training's --init-from is: serving imports no training code."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lumiere.errors import LumiereError
from lumiere.model_uri import checkpoint_dir, resolve_model


@dataclass(frozen=True)
class ModelSpec:
    checkpoint: str | None = None  # a checkpoint dir (or a training output dir)
    model_uri: str | None = None  # models:/… or runs:/…
    random_init: str | None = None  # a config name/path: random weights (output is noise)
    overrides: tuple[str, ...] = field(default_factory=tuple)  # --set for random_init
    device: str = "cpu"

    @classmethod
    def from_args(cls, args: dict, prefix: str = "") -> ModelSpec | None:
        get = lambda k: args.get(prefix + k)  # noqa: E731
        given = [k for k in ("checkpoint", "model_uri", "random_init") if get(k)]
        if not given:
            return None
        if len(given) > 1:
            raise LumiereError(f"give one of {prefix}checkpoint, {prefix}model_uri, {prefix}random_init; got "
                               + ", ".join(prefix + g for g in given))
        return cls(checkpoint=get("checkpoint"), model_uri=get("model_uri"), random_init=get("random_init"),
                   overrides=tuple(get("set") or ()), device=args.get("device") or "cpu")

    def describe(self) -> str:
        if self.random_init:
            return f"RANDOMLY INITIALISED '{self.random_init}' config (output is noise; for tests and demos)"
        return self.checkpoint or self.model_uri or "?"

    def path(self) -> str:
        """A local checkpoint directory for checkpoint/model_uri specs (MLflow artifacts are downloaded)."""
        if self.model_uri:
            return resolve_model(self.model_uri, Path(tempfile.mkdtemp(prefix="lumiere-model-")), "--model-uri")
        return checkpoint_dir(Path(self.checkpoint).expanduser(),
                              f"checkpoint {self.checkpoint}: not a checkpoint directory (no meta.json) nor a "
                              "training output directory")

    def config(self):
        if self.random_init:
            from lumiere.config import load_config

            return load_config(self.random_init, list(self.overrides))
        from lumiere.checkpoint import read_meta

        return read_meta(self.path())[0]


def load_generator(spec: ModelSpec):
    from lumiere.pipeline import TextToVideo

    if spec.random_init:
        return TextToVideo.random_init(spec.config(), device=spec.device, seed=0)
    return TextToVideo.from_checkpoint(spec.path(), device=spec.device)


def load_upsampler(spec: ModelSpec):
    from lumiere.pipeline import Upsampler

    if spec.random_init:
        return Upsampler.random_init(spec.config(), device=spec.device, seed=0)
    return Upsampler.from_checkpoint(spec.path(), device=spec.device)


def load_text_encoder(spec: ModelSpec):
    """The base model's text encoder alone (it is built from the config, deterministically)."""
    from lumiere.text_encoder import TextEncoder

    return TextEncoder(spec.config().text).to(spec.device).eval()
