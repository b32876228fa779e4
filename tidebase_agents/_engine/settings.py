"""What the engine needs to know of its configuration, handed in by the facade."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Lease, retry and size settings of one ``Tidebase``."""

    #: Length of an executor's lease on its run (seconds).
    lease_seconds: float = 30.0
    #: First in-process retry delay of a failing step (seconds); doubles per retry.
    retry_backoff: float = 0.2
    #: Largest checkpoint payload (step output, state, pipeline input and result), as JSON.
    max_payload_bytes: int = 16 * 1024 * 1024
    #: How often the heartbeat renews the lease (seconds); None: a third of the lease.
    heartbeat_seconds: float | None = None

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_seconds or self.lease_seconds / 3
