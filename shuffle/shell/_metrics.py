"""The shuffle's Ray metrics (``ray.util.metrics``): what docs/operations.md lists.

Ray exports them from every process through the node's metrics agent, so they appear
on Ray's Prometheus endpoint (as ``ray_<name>``, counters with a ``_total`` suffix)
and its dashboard without anything else to deploy. Nothing here runs per piece or per
message: a shuffle actor reads its plain counters (``shuffle._usage``) about once a
second and pushes what grew (``ActorMetrics.push``), and once more when a run closes.

Tags are bounded: ``node`` (Ray node id), ``actor`` (the shuffle actor's name, one per
slot and re-creation) and, for refusals, ``reason`` (``REFUSAL_REASONS``). Never a
shuffle id or a run id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ray.util.metrics import Counter, Gauge, Histogram

from shuffle._usage import ParticipantCounters

__all__ = ["METRICS_INTERVAL", "ActorMetrics", "ActorSample", "count_restart"]

#: Seconds between two pushes of an actor's counters (Ray exports every few seconds).
METRICS_INTERVAL = 1.0
_PREFIX = "oob_shuffle_"
_TAGS = ("node", "actor")
#: Run durations, in seconds, from seconds to half an hour.
_RUN_SECONDS_BOUNDARIES = [0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0]

# ParticipantCounters field -> (metric name, description)
_COUNTERS = {
    "bytes_received": ("received_bytes", "Payload bytes of pieces stored by a shuffle actor."),
    "pieces_received": ("received_pieces", "Pieces (shards) stored by a shuffle actor."),
    "messages_received": ("received_messages", "Messages accepted by a shuffle actor."),
    "bytes_spilled": ("spilled_bytes", "Bytes a shuffle actor spilled to disk."),
    "bytes_read_back": ("read_back_bytes", "Spilled bytes a shuffle actor read back."),
    "runs_opened": ("runs_opened", "Shuffle runs started on a shuffle actor."),
}


@dataclass(frozen=True, kw_only=True)
class ActorSample:
    """What one shuffle actor reports in one push."""

    counters: ParticipantCounters
    refused: Mapping[str, int]  # cumulative, by reason (shuffle._usage.REFUSAL_REASONS)
    runs_active: int
    memory_bytes: int
    disk_bytes: int


class ActorMetrics:
    """The metrics of one shuffle actor; ``push`` exports what changed since the last."""

    def __init__(self, *, node: str, actor: str) -> None:
        self._tags = {"node": node, "actor": actor}
        self._counters = {
            field: Counter(_PREFIX + name, description=doc, tag_keys=_TAGS)
            for field, (name, doc) in _COUNTERS.items()
        }
        self._refused = Counter(
            _PREFIX + "refused",
            description="Messages and connections a shuffle actor refused, by reason.",
            tag_keys=(*_TAGS, "reason"),
        )
        self._runs_active = Gauge(
            _PREFIX + "runs_active", description="Open shuffle runs.", tag_keys=_TAGS
        )
        self._memory = Gauge(
            _PREFIX + "memory_bytes",
            description="Bytes of received pieces held in memory.",
            tag_keys=_TAGS,
        )
        self._disk = Gauge(
            _PREFIX + "disk_bytes",
            description="Bytes of received pieces spilled to disk.",
            tag_keys=_TAGS,
        )
        self._run_seconds = Histogram(
            _PREFIX + "run_seconds",
            description="Lifetime of a shuffle run on an actor, from start to close.",
            boundaries=_RUN_SECONDS_BOUNDARIES,
            tag_keys=_TAGS,
        )
        self._last = ParticipantCounters()
        self._last_refused: dict[str, int] = {}

    def push(self, sample: ActorSample) -> None:
        """Export ``sample``: counters grow by their deltas, gauges take its values."""
        for field, grown in sample.counters.deltas(self._last).items():
            self._counters[field].inc(grown, tags=self._tags)
        self._last = sample.counters
        for reason, count in sample.refused.items():
            grown = count - self._last_refused.get(reason, 0)
            if grown:
                self._refused.inc(grown, tags={**self._tags, "reason": reason})
        self._last_refused = dict(sample.refused)
        self._runs_active.set(sample.runs_active, tags=self._tags)
        self._memory.set(sample.memory_bytes, tags=self._tags)
        self._disk.set(sample.disk_bytes, tags=self._tags)

    def run_closed(self, seconds: float) -> None:
        """Record the lifetime of a run that closed on this actor."""
        self._run_seconds.observe(seconds, tags=self._tags)


def count_restart(*, node: str) -> None:
    """Count one shuffle restart (a run replaced after a shuffle actor died), on the
    driver's ``node``."""
    Counter(
        _PREFIX + "restarts",
        description="Shuffle runs restarted because a shuffle actor died mid-run.",
        tag_keys=("node",),
    ).inc(1, tags={"node": node})
