"""SQLAlchemy 2.0 typed models: studies, series, instances, jobs, outputs and deliveries.

Every stage moves rows through explicit states so that it can be re-run after a
crash. Times are timezone-aware UTC.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A DateTime that always comes back timezone-aware UTC (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class SeriesState(str, enum.Enum):
    """Life of a series on the node."""

    RECEIVING = "RECEIVING"  # instances arriving
    COMPLETE = "COMPLETE"  # quiet long enough, or header hints say all arrived
    ROUTED = "ROUTED"  # rules evaluated; jobs created where a rule matched
    IGNORED = "IGNORED"  # loop guard or no rule matched (see route_note)


class JobState(str, enum.Enum):
    """Life of a job."""

    WAITING = "WAITING"  # assembling its input series (multi-series pipelines)
    PENDING = "PENDING"  # ready to run
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """No further transitions happen on their own."""
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


TERMINAL_JOB_STATES = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


def _enum(cls: type[enum.Enum]) -> Any:
    from sqlalchemy import Enum

    return Enum(
        cls, native_enum=False, length=16, validate_strings=True, values_callable=lambda e: [m.value for m in e]
    )


class Base(DeclarativeBase):
    """Declarative base of the node's tables."""

    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class Study(Base):
    """A study, keyed by its Study Instance UID."""

    __tablename__ = "study"
    #: the dashboard's counts of recent studies and exact searches (migration 0007)
    __table_args__ = (
        Index("ix_study_created_at", "created_at"),
        Index("ix_study_patient_id", "patient_id"),
        Index("ix_study_accession_number", "accession_number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_name: Mapped[str | None] = mapped_column(String(256))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_birth_date: Mapped[str | None] = mapped_column(String(16))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(256))
    specific_character_set: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")


class Series(Base):
    """A series and its routing state."""

    __tablename__ = "series"
    __table_args__ = (Index("ix_series_state_last", "state", "last_received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(256))
    protocol_name: Mapped[str | None] = mapped_column(String(256))
    header: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[SeriesState] = mapped_column(_enum(SeriesState), default=SeriesState.RECEIVING)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    frames_received: Mapped[int] = mapped_column(Integer, default=0)
    expected_frames: Mapped[int | None] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    source_address: Mapped[str | None] = mapped_column(String(64))
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]
    routed_at: Mapped[datetime | None]
    reopen_count: Mapped[int] = mapped_column(Integer, default=0)
    route_note: Mapped[str | None] = mapped_column(Text)
    purged_at: Mapped[datetime | None]

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.id")


class Instance(Base):
    """One received SOP instance and where its file lies in the store."""

    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    path: Mapped[str] = mapped_column(String(256))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    receive_count: Mapped[int] = mapped_column(Integer, default=1)
    calling_ae: Mapped[str | None] = mapped_column(String(16))

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """A pipeline run over one series or several series of a study."""

    __tablename__ = "job"
    __table_args__ = (
        Index("ix_job_state_rank", "state", "priority_rank", "id"),
        # the dashboard's lists of one state, newest first (migration 0007)
        Index("ix_job_state_id", "state", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(128))
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.WAITING)
    priority: Mapped[str] = mapped_column(String(8), default="normal")
    priority_rank: Mapped[int] = mapped_column(Integer, default=1)
    inputs: Mapped[dict[str, Any]] = mapped_column(default=dict)  # role -> SeriesInstanceUID
    destinations: Mapped[list[Any]] = mapped_column(default=list)
    trigger_series_uid: Mapped[str | None] = mapped_column(String(64))
    input_key: Mapped[str | None] = mapped_column(String(512), unique=True)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    deadline_at: Mapped[datetime | None]
    required_complete_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    #: when it last became PENDING (created, assembled or re-queued): queueing time is started_at - queued_at
    queued_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    #: distributed mode: when serve last published it to the broker (NULL: to publish)
    published_at: Mapped[datetime | None]
    # Execution (filled by the worker)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: the worker holding a RUNNING job; with heartbeat_at, its lease (distributed mode: queue.lease_s)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None]
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    model_checksums: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result_path: Mapped[str | None] = mapped_column(String(512))
    #: why it failed: input (the sender can fix it), model, timeout, internal
    failure_kind: Mapped[str | None] = mapped_column(String(16))

    study: Mapped[Study] = relationship(back_populates="jobs")
    outputs: Mapped[list[Output]] = relationship(back_populates="job", order_by="Output.id")


class OutputKind(str, enum.Enum):
    """Kinds of result objects a job produces."""

    SEG = "SEG"
    SEG_LABELMAP = "SEG_LABELMAP"
    SR = "SR"
    KEY_IMAGE = "KEY_IMAGE"
    NOTICE = "NOTICE"


class Output(Base):
    """A DICOM object the node produced for a job, stored in the file store."""

    __tablename__ = "output"
    __table_args__ = (Index("ix_output_study_live", "study_id", "superseded_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"))
    kind: Mapped[OutputKind] = mapped_column(_enum(OutputKind))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_uid: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(256))
    png_path: Mapped[str | None] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    superseded_at: Mapped[datetime | None]
    superseded_by_job_id: Mapped[int | None] = mapped_column(Integer)
    #: when retention deleted its file (the row stays for the history)
    purged_at: Mapped[datetime | None]

    job: Mapped[Job] = relationship(back_populates="outputs")


class DeliveryState(str, enum.Enum):
    """Life of one output's delivery to one destination."""

    PENDING = "pending"  # due at next_attempt_at (or now when that is empty)
    IN_PROGRESS = "in_progress"  # claimed by a dispatcher (worker_id) until lease_until
    DELIVERED = "delivered"  # the destination accepted it (success or warning status)
    FAILED = "failed"  # dead letter: refused permanently, too many attempts or too old
    CANCELLED = "cancelled"  # an operator cancelled it

    @property
    def terminal(self) -> bool:
        """No further transitions happen on their own."""
        return self in (DeliveryState.DELIVERED, DeliveryState.FAILED, DeliveryState.CANCELLED)


TERMINAL_DELIVERY_STATES = (DeliveryState.DELIVERED, DeliveryState.FAILED, DeliveryState.CANCELLED)


class Delivery(Base):
    """One output sent to one named destination, with its retry state and lease."""

    __tablename__ = "delivery"
    __table_args__ = (
        UniqueConstraint("output_id", "destination", name="uq_delivery_output_destination"),
        # the dashboard: counts per destination and state, lists of one state newest first (migration 0007)
        Index("ix_delivery_destination_state", "destination", "state"),
        Index("ix_delivery_state_id", "state", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("output.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    #: the destination's name in the configuration (``return-to-sender`` for the route option)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState), default=DeliveryState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    #: the last DICOM status (C-STORE) or HTTP status (STOW-RS) received
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    #: the destination refused it permanently (no further retries on their own)
    permanent: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None]

    output: Mapped[Output] = relationship()
