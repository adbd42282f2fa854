"""Where a model comes from, in one place below both training (`--init-from`) and serving (`--checkpoint`,
`--model-uri`): an MLflow model URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN/PATH`, whose
artifacts are downloaded), a checkpoint directory (one with `meta.json`), or a training run's output directory
(its `checkpoints/latest`). Every form resolves to a local checkpoint directory.

MLflow is imported only when a URI needs it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import LumiereError

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
    return checkpoint_dir(source, f"{option} {source}: not a checkpoint, a training output directory or a "
                                  "models:/ URI")
