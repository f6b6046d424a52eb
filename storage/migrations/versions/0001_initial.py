"""initial schema: study, series, instance, job

Revision ID: 0001
Revises: 
Create Date: 2026-11-22 00:04:41.341329
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('study',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_name', sa.String(length=256), nullable=True),
    sa.Column('patient_id', sa.String(length=64), nullable=True),
    sa.Column('patient_birth_date', sa.String(length=16), nullable=True),
    sa.Column('patient_sex', sa.String(length=16), nullable=True),
    sa.Column('accession_number', sa.String(length=64), nullable=True),
    sa.Column('study_date', sa.String(length=16), nullable=True),
    sa.Column('study_description', sa.String(length=256), nullable=True),
    sa.Column('specific_character_set', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_uid')
    )
    op.create_table('job',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('pipeline', sa.String(length=64), nullable=False),
    sa.Column('route', sa.String(length=128), nullable=False),
    sa.Column('state', sa.Enum('WAITING', 'PENDING', 'RUNNING', 'DONE', 'FAILED', 'CANCELLED', name='jobstate', native_enum=False, length=16), nullable=False),
    sa.Column('priority', sa.String(length=8), nullable=False),
    sa.Column('priority_rank', sa.Integer(), nullable=False),
    sa.Column('inputs', sa.JSON(), nullable=False),
    sa.Column('destinations', sa.JSON(), nullable=False),
    sa.Column('trigger_series_uid', sa.String(length=64), nullable=True),
    sa.Column('input_key', sa.String(length=512), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('deadline_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('required_complete_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['study_id'], ['study.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('input_key')
    )
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.create_index('ix_job_state_rank', ['state', 'priority_rank', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_study_id'), ['study_id'], unique=False)

    op.create_table('series',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=True),
    sa.Column('series_number', sa.Integer(), nullable=True),
    sa.Column('series_description', sa.String(length=256), nullable=True),
    sa.Column('protocol_name', sa.String(length=256), nullable=True),
    sa.Column('header', sa.JSON(), nullable=False),
    sa.Column('state', sa.Enum('RECEIVING', 'COMPLETE', 'ROUTED', 'IGNORED', name='seriesstate', native_enum=False, length=16), nullable=False),
    sa.Column('instance_count', sa.Integer(), nullable=False),
    sa.Column('frames_received', sa.Integer(), nullable=False),
    sa.Column('expected_frames', sa.Integer(), nullable=True),
    sa.Column('calling_ae', sa.String(length=16), nullable=True),
    sa.Column('called_ae', sa.String(length=16), nullable=True),
    sa.Column('source_address', sa.String(length=64), nullable=True),
    sa.Column('first_received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('routed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('reopen_count', sa.Integer(), nullable=False),
    sa.Column('route_note', sa.Text(), nullable=True),
    sa.Column('purged_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['study_id'], ['study.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('series_uid')
    )
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.create_index('ix_series_state_last', ['state', 'last_received_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_series_study_id'), ['study_id'], unique=False)

    op.create_table('instance',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_uid', sa.String(length=64), nullable=False),
    sa.Column('series_id', sa.Integer(), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=True),
    sa.Column('instance_number', sa.Integer(), nullable=True),
    sa.Column('number_of_frames', sa.Integer(), nullable=False),
    sa.Column('path', sa.String(length=256), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('receive_count', sa.Integer(), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=True),
    sa.ForeignKeyConstraint(['series_id'], ['series.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_uid')
    )
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instance_series_id'), ['series_id'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instance_series_id'))

    op.drop_table('instance')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_series_study_id'))
        batch_op.drop_index('ix_series_state_last')

    op.drop_table('series')
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_study_id'))
        batch_op.drop_index('ix_job_state_rank')

    op.drop_table('job')
    op.drop_table('study')

