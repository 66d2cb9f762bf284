"""Exceptions raised by attnlib."""
from __future__ import annotations


class BackendUnavailableError(RuntimeError):
    """No backend (or not the requested one) can serve a call; ``reasons`` holds the sentences why.

    ``reasons`` maps a backend name to the list of sentences its ``why_not`` returned.
    """

    def __init__(self, message: str, reasons: dict[str, list[str]] | None = None):
        self.reasons = dict(reasons or {})
        if self.reasons:
            lines = [message]
            for name, why in self.reasons.items():
                lines.append(f"  {name}: " + "; ".join(why))
            message = "\n".join(lines)
        super().__init__(message)
