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


class ChangeTrackingLost(SourceUnreadable):
    """A warm source's dirty bitmap is gone or inconsistent (removed, or left in-use by a writer
    that crashed): the changes since the last sync cannot be known, so retrying cannot help."""

    type = "ChangeTrackingLost"


class TargetOutOfSpace(XmsError):
    """The target's backend has no space left (ENOSPC/EDQUOT): permanent until someone frees space."""

    type = "TargetOutOfSpace"


class LaunchFailed(XmsError):
    """The cloud could not start the target server (it went to ERROR: Nova's fault message). The
    volumes hold the finished migration and are kept; the failed server is deleted."""

    type = "LaunchFailed"


class TransientIOError(XmsError):
    """A read or write that may succeed when tried again (connection reset, EIO from a flaky source)."""

    type = "TransientIOError"
    retryable = True


class SourceUnreachable(TransientIOError):
    """An NBD source that answered at admission cannot be connected to now (its server is down or
    restarting): retried with backoff, so a server that comes back is resumed where it stopped."""

    type = "SourceUnreachable"


NON_RETRYABLE_TYPES = [
    cls.type
    for cls in (InvalidRequest, ConfigInvalid, UnknownVolumeType, InvalidAvailabilityZone,
                QuotaExceeded, SourceUnreadable, SourceCannotTrack, DuplicateMigration, NotFound,
                ChangeTrackingLost, TargetOutOfSpace, LaunchFailed)
]
