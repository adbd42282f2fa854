"""Local paths and `s3://` URIs behind one small API, on pyarrow's filesystems.

S3 settings come from the usual environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION / AWS_REGION, AWS_ENDPOINT_URL for S3-compatible servers such as MinIO or moto). The driver
reads them once into `StorageOptions`, which travels with the job to every Ray worker, so workers do not
depend on their own environment.

Writes are atomic: local files go to a temp name and are renamed into place; an S3 PUT is atomic by itself.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

TMP_PREFIX = ".tmp-"  # partially written files; ignored by listings and removed on resume


@dataclass(frozen=True)
class StorageOptions:
    endpoint_override: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> StorageOptions:
        return cls(
            endpoint_override=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
            access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        )


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def resolve(uri: str | os.PathLike, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3://bucket/key URI."""
    uri = str(uri)
    if is_s3(uri):
        opts = options or StorageOptions.from_env()
        kwargs = {}
        if opts.endpoint_override:
            scheme, _, host = opts.endpoint_override.partition("://")
            kwargs["endpoint_override"] = host or scheme
            kwargs["scheme"] = scheme if host else "https"
        if opts.region:
            kwargs["region"] = opts.region
        if opts.access_key and opts.secret_key:
            kwargs["access_key"], kwargs["secret_key"] = opts.access_key, opts.secret_key
        return pafs.S3FileSystem(**kwargs), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    uri = str(uri).rstrip("/")
    return "/".join([uri, *parts])


def list_files(uri: str, options: StorageOptions | None = None) -> list[tuple[str, int]]:
    """Every file under `uri`, recursively, as (uri, size in bytes), sorted; temp files are skipped."""
    fs, root = resolve(uri, options)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    if info.type == pafs.FileType.File:
        return [(str(uri), info.size)]
    prefix = "s3://" if is_s3(uri) else ""
    out = []
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if f.type == pafs.FileType.File and not f.base_name.startswith(TMP_PREFIX):
            out.append((prefix + f.path, f.size))
    return sorted(out)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = resolve(uri, options)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = resolve(uri, options)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_parquet_columns(uri: str, columns: list[str], options: StorageOptions | None = None):
    """The `columns` of a Parquet file that it has (a file written by an older version may lack newer ones), as a
    pyarrow Table. The file is opened for random access, so only its footer and those columns' chunks are read
    (ranged GETs on S3): a scan over parts full of frames fetches the few small columns it needs, not the parts."""
    import pyarrow.parquet as pq  # lazily: most users of this module never read Parquet

    fs, path = resolve(uri, options)
    with fs.open_input_file(path) as f:
        part = pq.ParquetFile(f)
        have = set(part.schema_arrow.names)
        return part.read(columns=[c for c in columns if c in have])


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write atomically: readers see the old file (or none) until the new one is complete."""
    fs, path = resolve(uri, options)
    parent = path.rsplit("/", 1)[0]
    if is_s3(uri):
        with fs.open_output_stream(path) as f:  # an S3 PUT becomes visible only when complete
            f.write(data)
        return
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    os.replace(tmp, path)


def delete(uri: str, options: StorageOptions | None = None) -> None:
    fs, path = resolve(uri, options)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def local_copy(uri: str, options: StorageOptions | None = None, directory: str | None = None) -> tuple[str, bool]:
    """A local path for `uri` (decoders need one): the path itself, or a downloaded temp copy.

    Returns (path, is_temporary); the caller deletes temporary copies.
    """
    if not is_s3(uri):
        return str(uri), False
    import tempfile

    suffix = os.path.splitext(uri)[1]
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=directory)
    fs, path = resolve(uri, options)
    try:
        # streamed to disk in blocks: memory stays at one block whatever the object's size
        with os.fdopen(fd, "wb") as f, fs.open_input_stream(path) as src:
            while block := src.read(_COPY_BLOCK):
                f.write(block)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp, True


_COPY_BLOCK = 8 * 2**20


def upload_dir(local_dir: str | os.PathLike, uri: str, options: StorageOptions | None = None,
               replace: bool = False) -> None:
    """Copy a local directory's files to `uri` (a directory or an s3:// prefix); `replace`: what was under `uri`
    goes first, so no file of an earlier upload is left beside the new ones."""
    fs, path = resolve(uri, options)
    if replace and fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path, missing_dir_ok=True)
    if not is_s3(uri):
        fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(local_dir).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download_dir(uri: str, local_dir: str | os.PathLike, options: StorageOptions | None = None) -> None:
    """Copy every file under `uri` into `local_dir` (created if missing); a missing `uri` is FileNotFoundError."""
    fs, path = resolve(uri, options)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri} is not a directory")
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(Path(local_dir).resolve()), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
