"""Job metadata in SQL (SQLAlchemy): a SQLite file by default, PostgreSQL in a cluster (`postgresql://…`, driven by
psycopg 3, which the `cluster` extra installs).

One row per video job. The store is durable across app restarts: `fail_interrupted()` (called when the app
starts) turns the jobs a crash left `queued`/`in_progress` into `failed` with a reason, so none stays stuck.

The schema is managed by Alembic migrations (`serve/migrations/versions/`), applied when a store opens: every
replica may open it at once, so on PostgreSQL the upgrade runs under an advisory lock. A store that cannot be
reached or migrated raises `StoreError` with one line naming the URL (password hidden) and the cause.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url

from lumiere.errors import LumiereError

MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 0x6C756D69  # pg_advisory_xact_lock key: one replica migrates at a time ("lumi")


class StoreError(LumiereError):
    """The job store cannot be used: the message is one line, naming the URL and what to do."""

metadata = MetaData()
jobs_table = Table(
    "lumiere_video_jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False, index=True),  # creation order (list pagination): time_ns, 64-bit
    Column("created_at", Integer, nullable=False),
    Column("completed_at", Integer),
    Column("status", String(16), nullable=False, index=True),
    Column("progress", Integer, nullable=False, default=0),
    Column("model", String(128), nullable=False),
    Column("prompt", Text),
    Column("seconds", String(16), nullable=False),
    Column("size", String(32), nullable=False),
    Column("task", String(32), nullable=False),
    Column("remixed_from_video_id", String(64)),
    Column("params", JSON, nullable=False),  # everything else the job needs (seed, steps, input refs, …)
    Column("error", JSON),  # {"code", "message"} when failed
    Column("owner", String(64)),  # the ingress replica running it (see `owners`)
)
# Each ingress replica heartbeats here; an active job whose owner stopped beating was interrupted by a crash or
# a restart and is failed by the next sweep (every replica sweeps on start and then periodically).
owners_table = Table(
    "lumiere_ingress_owners",
    metadata,
    Column("owner", String(64), primary_key=True),
    Column("seen_at", Integer, nullable=False),
)

ACTIVE = ("queued", "in_progress")


@dataclass
class Job:
    id: str
    seq: int
    created_at: int
    status: str
    progress: int
    model: str
    prompt: str | None
    seconds: str
    size: str
    task: str
    params: dict[str, Any] = field(default_factory=dict)
    completed_at: int | None = None
    remixed_from_video_id: str | None = None
    error: dict[str, str] | None = None
    owner: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `video` object (plus a few Lumiere fields the SDK ignores)."""
        return {
            "id": self.id, "object": "video", "created_at": self.created_at, "completed_at": self.completed_at,
            "expires_at": None, "status": self.status, "progress": self.progress, "model": self.model,
            "prompt": self.prompt, "seconds": self.seconds, "size": self.size,
            "remixed_from_video_id": self.remixed_from_video_id, "error": self.error, "task": self.task,
            "seed": self.params.get("seed"), "notes": self.params.get("notes", []),
        }


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def safe_url(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not even parseable: say so without echoing it
        return "<unparseable URL>"


_MIGRATE_IN_PROCESS = threading.Lock()  # alembic's `context` is a module-level proxy: one migration per process


def migrate(engine: Engine) -> str:
    """Bring the schema to the latest migration; returns the revision. Safe to call from many replicas at once."""
    with _MIGRATE_IN_PROCESS, _sqlite_file_lock(engine):
        return _migrate(engine)


@contextlib.contextmanager
def _sqlite_file_lock(engine: Engine):
    """SQLite via pysqlite runs DDL outside a transaction, so a concurrent process could see the tables before the
    version row: replicas of one SQLite file (one machine) take turns with a lock file beside it."""
    db = engine.url.database if engine.dialect.name == "sqlite" else None
    if not db or db == ":memory:":
        yield
        return
    with open(f"{db}.migrate-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _migrate(engine: Engine) -> str:
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # concurrent replicas: the first migrates, the others then see head
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        current = MigrationContext.configure(conn).get_current_revision()
        if current is None and inspect(conn).has_table(jobs_table.name):
            command.stamp(cfg, "0001")  # made by create_all before migrations existed: that schema is 0001
        command.upgrade(cfg, "head")
        return MigrationContext.configure(conn).get_current_revision()


def open_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        parent = Path(url[len("sqlite:///"):]).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot use the job store at {safe_url(url)}: cannot create its directory {parent} "
                             f"({e.strerror}); check --db-url / LUMIERE_DB_URL") from None
        return create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
    try:
        return create_engine(url, pool_pre_ping=True)
    except ModuleNotFoundError as e:  # e.g. postgresql+psycopg2:// without psycopg2
        raise StoreError(f"job store {safe_url(url)}: the database driver is not installed ({e}); use a plain "
                         "postgresql:// URL with `pip install '.[cluster]'` (psycopg 3)") from None
    except Exception as e:  # noqa: BLE001 - a malformed URL or unknown dialect
        raise StoreError(f"job store {safe_url(url)}: {type(e).__name__}: {str(e).splitlines()[0]}; "
                         "use sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB") from None


class JobStore:
    def __init__(self, url: str):
        self.engine: Engine = open_engine(url)
        try:
            self.revision = migrate(self.engine)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - unreachable server, bad credentials, no permission, …
            self.engine.dispose()
            first = str(getattr(e, "orig", None) or e).strip().splitlines()
            raise StoreError(f"cannot use the job store at {safe_url(url)}: {type(e).__name__}: "
                             f"{first[0] if first else ''}; check --db-url / LUMIERE_DB_URL and that the database "
                             "server is up") from None

    @staticmethod
    def _job(row) -> Job:
        d = dict(row._mapping)
        if isinstance(d["params"], str):  # some drivers hand JSON back as text
            d["params"] = json.loads(d["params"])
        return Job(**d)

    def create(self, *, model: str, prompt: str | None, seconds: str, size: str, task: str,
               params: dict[str, Any], owner: str, remixed_from_video_id: str | None = None) -> Job:
        now = time.time()
        job = Job(id=f"video_{uuid.uuid4().hex}", seq=time.time_ns(), created_at=int(now), status="queued",
                  progress=0, model=model, prompt=prompt, seconds=seconds, size=size, task=task, params=params,
                  remixed_from_video_id=remixed_from_video_id, owner=owner)
        with self.engine.begin() as c:
            c.execute(jobs_table.insert().values(**job.__dict__))
        return job

    def get(self, job_id: str) -> Job | None:
        with self.engine.connect() as c:
            row = c.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()
        return self._job(row) if row else None

    def update(self, job_id: str, **values) -> None:
        with self.engine.begin() as c:
            c.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(**values))

    def set_progress(self, job_id: str, progress: int) -> None:
        with self.engine.begin() as c:
            c.execute(update(jobs_table).where(jobs_table.c.id == job_id, jobs_table.c.status.in_(ACTIVE))
                      .values(status="in_progress", progress=int(progress)))

    def complete(self, job_id: str, params: dict[str, Any]) -> None:
        self.update(job_id, status="completed", progress=100, completed_at=int(time.time()), params=params)

    def fail(self, job_id: str, code: str, message: str) -> None:
        self.update(job_id, status="failed", completed_at=int(time.time()),
                    error={"code": code, "message": message})

    def list(self, *, after: str | None = None, limit: int = 20, order: str = "desc") -> tuple[list[Job], bool]:
        q = select(jobs_table)
        if after is not None:
            anchor = self.get(after)
            if anchor is not None:
                q = q.where(jobs_table.c.seq < anchor.seq if order == "desc" else jobs_table.c.seq > anchor.seq)
        q = q.order_by(jobs_table.c.seq.desc() if order == "desc" else jobs_table.c.seq.asc()).limit(limit + 1)
        with self.engine.connect() as c:
            rows = [self._job(r) for r in c.execute(q)]
        return rows[:limit], len(rows) > limit

    def delete(self, job_id: str) -> bool:
        with self.engine.begin() as c:
            return c.execute(delete(jobs_table).where(jobs_table.c.id == job_id)).rowcount > 0

    def count_active(self) -> int:
        with self.engine.connect() as c:
            return len(c.execute(select(jobs_table.c.id).where(jobs_table.c.status.in_(ACTIVE))).all())

    def heartbeat(self, owner: str) -> None:
        now = int(time.time())
        with self.engine.begin() as c:
            if c.execute(update(owners_table).where(owners_table.c.owner == owner).values(seen_at=now)).rowcount == 0:
                c.execute(owners_table.insert().values(owner=owner, seen_at=now))

    def fail_interrupted(self, reason: str, stale_after_s: float, alive: str | None = None) -> int:
        """Active jobs whose owner has not heart-beaten for `stale_after_s` (or has none) end as failed with
        `reason`; `alive` (the caller) is never stale. Returns how many."""
        cutoff = int(time.time() - stale_after_s)
        with self.engine.begin() as c:
            live = select(owners_table.c.owner).where(owners_table.c.seen_at >= cutoff)
            q = update(jobs_table).where(jobs_table.c.status.in_(ACTIVE),
                                         (jobs_table.c.owner.is_(None)) | (jobs_table.c.owner.not_in(live)))
            if alive is not None:
                q = q.where((jobs_table.c.owner.is_(None)) | (jobs_table.c.owner != alive))
            res = c.execute(q.values(status="failed", completed_at=int(time.time()),
                                     error={"code": "interrupted", "message": reason}))
            c.execute(delete(owners_table).where(owners_table.c.seen_at < cutoff - 3600))
        return res.rowcount
