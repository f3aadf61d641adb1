"""Plans: what a pass did (or will do) to every layer, and why. Printable as a table, exportable as dicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal, Sequence

__all__ = ["LayerPlan", "Plan", "render_table"]

Action = Literal["wrap", "skip", "unsupported", "fold"]


@dataclass(frozen=True)
class LayerPlan:
    """One layer's line in a plan. ``detail`` says what it got, or why not; ``source`` which rule decided."""

    name: str
    layer_type: str
    action: Action
    detail: str = ""
    source: str = ""


def render_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain fixed-width table (no third-party dependency)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


@dataclass
class Plan:
    """The per-layer outcome of a pass, with the capture report and warnings."""

    title: str
    layers: list[LayerPlan] = field(default_factory=list)
    capture: str = ""
    warnings: list[str] = field(default_factory=list)

    def wrapped(self) -> list[str]:
        return [lp.name for lp in self.layers if lp.action in ("wrap", "fold")]

    def skipped(self) -> dict[str, str]:
        return {lp.name: lp.detail for lp in self.layers if lp.action in ("skip", "unsupported")}

    def __getitem__(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(f"no layer {name!r} in the plan; layers: {', '.join(lp.name for lp in self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "capture": self.capture, "warnings": list(self.warnings),
                "layers": [asdict(lp) for lp in self.layers]}

    def __str__(self) -> str:
        n_wrap = len(self.wrapped())
        head = f"{self.title}: {n_wrap} of {len(self.layers)} layers"
        parts = [head]
        if self.capture:
            parts.append(self.capture)
        parts.append(render_table(["layer", "type", "action", "detail", "decided by"],
                                  [(lp.name, lp.layer_type, lp.action, lp.detail, lp.source) for lp in self.layers]))
        parts += [f"warning: {w}" for w in self.warnings]
        return "\n".join(parts)

    def __repr__(self) -> str:
        return f"Plan({self.title!r}, wrapped={len(self.wrapped())}, skipped={len(self.skipped())})"
