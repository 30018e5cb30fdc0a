"""Stop strings: end a completion at the first occurrence of any of them in the output text."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.api.errors import InvalidRequest


class StopStringMatcher:
    """Filters a stream of text deltas.

    Text that could still become the start of a stop string is held back, so a stop string split
    across deltas is never partly emitted. The stop string itself is not emitted.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            raise InvalidRequest("stop", "stop strings must not be empty")
        self._stop = tuple(dict.fromkeys(stop))
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string has matched)."""
        if self.stopped:
            return "", True
        text = self._held + delta
        # NOTE: a match can only start inside the held tail or later, since everything emitted
        # before it was checked not to be the start of a stop string.
        found = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if found:
            self.stopped = True
            self._held = ""
            return text[: min(found)], True
        keep = max((_overlap(text, s) for s in self._stop), default=0)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Release the held-back tail at the end of the stream (nothing after a match)."""
        held, self._held = self._held, ""
        return held


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    start = max(len(text) - len(stop) + 1, 0)
    while (start := text.find(stop[0], start)) >= 0:
        if stop.startswith(text[start:]):
            return len(text) - start
        start += 1
    return 0
