"""Changed-block tracking at the source: persistent qemu dirty bitmaps, frozen once per sync.

Generations: the full sync is generation 0 and starts tracking into bitmap ``xms-1``. Sync ``g``
(g >= 1) adds ``xms-<g+1>``, disables ``xms-<g>`` and reads the regions dirty in ``xms-<g>``
as of that moment. Only after the copy succeeded is ``xms-<g>`` removed. A retried attempt of
the same generation re-reads the same frozen bitmap; if the generation was given up, the next
one merges its bitmap first, so no change is ever lost.

Trackers are synchronous (they run in activity threads) and never import Temporal.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

from activities.transport import nbd as transport
from xms.errors import ChangeTrackingLost, SourceUnreadable, TransientIOError

PREFIX = "xms-"


def bitmap_name(generation: int) -> str:
    return f"{PREFIX}{generation}"


@dataclass(frozen=True, slots=True)
class FrozenView:
    """What one sync reads: an NBD endpoint frozen at the sync's point in time."""

    location: str
    kind: Literal["nbd", "image"]
    fmt: str
    bitmap: str | None  # the dirty bitmap to read; None = full sync (read every allocated extent)
    generation: int
    freeze_id: str = ""  # changes whenever the point in time is frozen anew (a resumed copy must match)

    def connect(self, private: bool = False):
        """A handle on the view (``private``: see transport.connect). The source was readable at
        admission: a server that does not answer now is retried."""
        return transport.connect(self.location, self.kind, self.fmt, bitmap=self.bitmap, retry_unreachable=True,
                                 private=private)


class ChangeTracker(Protocol):
    def freeze(self, generation: int) -> "contextmanager[FrozenView | None]":
        """Freeze sync ``generation``'s point in time (0 = the full sync, which starts tracking).
        Yields None if that generation was already committed (a retry after success). Normal
        exit commits (removes the generation's bitmap); an exception keeps it for a retry."""
        ...

    def stop(self) -> None:
        """Remove every bitmap and node xms made on the source. Idempotent."""
        ...


# --------------------------------------------------------------------------- no tracking (cold)


class Untracked:
    """A cold source: read as it is, once."""

    def __init__(self, location: str, kind: Literal["nbd", "image"], fmt: str):
        self.location, self.kind, self.fmt = location, kind, fmt

    @contextmanager
    def freeze(self, generation: int) -> Iterator[FrozenView | None]:
        yield FrozenView(self.location, self.kind, self.fmt, None, generation)

    def stop(self) -> None:
        pass


# --------------------------------------------------------------------------- quiesced qcow2


