"""Tenants, leases and idempotency: every job belongs to a tenant; a job is claimed by the replica that runs it
(`owner`, with `attempts` and `started_at` for retries and the job timeout); an `Idempotency-Key` is unique per
tenant, and `request_hash` tells a retry of the same request from a different one under the same key;
`batch_key` groups queued jobs that one sampler call can run together.

Jobs made before tenants existed belong to the tenant named `default` (the tenant of a server without keys, and
of any key the keys file names `default`).

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("lumiere_video_jobs") as batch:
        batch.add_column(sa.Column("tenant", sa.String(64), nullable=False, server_default="default"))
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("started_at", sa.Integer))
        batch.add_column(sa.Column("idempotency_key", sa.String(255)))
        batch.add_column(sa.Column("request_hash", sa.String(64)))
        batch.add_column(sa.Column("batch_key", sa.String(255)))
    op.create_index("ix_lumiere_video_jobs_tenant_seq", "lumiere_video_jobs", ["tenant", "seq"])
    op.create_index("ux_lumiere_video_jobs_idempotency", "lumiere_video_jobs", ["tenant", "idempotency_key"],
                    unique=True)  # NULL keys never collide (SQL NULLs are distinct)


def downgrade() -> None:
    op.drop_index("ux_lumiere_video_jobs_idempotency", "lumiere_video_jobs")
    op.drop_index("ix_lumiere_video_jobs_tenant_seq", "lumiere_video_jobs")
    with op.batch_alter_table("lumiere_video_jobs") as batch:
        for name in ("batch_key", "request_hash", "idempotency_key", "started_at", "attempts", "tenant"):
            batch.drop_column(name)
