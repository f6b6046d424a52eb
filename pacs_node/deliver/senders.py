"""The one registry of destination protocols: a destination's ``type`` -> its :class:`~pacs_node.deliver.base.Sender`.

The dispatcher (:mod:`pacs_node.deliver.dispatcher`) and the conformance
statement (:mod:`pacs_node.web.conformance`) look senders up here and nowhere
else. Adding a protocol: a destination class with a new ``type`` in
:mod:`pacs_node.config.model`, a module with its sender, one entry below.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from pacs_node.deliver.base import DestinationSettings, Sender, Target
from pacs_node.deliver.dicomweb import StowSender
from pacs_node.deliver.dimse import DimseSender
from pacs_node.errors import ConfigError

#: Destination ``type`` -> the sender that serves it.
SENDERS: Mapping[str, Sender] = MappingProxyType({"dimse": DimseSender(), "dicomweb": StowSender()})


def sender_for(destination: DestinationSettings) -> Sender:
    """The sender of a destination, by its ``type``.

    Raises:
        ConfigError: no sender serves that type.
    """
    try:
        return SENDERS[destination.type]
    except KeyError:
        raise ConfigError(
            f"destination type {destination.type!r} has no sender (known: {', '.join(sorted(SENDERS))})"
        ) from None


def target_for(name: str, where: str, destination: DestinationSettings) -> Target:
    """A :class:`Target` for ``destination`` with its sender.

    Args:
        name: the destination's name (``RETURN_TO_SENDER`` for return to sender).
        where: its settings key, for messages (``destinations.<name>``).

    Raises:
        ConfigError: no sender serves the destination's type.
    """
    return Target(name, where, destination, sender_for(destination))
