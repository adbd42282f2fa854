"""Job metadata in SQL (SQLAlchemy): a SQLite file by default, PostgreSQL in a cluster (`postgresql://…`, driven by
psycopg 3, which the `cluster` extra installs).

One row per video job, owned by a tenant (every read and write of a route names it, so a tenant sees only its
own jobs). Jobs are executed by claiming them from here, not by the replica that took the request:

    create (queued)  ->  claim (in_progress, owner = the claiming replica, attempts + 1)  ->  complete | fail
                                                  |
           sweep: the owner stopped heart-beating -> queued again (attempts left) or failed `interrupted`;
                  running longer than the job timeout -> failed `timeout`; cancel -> failed `cancelled`

`claim` is `FOR UPDATE SKIP LOCKED` on PostgreSQL and a compare-and-set on SQLite, so a job runs on one replica
at a time. `complete`, `fail` and `set_progress` only touch a job still active and still held by the caller: a
job that was cancelled, timed out or handed to another replica cannot later flip to completed, and the runner
learns from `set_progress` returning False that it must stop sampling.

The schema is managed by Alembic migrations (`serve/migrations/versions/`), applied when a store opens: every
replica may open it at once, so on PostgreSQL the upgrade runs under an advisory lock. A store that cannot be
reached or migrated raises `StoreError` with one line naming the URL (password hidden) and the cause.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
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
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError

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
    Column("tenant", String(64), nullable=False, server_default="default"),
    Column("attempts", Integer, nullable=False, server_default="0"),  # claims so far (a crash re-queues)
    Column("started_at", Integer),  # when the current attempt was claimed (the job timeout counts from here)
    Column("idempotency_key", String(255)),
    Column("request_hash", String(64)),  # of the request that made it: the same key with another body is refused
    Column("batch_key", String(255)),  # jobs with the same key can share one sampler call (None: never batched)
    Index("ix_lumiere_video_jobs_tenant_seq", "tenant", "seq"),
    Index("ux_lumiere_video_jobs_idempotency", "tenant", "idempotency_key", unique=True),
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
_CREATE_LOCK = 0x6C756D63  # pg_advisory_xact_lock key: admission (count, then insert) is one step ("lumc")


class LimitReached(Exception):
    """`create` refused: `scope` is "tenant" or "server", `active` the count it saw, `limit` the ceiling."""

    def __init__(self, scope: str, active: int, limit: int):
        super().__init__(f"{scope}: {active} active jobs, at most {limit}")
        self.scope, self.active, self.limit = scope, active, limit


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before by this tenant for a different request (`job` is that one)."""

    def __init__(self, job: Job):
        super().__init__(job.id)
        self.job = job


