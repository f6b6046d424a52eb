"""What every read of the query layer shares: pages, state filters, SQL LIKE patterns, ISO times."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from pacs_node.errors import PacsNodeError
from storage.models import Study

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)


#: Largest row id a request may name: the SQL ``INTEGER`` range of the id columns (larger ones overflow the driver).
MAX_ID = 2**31 - 1
#: Largest ``offset`` of a list (beyond the rows any node holds; larger ones overflow the driver).
MAX_OFFSET = 2**31 - 1


class FilterError(PacsNodeError):
    """A filter value the query layer cannot use (an unknown state, a page out of range); the message says which."""


@dataclass
class Page(Generic[T]):
    """One page of a list, newest first: its rows and how many rows matched in all."""

    items: list[T]
    total: int
    limit: int
    offset: int = 0

    @property
    def page(self) -> int:
        """The page's number, from 1, for pages of ``limit`` rows."""
        return self.offset // max(1, self.limit) + 1

    @property
    def pages(self) -> int:
        """How many pages of ``limit`` rows the list has (at least 1)."""
        return max(1, -(-self.total // max(1, self.limit)))


def parse_count(value: str | int | None, name: str, *, default: int, maximum: int) -> int:
    """A whole number from 0 to ``maximum`` from a request parameter (``default`` when absent or empty).

    Raises:
        FilterError: not a whole number, or above ``maximum``; the message names ``name``.
    """
    if value is None:
        return default
    text = str(value).strip()
    if not text:
        return default
    if not text.isascii() or not text.isdigit():
        raise FilterError(f"{name} {text[:40]!r}: a whole number from 0 to {maximum}")
    # thousands of digits: refused before int() spends time on them
    if len(text.lstrip("0")) > len(str(maximum)) or int(text) > maximum:
        raise FilterError(f"{name} {text[:20]}{'...' if len(text) > 20 else ''}: at most {maximum}")
    return int(text)


def parse_id(value: str | int, what: str) -> int:
    """A row id from a request (1 to :data:`MAX_ID`).

    Raises:
        FilterError: not a whole number in that range; the message names ``what``.
    """
    number = parse_count(value, what, default=0, maximum=MAX_ID)
    if number < 1:
        raise FilterError(f"{what} {number}: ids start at 1")
    return number


def check_page(limit: int, offset: int) -> None:
    """Refuse a page the database cannot be asked for.

    Raises:
        FilterError: a negative limit, or an offset outside 0 to :data:`MAX_OFFSET`.
    """
    if limit < 0:
        raise FilterError(f"limit {limit}: must not be negative")
    if not 0 <= offset <= MAX_OFFSET:
        raise FilterError(f"offset {offset}: a whole number from 0 to {MAX_OFFSET}")


def fetch_page(session: Session, stmt: Any, order: Any, *, limit: int, offset: int = 0) -> tuple[int, list[Any]]:
    """``(total, rows)``: how many rows ``stmt`` matches, and those from ``offset`` to ``offset + limit``.

    Raises:
        FilterError: a page out of range (:func:`check_page`).
    """
    check_page(limit, offset)
    total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    rows = list(session.scalars(stmt.order_by(order).offset(offset).limit(limit)))
    return int(total), rows


def parse_states(kind: type[E], values: Iterable[E | str]) -> list[E]:
    """States of ``kind`` from members or their values in any case (surrounding spaces ignored).

    Raises:
        FilterError: a value is not one of ``kind``'s.
    """
    known = {str(m.value).lower(): m for m in kind}
    out: list[E] = []
    for value in values:
        if isinstance(value, kind):
            out.append(value)
            continue
        member = known.get(str(value).strip().lower())
        if member is None:
            raise FilterError(f"state {value!r}: not one of {', '.join(known)}")
        out.append(member)
    return out


def in_states(column: Any, kind: type[E], values: Iterable[E | str]) -> list[ColumnElement[bool]]:
    """The condition "``column`` is one of these states" (none for no states).

    Raises:
        FilterError: a value is not one of ``kind``'s.
    """
    wanted = parse_states(kind, values)
    return [column.in_(wanted)] if wanted else []


def of_study(column: Any, study_uid: str | None) -> list[ColumnElement[bool]]:
    """The condition "``column`` (a study id) is the study with this UID" (none without a UID)."""
    return [column.in_(select(Study.id).where(Study.study_uid == study_uid))] if study_uid else []


def like_pattern(value: str) -> str:
    """A SQL LIKE pattern (escape ``\\``) from a DICOM-style wildcard value: ``*`` any run, ``?`` one character."""
    out = []
    for ch in value:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 text of a time, or None."""
    return value.isoformat() if value is not None else None
