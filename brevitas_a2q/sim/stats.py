"""Per-layer event counts of a simulation (overflow, swamping, underflow).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerStats:
    """Event counts of one layer, summed over every simulated forward pass."""

    name: str
    accumulator: str
    outputs: int = 0  # dot products computed
    additions: int = 0  # multiply-adds (outputs * K)
    overflow_outputs: int = 0  # outputs with at least one overflow event
    overflow_events: int = 0
    swamping_events: int = 0
    underflow_events: int = 0

    @property
    def overflow_rate(self) -> float:
        """Share of outputs with at least one overflow event."""
        return self.overflow_outputs / self.outputs if self.outputs else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["overflow_rate"] = self.overflow_rate
        d["swamping_rate"] = self.swamping_events / self.additions if self.additions else 0.0
        return d


@dataclass
class SimulationStats:
    """Per-layer :class:`LayerStats` (``layers``) and layers left unsimulated (``skipped``:
    name -> reason)."""

    layers: dict[str, LayerStats] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def reset(self) -> None:
        for name, s in self.layers.items():
            self.layers[name] = LayerStats(name, s.accumulator)

    @property
    def total_overflow_events(self) -> int:
        return sum(s.overflow_events for s in self.layers.values())

    def to_dict(self) -> dict:
        return {"layers": [s.to_dict() for s in self.layers.values()],
                "skipped": dict(self.skipped)}