class QuiescedImage:
    """A qcow2 image that nothing writes while a sync runs. Bitmaps are persistent in the image
    and managed with qemu-img; xms holds no lock between syncs, so the owner can write then."""

    def __init__(self, path: str):
        self.path = path

    def _img(self, *args: str) -> str:
        r = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
        if r.returncode != 0:
            msg = " ".join(r.stderr.split()) or "qemu-img failed"
            if "lock" in msg:
                raise TransientIOError(f"{self.path} is in use by a writer ({msg}); a quiesced source must be idle during a sync")
            raise SourceUnreadable(f"{self.path}: {msg}")
        return r.stdout

    def flags(self) -> dict[str, set[str]]:
        """name -> qemu's flags ("auto": enabled, "in-use": inconsistent unless a writer has the
        image open right now), for xms's bitmaps."""
        info = json.loads(self._img("info", "--output=json", "-U", self.path))
        found = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
        return {b["name"]: set(b.get("flags", [])) for b in found if b["name"].startswith(PREFIX)}

    def bitmaps(self) -> dict[str, bool]:
        """name -> enabled, for xms's bitmaps."""
        return {name: "auto" in f for name, f in self.flags().items()}

    def _inconsistent(self, flags: dict[str, set[str]], names) -> list[str]:
        """Those of ``names`` that qemu marks in-use while no process holds the image: a writer
        died with the image open, so they miss its last writes. (A writer that holds the image
        now makes the locking ``qemu-img info`` fail: TransientIOError, try again later.)"""
        bad = sorted((n for n in names if "in-use" in flags.get(n, ())), key=_gen)
        if bad:
            self._img("info", "--output=json", self.path)  # takes the image lock
        return bad

    def _bitmap(self, op: str, name: str, *extra: str) -> None:
        self._img("bitmap", op, *extra, self.path, name)

    @contextmanager
    def freeze(self, generation: int) -> Iterator[FrozenView | None]:
        flags = self.flags()
        have = {name: "auto" in f for name, f in flags.items()}
        cur, nxt = bitmap_name(generation), bitmap_name(generation + 1)
        if generation == 0:
            if nxt in have and self._inconsistent(flags, [nxt]):
                self._bitmap("--remove", nxt)  # the full sync reads everything: start tracking afresh
                del have[nxt]
            if nxt not in have:
                self._bitmap("--add", nxt, "-g", "64K")
            yield FrozenView(self.path, "image", "qcow2", None, 0)
            return
        older = sorted((b for b in have if _gen(b) < generation), key=_gen)
        if bad := self._inconsistent(flags, [cur, *older]):
            raise ChangeTrackingLost(
                f"{self.path}: dirty bitmap {', '.join(bad)} is inconsistent (a writer stopped without closing the "
                "image, so its last writes are not recorded); the changes since the last sync cannot be known; "
                "a full sync is needed")
        if cur in have and not have[cur] and nxt not in have:
            raise ChangeTrackingLost(
                f"{self.path}: dirty bitmap {nxt}, which records the changes since sync {generation} froze, was "
                "removed; the changes since then cannot be known; a full sync is needed")
        if cur not in have:
            if nxt in have:
                yield None  # committed by an earlier attempt
                return
            if not older:
                raise ChangeTrackingLost(
                    f"{self.path}: no xms dirty bitmap is left (change tracking was reset or its bitmap {cur} "
                    "removed); the changes since the last sync cannot be known; a full sync is needed"
                )
            # earlier generations never rotated (they failed before freezing): their bitmap
            # still records, and carries on as this generation's
            self._bitmap("--add", cur, "-g", "64K")
            have[cur] = True
        if nxt not in have:  # first attempt of this generation: fold in abandoned generations, rotate
            for old in older:
                self._img("bitmap", "--merge", old, self.path, cur)
                self._bitmap("--remove", old)
            self._bitmap("--add", nxt, "-g", "64K")
            self._bitmap("--disable", cur)
        yield FrozenView(self.path, "image", "qcow2", cur, generation)
        self._bitmap("--remove", cur)

    def stop(self) -> None:
        for name in self.bitmaps():
            self._bitmap("--remove", name)


def _gen(name: str) -> int:
    return int(name.removeprefix(PREFIX))


# --------------------------------------------------------------------------- NBD with a bitmap


class ExportedBitmap:
    """An NBD export whose server offers a dirty bitmap that someone else manages (--bitmap NAME).
    xms cannot rotate it, so every sync reads all changes since the bitmap began."""

    def __init__(self, uri: str, bitmap: str):
        self.uri, self.bitmap = uri, bitmap

    @contextmanager
    def freeze(self, generation: int) -> Iterator[FrozenView | None]:
        yield FrozenView(self.uri, "nbd", "raw", None if generation == 0 else self.bitmap, generation)

    def stop(self) -> None:
        pass


def can_track(source: str, kind: str, fmt: str, bitmap: str | None) -> str | None:
    """None if ``source`` can be a warm source; otherwise the reason it cannot."""
    if source.startswith("qmp"):
        return None
    if kind == "image":
        return None if fmt == "qcow2" else (
            f"{source} is a {fmt} image, which cannot hold dirty bitmaps; warm needs a qcow2 image, a live "
            "disk (qmp+unix://…) or an NBD export with --bitmap; use --mode cold")
    if not bitmap:
        return (f"{source} is an NBD export without a dirty bitmap; pass --bitmap NAME if its server exports one, "
                "or use --mode cold")
    h = transport.connect(source, "nbd", bitmap=bitmap)
    try:
        if not h.can_meta_context(transport.dirty_context(bitmap)):
            return f"{source} does not export dirty bitmap {bitmap!r}; use --mode cold"
    finally:
        transport.close(h)
    return None
