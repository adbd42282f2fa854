"""The job store as it was first released (created by `metadata.create_all`): jobs and ingress owners.

A database made before migrations existed has these tables and no `alembic_version`: `serve.jobs.migrate` stamps it
at this revision and upgrades from here.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lumiere_video_jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False, index=True),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("completed_at", sa.Integer),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("progress", sa.Integer, nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("prompt", sa.Text),
        sa.Column("seconds", sa.String(16), nullable=False),
        sa.Column("size", sa.String(32), nullable=False),
        sa.Column("task", sa.String(32), nullable=False),
        sa.Column("remixed_from_video_id", sa.String(64)),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("error", sa.JSON),
        sa.Column("owner", sa.String(64)),
    )
    op.create_table(
        "lumiere_ingress_owners",
        sa.Column("owner", sa.String(64), primary_key=True),
        sa.Column("seen_at", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("lumiere_ingress_owners")
    op.drop_table("lumiere_video_jobs")
