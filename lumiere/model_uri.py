"""Where a model comes from, in one place below both training (`--init-from`) and serving (`--checkpoint`,
`--model-uri`): an MLflow model URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN/PATH`, whose
artifacts are downloaded), a checkpoint directory (one with `meta.json`), or a training run's output directory
(its `checkpoints/latest`), local or on S3. Every form resolves to a local checkpoint directory (`resolve_model`);
training resolves an s3:// source to an s3:// checkpoint directory instead (`s3_checkpoint`), which each worker
downloads for itself (`fetch`).

On S3 a run's final checkpoint is published as an immutable directory, `OUTPUT/checkpoints/<version>/`, and
`OUTPUT/checkpoints/latest` is a small JSON object naming it (`publish`). S3 has no directory rename, so a
`latest/` directory overwritten in place could be read half old, half new; a single PUT is atomic, so a reader
that follows the pointer always gets one whole checkpoint, and a reader that followed the previous pointer keeps
reading the previous version, which is never modified (old versions are left in place, one per finished run).

MLflow is imported only when a URI needs it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import storage
from .errors import LumiereError
from .storage import StorageOptions

MLFLOW_SCHEMES = ("models:/", "runs:/")


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(MLFLOW_SCHEMES)


def checkpoint_dir(path: str | Path, error: str) -> str:
    """A checkpoint directory, or a training output directory's latest checkpoint, as an absolute path; else a
    LumiereError with the caller's message (it names the option the user gave)."""
    path = Path(path)
    if (path / "checkpoints" / "latest" / "meta.json").exists():
        path = path / "checkpoints" / "latest"
    if not (path / "meta.json").exists():
        raise LumiereError(error)
    return str(path.resolve())


LATEST = "latest"  # under OUTPUT/checkpoints/: a directory locally, a pointer object on S3


def s3_checkpoint(source: str, options: StorageOptions | None = None, option: str = "--init-from") -> str:
    """An s3:// checkpoint directory, a `checkpoints/latest` pointer, or a run's s3:// output prefix -> the s3://
    URI of the checkpoint directory (for a pointer, the immutable version it names at this moment)."""
    uri = source.rstrip("/")
    for candidate in (uri, storage.join(uri, "checkpoints", LATEST)):
        try:
            fs, path = storage.resolve(candidate, options)
            if fs.get_file_info(f"{path}/meta.json").is_file:
                return candidate
            if fs.get_file_info(path).is_file:  # a pointer: {"checkpoint": "<version>", ...} beside the versions
                target = json.loads(storage.read_bytes(candidate, options))["checkpoint"]
                return storage.join(candidate.rsplit("/", 1)[0], target)
        except (OSError, ValueError, KeyError) as e:
            why = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            raise LumiereError(f"{option} {source}: cannot read it ({why})") from None
    raise LumiereError(f"{option} {source}: no checkpoint there (expected meta.json, a checkpoints/latest pointer "
                       "or a checkpoint directory)")


def fetch(uri: str, local_dir: str | Path, options: StorageOptions | None = None) -> str:
    """Download the s3:// checkpoint directory `uri` into `local_dir`; returns the local path."""
    storage.download_dir(uri, local_dir, options)
    return checkpoint_dir(local_dir, f"{uri} is not a checkpoint (no meta.json in it)")


def publish(local_dir: str | Path, output: str, version: str, options: StorageOptions | None = None,
            **info) -> str:
    """Upload a local checkpoint directory to `output`/checkpoints/`version`/ and then point
    `output`/checkpoints/latest at it (see the module docstring for why a pointer); returns the version's URI."""
    checkpoints = storage.join(output, "checkpoints")
    uri = storage.join(checkpoints, version)
    storage.upload_dir(local_dir, uri, options, replace=True)
    pointer = {"checkpoint": version, **info, "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_bytes(storage.join(checkpoints, LATEST), json.dumps(pointer, indent=2).encode(), options)
    return uri


def download(uri: str, workdir: Path) -> str:
    """An MLflow model or run URI -> its artifacts downloaded under `workdir/init`."""
    import mlflow

    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(Path(workdir) / "init"))
    except Exception as e:  # MLflow raises several types for unknown models/versions
        raise LumiereError(f"cannot fetch {uri} from MLflow ({mlflow.get_tracking_uri()}): "
                           f"{str(e).splitlines()[0]}") from None


def resolve_model(source: str | None, workdir: Path, option: str = "--init-from") -> str | None:
    """A checkpoint directory, a run's output directory (its latest checkpoint) or an MLflow model URI -> a local
    checkpoint directory (None stays None). `workdir` receives downloaded artifacts."""
    if source is None:
        return None
    if is_mlflow_uri(source):
        return download(source, workdir)
    if storage.is_s3(source):
        return fetch(s3_checkpoint(source, option=option), Path(workdir) / "init")
    return checkpoint_dir(source, f"{option} {source}: not a checkpoint, a training output directory or a "
                                  "models:/ URI")
