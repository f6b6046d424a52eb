"""outputs: SEG, SR, key image and notice objects per job; job failure kind

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failure_kind", sa.String(length=16), nullable=True))
    op.create_table(
        "output",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("SEG", "SEG_LABELMAP", "SR", "KEY_IMAGE", "NOTICE", name="outputkind", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=256), nullable=False),
        sa.Column("png_path", sa.String(length=512), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("superseded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("superseded_by_job_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("output", schema=None) as batch_op:
        batch_op.create_index("ix_output_job_id", ["job_id"], unique=False)
        batch_op.create_index("ix_output_sop_uid", ["sop_uid"], unique=False)
        batch_op.create_index("ix_output_study_live", ["study_id", "superseded_at"], unique=False)


def downgrade() -> None:
    op.drop_table("output")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("failure_kind")
