"""job.queued_at and job.published_at: distributed mode (Celery) publishes PENDING jobs and measures queueing

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
    # Jobs already queued count from their creation.
    op.execute("UPDATE job SET queued_at = created_at WHERE state IN ('PENDING', 'RUNNING', 'DONE', 'FAILED')")


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("published_at")
        batch_op.drop_column("queued_at")
