"""`seq` (creation order, `time.time_ns()` ≈ 1.8e18) as a 64-bit integer: PostgreSQL's INTEGER is 32-bit, so every
insert failed with "integer out of range" (SQLite's INTEGER was already 64-bit).

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("lumiere_video_jobs") as batch:
        batch.alter_column("seq", type_=sa.BigInteger, existing_type=sa.Integer, existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("lumiere_video_jobs") as batch:
        batch.alter_column("seq", type_=sa.Integer, existing_type=sa.BigInteger, existing_nullable=False)
