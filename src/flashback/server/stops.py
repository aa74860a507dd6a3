"""Stop strings, matched as the text streams: what may be sent now, and where the text ends."""

from __future__ import annotations


class StopFilter:
    """Cuts the text at the first stop string, holding back any tail that could begin one.

    Each stop string keeps the length of its longest prefix that the text ends with, updated per
    character with a KMP failure table: linear in the text, whatever the stop strings look like.
    Without the hold-back a stop string split across two tokens would be half sent already.
    """

    def __init__(self, stop: str | list[str] | None):
        self.stops = [s for s in ([stop] if isinstance(stop, str) else (stop or [])) if s]
        self.fail = [self._failure(s) for s in self.stops]
        self.matched = [0] * len(self.stops)
        self.text = ""
        self.sent = 0
        self.stopped = False

    @staticmethod
    def _failure(s: str) -> list[int]:
        fail, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = fail[k - 1]
            if s[i] == s[k]:
                k += 1
            fail[i] = k
        return fail

    def push(self, piece: str) -> str:
        """Add a piece; return what may be sent now. Sets `stopped` once a stop string appears."""
        if self.stopped:
            return ""
        for ch in piece:
            self.text += ch
            found = 0  # the longest stop string ending here starts first
            for j, s in enumerate(self.stops):
                k = self.matched[j]
                while k and ch != s[k]:
                    k = self.fail[j][k - 1]
                k += ch == s[k]
                if k == len(s):
                    found, k = max(found, k), self.fail[j][k - 1]
                self.matched[j] = k
            if found:
                self.stopped = True
                return self._send_to(len(self.text) - found)
        return self._send_to(len(self.text) - max(self.matched, default=0))

    def flush(self) -> str:
        return "" if self.stopped else self._send_to(len(self.text))

    def _send_to(self, end: int) -> str:
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out
