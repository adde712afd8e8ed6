"""An encoded sample: one input image as read from a shard or a file, before anything decodes it.

Shared by every reader (inference units, training streams, evaluation), so a read failure travels the
same way everywhere: no bytes, an error code (`pipeline.manifest.ERROR_CODES`) and its message.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncodedSample:
    """One input: its key, where it was read from (``<shard>.tar#<member>`` for a shard's sample), its
    encoded bytes, or the error code and message of why there are none."""

    key: str
    url: str
    data: bytes | None
    error: str = ""
    error_detail: str = ""

    @property
    def reason(self) -> str:
        """The error as one line: ``<code>: <message>``."""
        return f"{self.error}: {self.error_detail}"
