"""What every sender shares: outcomes, status classification, backoff, what is sent where, the sender interface.

- :class:`Outcome` (one delivery, one attempt) and its constructors :func:`ok`,
  :func:`transient` and :func:`permanent`; :data:`NOT_ATTEMPTED`;
- :func:`classify_dimse_status`: a C-STORE status (or a STOW-RS FailureReason) to an outcome;
- :func:`backoff_delay`: full jitter over a capped exponential;
- :class:`Item` (a claimed delivery and its file), :class:`Target` (a resolved peer and its sender)
  and :class:`SendOptions`;
- :class:`Sender`: the interface one destination protocol implements. The
  protocols are :mod:`pacs_node.deliver.dimse` (C-STORE SCU) and
  :mod:`pacs_node.deliver.dicomweb` (STOW-RS); :mod:`pacs_node.deliver.senders`
  maps a destination's ``type`` to its sender; :mod:`pacs_node.deliver.dispatcher`
  runs the loop that claims, sends and records.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from pacs_node.config import DicomwebDestination, DimseDestination, DispatchSettings
from storage.models import OutputKind

#: The destination settings a sender is given (one class per ``type``).
DestinationSettings = DimseDestination | DicomwebDestination


#: C-STORE warnings that still mean "stored" (PS3.4 B.2.3, PS3.7 C).
WARNING_TEXT = {
    0x0001: "warning",
    0x0107: "attribute list error",
    0x0116: "attribute value out of range",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
#: Failures that may pass: out of resources, resource limitation, processing failure, cancelled.
TRANSIENT_FAILURE_TEXT = {
    0x0110: "processing failure",
    0x0213: "resource limitation",
    0xFE00: "cancelled",
}


# -- outcomes -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What became of one delivery in one attempt.

    Attributes:
        delivered: the destination holds the instance (success or warning).
        status: the DICOM status (C-STORE) or HTTP status (STOW-RS), when one came back.
        message: why it failed, or the warning it was stored with.
        permanent: the destination refused it in a way that retrying is unlikely to change.
        final: retrying cannot help at all (configuration, missing file): dead letter at once.
        attempted: False when it was never offered (the dispatcher was stopping); not counted.
        retry_after_s: the peer asked to wait at least this long (HTTP Retry-After).
        peer_text: what the peer said in its own words (DICOM ErrorComment, HTTP body): kept in
            ``last_error`` for the operator but logged at DEBUG only, since a peer may echo patient data.
    """

    delivered: bool
    status: int | None = None
    message: str | None = None
    permanent: bool = False
    final: bool = False
    attempted: bool = True
    retry_after_s: float | None = None
    peer_text: str | None = None

    @property
    def error_text(self) -> str | None:
        """``message`` plus the peer's own words, for ``last_error``."""
        if self.peer_text and self.message:
            return f"{self.message} (peer said: {self.peer_text})"
        return self.message


def ok(status: int | None = None, warning: str | None = None) -> Outcome:
    """Delivered (``warning``: what the peer stored it with, if anything)."""
    return Outcome(True, status, warning)


def transient(message: str, status: int | None = None, retry_after_s: float | None = None) -> Outcome:
    """Not delivered, likely to pass later: retried after a backoff (at least ``retry_after_s``)."""
    return Outcome(False, status, message, retry_after_s=retry_after_s)


def permanent(message: str, status: int | None = None, *, final: bool = False) -> Outcome:
    """Refused in a way retrying is unlikely to change; ``final``: retrying cannot help at all."""
    return Outcome(False, status, message, permanent=True, final=final)


NOT_ATTEMPTED = Outcome(False, None, "not offered: the dispatcher was stopping", attempted=False)


def classify_dimse_status(status: int, *, comment: str | None = None) -> Outcome:
    """Map a C-STORE response status (or a STOW-RS FailureReason) to an outcome.

    Success 0x0000 and warnings (0xB000, 0xB006, 0xB007, 0x0107, 0x0116, 0x0001)
    are delivered. 0x0111 "duplicate SOP instance" is delivered with a warning:
    the peer holds that UID already (and kept its copy). Out of resources
    (0xA7xx), resource limitation (0x0213), processing failure (0x0110) and
    cancel (0xFE00) are transient; everything else (0xA9xx, 0xCxxx, 0x0122
    SOP class not supported, 0x0124 not authorised, ...) is permanent.
    """
    outcome = _classify_status(status)
    return replace(outcome, peer_text=comment or None)


