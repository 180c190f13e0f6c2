"""A population member's segment as the study keeps it (hpo.search.pbt decides them): its place in
the member's lineage, read by the trial lifecycle (which checkpoint a segment starts from, where it
ends) and by what shows a study (lineage, the parameters' schedule, `hpo export`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from optuna.trial import FrozenTrial

from hpo.storage.keys import PBT_ATTR


@dataclass(frozen=True)
class Segment:
    """One segment of a member: epochs [start, end), continuing `parent` (a completed trial) from
    the checkpoint kept under trial number `checkpoint` (the parent's first attempt)."""

    member: int
    generation: int
    start: int
    end: int
    action: str  # start, continue, exploit (from a top member), replace (a failed segment's)
    parent: int | None = None
    checkpoint: int | None = None
    donor: int | None = None  # the member whose checkpoint an exploit copies

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def of(trial: FrozenTrial) -> Segment | None:
        return Segment.from_attrs(trial.system_attrs)

    @staticmethod
    def from_attrs(system_attrs: Mapping[str, Any]) -> Segment | None:
        raw = system_attrs.get(PBT_ATTR)
        if not isinstance(raw, Mapping):
            return None
        try:
            return Segment(**{k: raw[k] for k in Segment.__dataclass_fields__})
        except (KeyError, TypeError):
            return None

    def user_attrs(self) -> dict[str, Any]:
        """What Optuna's tools and the dashboard show of the lineage."""
        out: dict[str, Any] = {"pbt_member": self.member, "pbt_generation": self.generation,
                               "pbt_action": self.action, "pbt_epochs": [self.start, self.end]}
        if self.parent is not None:
            out["pbt_parent"] = self.parent
        if self.donor is not None:
            out["pbt_donor"] = self.donor
        return out


def lineage(trials: Sequence[FrozenTrial], number: int) -> list[FrozenTrial]:
    """The completed segments a trial's model went through, first to last, ending with it."""
    by_number = {t.number: t for t in trials}
    chain: list[FrozenTrial] = []
    t = by_number.get(number)
    while t is not None and len(chain) < len(trials):
        chain.append(t)
        seg = Segment.of(t)
        t = by_number.get(seg.parent) if seg is not None and seg.parent is not None else None
    return chain[::-1]


def schedule(trials: Sequence[FrozenTrial], number: int) -> list[dict[str, Any]]:
    """A trial's parameters over its epochs: one entry per segment of its lineage, as `hpo export`
    carries it and a fixed schedule replays it."""
    out = []
    for t in lineage(trials, number):
        seg = Segment.of(t)
        if seg is not None:
            out.append({"epochs": [seg.start, seg.end], "trial": t.number, "member": seg.member,
                        "action": seg.action, "params": dict(t.params)})
    return out