def request_hash(body: dict[str, Any]) -> str:
    """A stable hash of a request body (uploaded files by content): what an Idempotency-Key retry must repeat."""
    h = hashlib.sha256()
    for key in sorted(body):
        v = body[key]
        h.update(key.encode() + b"\0")
        h.update(v if isinstance(v, bytes) else json.dumps(v, sort_keys=True, default=str).encode())
        h.update(b"\1")
    return h.hexdigest()


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
    tenant: str = "default"
    attempts: int = 0
    started_at: int | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    batch_key: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `video` object (plus a few Lumiere fields the SDK ignores)."""
        return {
            "id": self.id, "object": "video", "created_at": self.created_at, "completed_at": self.completed_at,
            "expires_at": None, "status": self.status, "progress": self.progress, "model": self.model,
            "prompt": self.prompt, "seconds": self.seconds, "size": self.size,
            "remixed_from_video_id": self.remixed_from_video_id, "error": self.error, "task": self.task,
            "seed": self.params.get("seed"), "notes": self.params.get("notes", []),
            **{k: self.params[k] for k in ("num_frames", "fps", "inference_time_s", "peak_memory_mb", "webhook_url",
                                           "webhook") if self.params.get(k) is not None},
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
def _sqlite_file_lock(engine: Engine, name: str = "migrate-lock"):
    """SQLite via pysqlite runs DDL outside a transaction, so a concurrent process could see the tables before the
    version row: replicas of one SQLite file (one machine) take turns with a lock file beside it."""
    db = engine.url.database if engine.dialect.name == "sqlite" else None
    if not db or db == ":memory:":
        yield
        return
    with open(f"{db}.{name}", "a") as f:
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
        self._thread_lock = threading.Lock()
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

    # --- admission --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _admission(self):
        """One create at a time, over every replica: PostgreSQL takes a transaction-scoped advisory lock; SQLite (one
        machine) a lock file beside the database, plus a thread lock for this process."""
        if self.engine.dialect.name == "postgresql":
            with self.engine.begin() as c:
                c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CREATE_LOCK})
                yield c
            return
        with self._thread_lock, _sqlite_file_lock(self.engine, "create-lock"), self.engine.begin() as c:
            yield c

    def create(self, *, model: str, prompt: str | None, seconds: str, size: str, task: str,
               params: dict[str, Any], tenant: str = "default", owner: str | None = None,
               remixed_from_video_id: str | None = None, idempotency_key: str | None = None,
               request_hash: str | None = None, max_active: int | None = None,
               max_active_per_tenant: int | None = None, job_id: str | None = None,
               batch_key: str | None = None) -> tuple[Job, bool]:
        """A new queued job -> (job, True); with an `idempotency_key` this tenant used before for the same request,
        (that job, False). Raises `LimitReached` when the tenant or the server is at its active-job ceiling (checked
        and inserted under one lock, so concurrent creates on many replicas cannot overshoot), and
        `IdempotencyConflict` when the key was used for a different request."""
        if idempotency_key is not None:
            earlier = self.by_idempotency_key(tenant, idempotency_key)
            if earlier is not None:
                return self._same_request(earlier, request_hash)
        now = time.time()
        job = Job(id=job_id or f"video_{uuid.uuid4().hex}", seq=time.time_ns(), created_at=int(now), status="queued",
                  progress=0, model=model, prompt=prompt, seconds=seconds, size=size, task=task, params=params,
                  remixed_from_video_id=remixed_from_video_id, owner=owner, tenant=tenant,
                  idempotency_key=idempotency_key, request_hash=request_hash, batch_key=batch_key)
        try:
            with self._admission() as c:
                active = jobs_table.c.status.in_(ACTIVE)
                if max_active_per_tenant is not None:
                    n = c.execute(select(func.count()).where(active, jobs_table.c.tenant == tenant)).scalar_one()
                    if n >= max_active_per_tenant:
                        raise LimitReached("tenant", n, max_active_per_tenant)
                if max_active is not None:
                    n = c.execute(select(func.count()).where(active)).scalar_one()
                    if n >= max_active:
                        raise LimitReached("server", n, max_active)
                c.execute(jobs_table.insert().values(**job.__dict__))
        except IntegrityError:  # the same key raced in from another request: that one won
            earlier = self.by_idempotency_key(tenant, idempotency_key) if idempotency_key else None
            if earlier is None:
                raise
            return self._same_request(earlier, request_hash)
        return job, True

    def by_idempotency_key(self, tenant: str, key: str) -> Job | None:
        with self.engine.connect() as c:
            row = c.execute(select(jobs_table).where(jobs_table.c.tenant == tenant,
                                                     jobs_table.c.idempotency_key == key)).first()
        return self._job(row) if row else None

    @staticmethod
    def _same_request(earlier: Job, request_hash: str | None) -> tuple[Job, bool]:
        if request_hash is not None and earlier.request_hash not in (None, request_hash):
            raise IdempotencyConflict(earlier)
        return earlier, False

    # --- reads (a route always names its tenant; None = every tenant, for operators and tests) -----------------
    def get(self, job_id: str, tenant: str | None = None) -> Job | None:
        q = select(jobs_table).where(jobs_table.c.id == job_id)
        if tenant is not None:
            q = q.where(jobs_table.c.tenant == tenant)
        with self.engine.connect() as c:
            row = c.execute(q).first()
        return self._job(row) if row else None

    def list(self, *, tenant: str | None = None, after: str | None = None, limit: int = 20,
             order: str = "desc") -> tuple[list[Job], bool]:
        q = select(jobs_table)
        if tenant is not None:
            q = q.where(jobs_table.c.tenant == tenant)
        if after is not None:
            anchor = self.get(after, tenant)
            if anchor is not None:
                q = q.where(jobs_table.c.seq < anchor.seq if order == "desc" else jobs_table.c.seq > anchor.seq)
        q = q.order_by(jobs_table.c.seq.desc() if order == "desc" else jobs_table.c.seq.asc()).limit(limit + 1)
        with self.engine.connect() as c:
            rows = [self._job(r) for r in c.execute(q)]
        return rows[:limit], len(rows) > limit

    def update(self, job_id: str, **values) -> None:
        """Set columns of a job (operators, and a finished job's webhook outcome)."""
        with self.engine.begin() as c:
            c.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(**values))

    def count_active(self, tenant: str | None = None) -> int:
        q = select(func.count()).where(jobs_table.c.status.in_(ACTIVE))
        if tenant is not None:
            q = q.where(jobs_table.c.tenant == tenant)
        with self.engine.connect() as c:
            return int(c.execute(q).scalar_one())

    # --- execution ----------------------------------------------------------------------------------------------
    def claim(self, owner: str, batch_key: str | None = None) -> Job | None:
        """The oldest queued job (with `batch_key`: the oldest with that key), now `in_progress` and held by
        `owner`; None when there is none."""
        for _ in range(8):  # SQLite: another replica may take the candidate between the read and the write
            with self.engine.begin() as c:
                q = select(jobs_table.c.id).where(jobs_table.c.status == "queued")
                if batch_key is not None:
                    q = q.where(jobs_table.c.batch_key == batch_key)
                q = q.order_by(jobs_table.c.seq.asc()).limit(1)
                if c.dialect.name == "postgresql":
                    q = q.with_for_update(skip_locked=True)
                job_id = c.execute(q).scalar()
                if job_id is None:
                    return None
                got = c.execute(update(jobs_table).where(jobs_table.c.id == job_id, jobs_table.c.status == "queued")
                                .values(status="in_progress", owner=owner, progress=0, started_at=int(time.time()),
                                        attempts=jobs_table.c.attempts + 1)).rowcount
            if got:
                return self.get(job_id)
        return None

    def claim_batch(self, owner: str, max_jobs: int) -> list[Job]:
        """The oldest queued job and up to `max_jobs - 1` more queued jobs with its batch key (one sampler call can
        run them together), all now held by `owner`; [] when nothing is queued."""
        first = self.claim(owner)
        if first is None:
            return []
        batch = [first]
        while first.batch_key is not None and len(batch) < max_jobs:
            more = self.claim(owner, first.batch_key)
            if more is None:
                break
            batch.append(more)
        return batch

    def _held(self, job_id: str, owner: str | None):
        cond = [jobs_table.c.id == job_id, jobs_table.c.status.in_(ACTIVE)]
        if owner is not None:
            cond.append(jobs_table.c.owner == owner)
        return update(jobs_table).where(*cond)

    def set_progress(self, job_id: str, progress: int, owner: str | None = None) -> bool:
        """Record progress of a job `owner` still holds; False when it does not (cancelled, timed out, handed on)."""
        with self.engine.begin() as c:
            return c.execute(self._held(job_id, owner).values(status="in_progress", progress=int(progress))
                             ).rowcount > 0

    def complete(self, job_id: str, params: dict[str, Any], owner: str | None = None) -> bool:
        with self.engine.begin() as c:
            return c.execute(self._held(job_id, owner).values(
                status="completed", progress=100, completed_at=int(time.time()), params=params)).rowcount > 0

    def fail(self, job_id: str, code: str, message: str, owner: str | None = None) -> bool:
        with self.engine.begin() as c:
            return c.execute(self._held(job_id, owner).values(
                status="failed", completed_at=int(time.time()), error={"code": code, "message": message})
            ).rowcount > 0

    def cancel(self, job_id: str, tenant: str | None = None) -> Job | None:
        """An active job ends as failed with code `cancelled` (the runner stops at its next progress report); the
        job as it now is (None when there is no such job for this tenant)."""
        return self.cancel_and_tell(job_id, tenant)[0]

    def cancel_and_tell(self, job_id: str, tenant: str | None = None) -> tuple[Job | None, bool]:
        """`cancel`, and whether the job was still queued: no runner holds it then, so no runner will report its
        end (its webhook is the caller's to send). The queued case is tried first, in its own statement, so a
        runner claiming the job at the same moment makes it the in-progress case instead, never both."""
        values = dict(status="failed", completed_at=int(time.time()),
                      error={"code": "cancelled", "message": "cancelled by the client"})
        tenant_cond = [] if tenant is None else [jobs_table.c.tenant == tenant]
        with self.engine.begin() as c:
            was_queued = c.execute(update(jobs_table).where(jobs_table.c.id == job_id, jobs_table.c.status == "queued",
                                                            *tenant_cond).values(**values)).rowcount > 0
            if not was_queued:
                c.execute(self._held(job_id, None).where(*tenant_cond).values(**values))
        return self.get(job_id, tenant), was_queued

    def delete(self, job_id: str, tenant: str | None = None) -> bool:
        q = delete(jobs_table).where(jobs_table.c.id == job_id)
        if tenant is not None:
            q = q.where(jobs_table.c.tenant == tenant)
        with self.engine.begin() as c:
            return c.execute(q).rowcount > 0

    def heartbeat(self, owner: str) -> None:
        now = int(time.time())
        with self.engine.begin() as c:
            if c.execute(update(owners_table).where(owners_table.c.owner == owner).values(seen_at=now)).rowcount == 0:
                c.execute(owners_table.insert().values(owner=owner, seen_at=now))

    def release(self, owner: str) -> int:
        """A replica shutting down cleanly hands its running jobs back to the queue (another replica resumes them)
        and drops its heartbeat. Returns how many jobs it handed back."""
        with self.engine.begin() as c:
            n = c.execute(update(jobs_table).where(jobs_table.c.status == "in_progress", jobs_table.c.owner == owner)
                          .values(status="queued", owner=None, progress=0)).rowcount
            c.execute(delete(owners_table).where(owners_table.c.owner == owner))
        return n

    def sweep(self, *, reason: str, stale_after_s: float, max_attempts: int = 1, timeout_s: float | None = None,
              alive: str | None = None) -> dict[str, int]:
        """Housekeeping any replica may run at any time: in-progress jobs whose owner stopped heart-beating for
        `stale_after_s` go back to the queue while they have attempts left (`attempts < max_attempts`), else fail
        with code `interrupted` and `reason`; jobs running past `timeout_s` fail with code `timeout`. `alive` (the
        caller) is never stale. Returns the counts {"requeued", "interrupted", "timed_out"} and, as "ended", the ids
        this call failed (exactly one sweep fails a job, so the caller may send its webhook)."""
        now = int(time.time())
        cutoff = int(now - stale_after_s)
        with self.engine.begin() as c:
            live = select(owners_table.c.owner).where(owners_table.c.seen_at >= cutoff)
            orphan = [jobs_table.c.status == "in_progress",
                      (jobs_table.c.owner.is_(None)) | (jobs_table.c.owner.not_in(live))]
            if alive is not None:
                orphan.append((jobs_table.c.owner.is_(None)) | (jobs_table.c.owner != alive))
            requeued = c.execute(update(jobs_table).where(*orphan, jobs_table.c.attempts < max_attempts)
                                 .values(status="queued", owner=None, progress=0)).rowcount
            interrupted = c.execute(update(jobs_table).where(*orphan).values(
                status="failed", completed_at=now, error={"code": "interrupted", "message": reason})
                .returning(jobs_table.c.id)).scalars().all()
            timed_out = []
            if timeout_s is not None:
                timed_out = c.execute(update(jobs_table).where(
                    jobs_table.c.status == "in_progress", jobs_table.c.started_at < now - timeout_s).values(
                    status="failed", completed_at=now,
                    error={"code": "timeout", "message": f"the job ran longer than {timeout_s:g} s and was stopped"})
                    .returning(jobs_table.c.id)).scalars().all()
            c.execute(delete(owners_table).where(owners_table.c.seen_at < cutoff - 3600))
        return {"requeued": requeued, "interrupted": len(interrupted), "timed_out": len(timed_out),
                "ended": [*interrupted, *timed_out]}
