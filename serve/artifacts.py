"""Job content (mp4, thumbnail, spritesheet, uploaded inputs) in an artifact store: a local directory or an
`s3://` prefix, through `lumiere.storage` (atomic writes). Layout: `<root>/<job id>/<name>`."""

from __future__ import annotations

from lumiere import storage


class ArtifactStore:
    def __init__(self, root: str, options: storage.StorageOptions | None = None):
        self.root = str(root).rstrip("/")
        self.options = options or storage.StorageOptions.from_env()

    def uri(self, job_id: str, name: str) -> str:
        return storage.join(self.root, job_id, name)

    def put(self, job_id: str, name: str, data: bytes) -> str:
        uri = self.uri(job_id, name)
        storage.write_bytes(uri, data, self.options)
        return uri

    def get(self, job_id: str, name: str) -> bytes | None:
        uri = self.uri(job_id, name)
        try:
            return storage.read_bytes(uri, self.options)
        except (FileNotFoundError, OSError):
            return None

    def delete_job(self, job_id: str) -> None:
        import pyarrow.fs as pafs

        fs, path = storage.resolve(storage.join(self.root, job_id), self.options)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)  # on S3: every key under the prefix (no directory marker left behind)
