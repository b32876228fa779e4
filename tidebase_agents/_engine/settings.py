"""What the engine needs to know of its configuration, handed in by the facade."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Lease, retry and size settings of one ``Tidebase``."""

    #: Length of an executor's lease on its run (seconds); renewed every third of it.
    lease_seconds: float = 30.0
    #: First in-process retry delay of a failing step (seconds); doubles per retry.
    retry_backoff: float = 0.2
    #: Largest checkpoint payload (step output, state, pipeline input and result), as JSON.
    max_payload_bytes: int = 16 * 1024 * 1024

    @property
    def heartbeat_interval(self) -> float:
        return self.lease_seconds / 3
