"""indexes for the dashboard: deliveries per destination and state, lists of one state newest first,
recent studies, exact study searches

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

INDEXES = {
    "study": (
        ("ix_study_created_at", ["created_at"]),
        ("ix_study_patient_id", ["patient_id"]),
        ("ix_study_accession_number", ["accession_number"]),
    ),
    "job": (("ix_job_state_id", ["state", "id"]),),
    "delivery": (
        ("ix_delivery_destination_state", ["destination", "state"]),
        ("ix_delivery_state_id", ["state", "id"]),
    ),
}


def upgrade() -> None:
    for table, indexes in INDEXES.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name, columns in indexes:
                batch_op.create_index(name, columns, unique=False)


def downgrade() -> None:
    for table, indexes in INDEXES.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name, _ in indexes:
                batch_op.drop_index(name)
