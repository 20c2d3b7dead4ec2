"""Errors that cross the adapter/activity boundary.

Adapters and the copy engine raise these (they never import Temporal); activities turn them
into ``ApplicationError(type=..., non_retryable=not retryable)`` so the workflow and the CLI
see one clear line with a stable type.
"""

from __future__ import annotations


class XmsError(Exception):
    """A failure with a stable type name and one clear line of text."""

    type: str = "XmsError"
    retryable: bool = False

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split())


class InvalidRequest(XmsError):
    type = "InvalidRequest"


class ConfigInvalid(XmsError):
    type = "ConfigInvalid"


class UnknownVolumeType(XmsError):
    type = "UnknownVolumeType"


class InvalidAvailabilityZone(XmsError):
    type = "InvalidAvailabilityZone"


class QuotaExceeded(XmsError):
    type = "QuotaExceeded"


class SourceUnreadable(XmsError):
    type = "SourceUnreadable"


class SourceCannotTrack(XmsError):
    type = "SourceCannotTrack"


class DuplicateMigration(XmsError):
    type = "DuplicateMigration"


class NotFound(XmsError):
    type = "NotFound"


class TransientIOError(XmsError):
    """A read or write that may succeed when tried again (connection reset, EIO from a flaky source)."""

    type = "TransientIOError"
    retryable = True


NON_RETRYABLE_TYPES = [
    cls.type
    for cls in (InvalidRequest, ConfigInvalid, UnknownVolumeType, InvalidAvailabilityZone,
                QuotaExceeded, SourceUnreadable, SourceCannotTrack, DuplicateMigration, NotFound)
]