def _classify_status(status: int) -> Outcome:
    if status == 0x0000:
        return ok(status)
    if status in WARNING_TEXT or 0xB000 <= status <= 0xBFFF:
        return ok(status, f"stored with warning 0x{status:04X} {WARNING_TEXT.get(status, 'warning')}")
    if status == 0x0111:
        return ok(
            status,
            "peer reported 0x0111 duplicate SOP instance: it already holds this UID and kept its copy",
        )
    if 0xA700 <= status <= 0xA7FF:
        return transient(f"refused 0x{status:04X}: out of resources", status)
    if status in TRANSIENT_FAILURE_TEXT:
        return transient(f"failed 0x{status:04X}: {TRANSIENT_FAILURE_TEXT[status]}", status)
    if 0xA900 <= status <= 0xA9FF:
        return permanent(f"refused 0x{status:04X}: data set does not match SOP class", status)
    if 0xC000 <= status <= 0xCFFF:
        return permanent(f"failed 0x{status:04X}: cannot understand", status)
    if status == 0x0122:
        return permanent("refused 0x0122: SOP class not supported", status)
    if status == 0x0124:
        return permanent("refused 0x0124: not authorised", status)
    return permanent(f"failed with status 0x{status:04X}", status)


def backoff_delay(
    attempts: int, settings: DispatchSettings, rng: random.Random | None = None, *, fraction: float | None = None
) -> float:
    """Seconds to wait after ``attempts`` failed attempts: full jitter over a capped exponential.

    ``fraction`` (0 to 1) replaces the random draw: the deliveries of one batch
    share it, so that they stay together and are retried in one association.
    """
    cap = min(settings.backoff_max_s, settings.backoff_base_s * 2 ** max(0, attempts - 1))
    u = (rng or random).random() if fraction is None else fraction
    return u * cap


# -- what is sent where -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One claimed delivery with what sending it needs."""

    delivery_id: int
    path: Path
    sop_class_uid: str
    sop_uid: str
    kind: OutputKind


def split_missing(items: Sequence[Item]) -> tuple[dict[int, Outcome], list[Item]]:
    """(final failures for items whose file left the store, the items still to send)."""
    out: dict[int, Outcome] = {}
    todo: list[Item] = []
    for item in items:
        if not item.path.is_file():
            out[item.delivery_id] = permanent(f"file {item.path} is missing from the store", final=True)
        else:
            todo.append(item)
    return out, todo


@dataclass(frozen=True)
class SendOptions:
    """What a sender is told about a batch besides its target and items.

    Attributes:
        ae_title: the node's AE title (``dicom.ae_title``), for protocols that present one.
        timeout_s: the limit for each network step (``dispatch.timeout_s``).
        stop: set when the dispatcher is stopping: items not yet offered come back as :data:`NOT_ATTEMPTED`.
    """

    ae_title: str
    timeout_s: float
    stop: threading.Event | None = None


@dataclass(frozen=True)
class Target:
    """A resolved peer: a configured destination, or the sender of a job's series, and the sender that serves it.

    Made by :func:`pacs_node.deliver.senders.target_for`, which picks ``sender`` by the destination's ``type``.
    """

    name: str  # the destination name (RETURN_TO_SENDER for return to sender)
    where: str  # the settings key, for messages
    destination: DestinationSettings
    sender: Sender

    @property
    def label(self) -> str:
        """The peer in a few words, for logs and messages (the sender's :meth:`Sender.label`)."""
        return self.sender.label(self)


# -- the sender interface -----------------------------------------------------------------------------------------


class Sender(Protocol):
    """What the dispatcher needs of one destination protocol.

    A new protocol is a class with these four methods, a destination class in
    :mod:`pacs_node.config.model` whose ``type`` names it, and one entry in
    :data:`pacs_node.deliver.senders.SENDERS`.
    """

    def label(self, target: Target) -> str:
        """The peer in a few words: name and address, for logs and ``last_error``."""
        ...

    def describe(self, destination: DestinationSettings) -> tuple[str, str]:
        """(protocol, peer) as the conformance statement lists them."""
        ...

    def check(self, target: Target) -> None:
        """Load what sending will need (secrets, TLS files), so that a problem shows at start-up.

        Raises:
            ConfigError: something the destination names cannot be used (the message names the key).
        """
        ...

    def send(self, target: Target, items: Sequence[Item], options: SendOptions) -> dict[int, Outcome]:
        """Send ``items`` in one exchange (association, request); one outcome per delivery id, never raising
        for what the peer or the network does."""
        ...
