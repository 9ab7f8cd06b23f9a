"""The job store: every SQL statement of the service lives here (SQLAlchemy 2, SQLite or Postgres).

State changes go through :meth:`JobStore.transition`, which checks the state machine of
:class:`services.models.JobState` and updates with ``WHERE state = <current>`` (compare-and-set), so two
writers — a request and the reconciler — can never both move a job out of the same state.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import JSON, DateTime, Index, String, Text, create_engine, event, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from services.models import IllegalTransition, JobProgress, JobPublic, JobState

ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)
_ACTIVE_SQL = text("state IN ('queued', 'running')")


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    origin: Mapped[str] = mapped_column(String(16))
    submission_id: Mapped[str] = mapped_column(String(128), unique=True)
    entrypoint: Mapped[str] = mapped_column(Text, default="")
    spec: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    dataset: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    store: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    log_tail: Mapped[str | None] = mapped_column(Text, nullable=True)

    # At most one active job per dataset, enforced by the database itself: two simultaneous submissions of
    # the same dataset cannot both pass a check-then-insert. (NULL datasets never collide.)
    __table_args__ = (Index("one_active_writer", "store", "dataset", unique=True,
                            sqlite_where=_ACTIVE_SQL, postgresql_where=_ACTIVE_SQL),)


class JobNotFound(KeyError):
    """No job with that id."""


class DatasetBusy(Exception):
    """Another queued or running job already writes this store/dataset."""


def one_line(text: str, limit: int = 500) -> str:
    """The first non-empty line of ``text``, at most ``limit`` characters: an error is one clear line."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[:limit - 1] + "…"


def now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; they were stored as UTC."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _public(row: Job) -> JobPublic:
    return JobPublic(
        id=row.id, state=JobState(row.state), origin=row.origin, dataset=row.dataset, store=row.store,
        submission_id=row.submission_id, entrypoint=row.entrypoint, created_at=_utc(row.created_at),
        started_at=_utc(row.started_at), finished_at=_utc(row.finished_at), error=row.error,
        log_tail=row.log_tail, spec=row.spec,
        progress=_progress(row.progress),
    )


def _progress(data: dict | None) -> JobProgress | None:
    """A record's last progress. One saved by an older version that no longer validates is not shown; the
    reconciler replaces it from the dataset's progress file."""
    try:
        return JobProgress.model_validate(data) if data else None
    except ValidationError:
        return None


class JobStore:
    """Job records behind a SQLAlchemy engine.

    Args:
        url: SQLAlchemy database URL (``sqlite:///path/jobs.db``, ``postgresql+psycopg://…``).
    """

    def __init__(self, url: str) -> None:
        sqlite = url.startswith("sqlite")
        self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30} if sqlite else {})
        if sqlite:
            # WAL: readers (API requests) never block on the reconciler's writes.
            event.listen(self.engine, "connect", lambda conn, _: conn.execute("PRAGMA journal_mode=WAL"))
        Base.metadata.create_all(self.engine)
        for index in Job.__table__.indexes:  # databases made before an index existed get it too
            index.create(self.engine, checkfirst=True)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> bool:
        with self._session() as s:
            return s.execute(select(1)).scalar() == 1

    def create(self, *, id: str, submission_id: str, origin: str, entrypoint: str = "",
               spec: dict[str, Any] | None = None, dataset: str | None = None, store: str | None = None,
               created_at: datetime | None = None) -> JobPublic:
        """Insert a new job in state ``queued``.

        Raises:
            DatasetBusy: An active job already writes ``store``/``dataset`` (checked atomically by the database).
            IntegrityError: The id or submission id exists.
        """
        stamp = now()
        row = Job(id=id, state=JobState.QUEUED.value, origin=origin, submission_id=submission_id,
                  entrypoint=entrypoint, spec=spec, dataset=dataset, store=store,
                  created_at=created_at or stamp, updated_at=stamp)
        try:
            with self._session() as s, s.begin():
                s.add(row)
        except IntegrityError as exc:
            message = str(exc.orig)  # SQLite names the columns, Postgres the index
            if "one_active_writer" in message or "jobs.store, jobs.dataset" in message:
                raise DatasetBusy(dataset) from exc
            raise
        return _public(row)

    def get(self, job_id: str) -> JobPublic:
        with self._session() as s:
            row = s.get(Job, job_id)
            if row is None:
                raise JobNotFound(job_id)
            return _public(row)

    def list(self, *, state: JobState | None = None, limit: int = 50, offset: int = 0) -> tuple[list[JobPublic], int]:
        """Jobs newest first, and how many match in all."""
        query, count = select(Job), select(func.count()).select_from(Job)
        if state is not None:
            query, count = query.where(Job.state == state.value), count.where(Job.state == state.value)
        with self._session() as s:
            rows = s.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
            return [_public(r) for r in rows], s.execute(count).scalar_one()

    def active(self) -> list[JobPublic]:
        """Jobs not yet in a terminal state, oldest first."""
        with self._session() as s:
            rows = s.scalars(select(Job).where(Job.state.in_(ACTIVE)).order_by(Job.created_at)).all()
            return [_public(r) for r in rows]

    def finished_since(self, since: datetime) -> list[JobPublic]:
        """Jobs that reached a terminal state at or after ``since``."""
        with self._session() as s:
            rows = s.scalars(select(Job).where(Job.state.not_in(ACTIVE), Job.finished_at >= since)).all()
            return [_public(r) for r in rows]

    def submission_ids(self) -> set[str]:
        with self._session() as s:
            return set(s.scalars(select(Job.submission_id)).all())

    def active_writer(self, store: str, dataset: str) -> str | None:
        """Id of a queued or running job that writes ``store/dataset``, if any."""
        with self._session() as s:
            return s.scalars(select(Job.id).where(Job.store == store, Job.dataset == dataset,
                                                  Job.state.in_(ACTIVE)).limit(1)).first()

    def counts_by_state(self) -> dict[JobState, int]:
        with self._session() as s:
            rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        counts = dict.fromkeys(JobState, 0)
        counts.update({JobState(state): n for state, n in rows})
        return counts

    def transition(self, job_id: str, target: JobState, *, error: str | None = None,
                   log_tail: str | None = None, at: datetime | None = None) -> JobPublic:
        """Move a job to ``target``.

        Raises:
            JobNotFound: No such job.
            IllegalTransition: The state machine forbids it, or another writer changed the state first.
        """
        with self._session() as s, s.begin():
            row = s.get(Job, job_id)
            if row is None:
                raise JobNotFound(job_id)
            current = JobState(row.state)
            if not current.can_become(target):
                raise IllegalTransition(f"job {job_id} is {current.value}; it cannot become {target.value}")
            stamp = at or now()
            values: dict[str, Any] = {"state": target.value, "updated_at": now()}
            if target == JobState.RUNNING:
                values["started_at"] = stamp
            if target.is_terminal():
                values["finished_at"] = stamp
                error = one_line(error) if error is not None else None
                values |= {k: v for k, v in (("error", error), ("log_tail", log_tail)) if v is not None}
            done = s.execute(update(Job).where(Job.id == job_id, Job.state == current.value).values(**values))
            if done.rowcount != 1:
                raise IllegalTransition(f"job {job_id} changed state concurrently")
        return self.get(job_id)

    def set_progress(self, job_id: str, progress: JobProgress) -> None:
        with self._session() as s, s.begin():
            s.execute(update(Job).where(Job.id == job_id).values(progress=progress.model_dump(mode="json")))
