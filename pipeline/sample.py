"""An encoded sample: one input image as read from a shard or a file, before anything decodes it.

Shared by every reader (inference units, training streams, evaluation), so a read failure travels the
same way everywhere: no bytes, an error code (`pipeline.manifest.ERROR_CODES`) and its message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EncodedSample:
    """One input: its key, where it was read from (``<shard>.tar#<member>`` for a shard's sample), its
    encoded bytes, or the error code and message of why there are none; a table's row also carries
    the values of its kept columns (`--keep-columns`, `pipeline.tables`), error or not."""

    key: str
    url: str
    data: bytes | None
    error: str = ""
    error_detail: str = ""
    columns: dict[str, Any] | None = None

    @property
    def reason(self) -> str:
        """The error as one line: ``<code>: <message>``."""
        return f"{self.error}: {self.error_detail}"
