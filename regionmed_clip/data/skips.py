"""What training skipped, and why: per-reason counts with example row ids, that add up across
DataLoader workers (each batch carries its own report), ranks (summed at logging steps) and resumes
(saved in every checkpoint)."""

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EXAMPLES_PER_REASON", "SkipLedger", "TooManySkipsError"]

EXAMPLES_PER_REASON = 3


class TooManySkipsError(RuntimeError):
    exit_code = 3  # the console scripts' exit code for a run stopped by its data (regionmed_clip.cli)


@dataclass
class SkipLedger:
    """Rows seen and skipped, regions skipped, and per reason a count and the first example row ids.

    Reasons are keyed `"row: ..."` or `"region: ..."`."""

    rows_seen: int = 0
    rows_skipped: int = 0
    regions_skipped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip_row(self, reason: str, row_id: Any) -> None:
        self.rows_skipped += 1
        self._note(f"row: {reason}", row_id)

    def skip_region(self, reason: str, row_id: Any) -> None:
        self.regions_skipped += 1
        self._note(f"region: {reason}", row_id)

    def _note(self, key: str, row_id: Any) -> None:
        self.reasons[key] += 1
        examples = self.examples.setdefault(key, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(str(row_id))

    def merge(self, other: "SkipLedger | Mapping[str, Any]") -> None:
        """Add another ledger (or its `to_dict()`) into this one."""
        other = other if isinstance(other, SkipLedger) else SkipLedger.from_dict(other)
        self.rows_seen += other.rows_seen
        self.rows_skipped += other.rows_skipped
        self.regions_skipped += other.regions_skipped
        self.reasons.update(other.reasons)
        for key, ids in other.examples.items():
            kept = self.examples.setdefault(key, [])
            kept.extend(ids[: EXAMPLES_PER_REASON - len(kept)])

    @property
    def rows_used(self) -> int:
        return self.rows_seen - self.rows_skipped

    @property
    def skipped_fraction(self) -> float:
        return self.rows_skipped / self.rows_seen if self.rows_seen else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"rows_seen": self.rows_seen, "rows_used": self.rows_used, "rows_skipped": self.rows_skipped,
                "regions_skipped": self.regions_skipped, "reasons": dict(self.reasons.most_common()),
                "examples": {key: list(ids) for key, ids in self.examples.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SkipLedger":
        return cls(rows_seen=int(data.get("rows_seen", 0)), rows_skipped=int(data.get("rows_skipped", 0)),
                   regions_skipped=int(data.get("regions_skipped", 0)), reasons=Counter(data.get("reasons") or {}),
                   examples={key: list(ids) for key, ids in (data.get("examples") or {}).items()})

    def summary(self) -> str:
        """One line per reason, with example row ids."""
        head = (f"skipped {self.rows_skipped} of {self.rows_seen} rows ({100 * self.skipped_fraction:.1f}%) "
                f"and {self.regions_skipped} regions")
        lines = [f"  {count} x {reason} (e.g. rows {', '.join(self.examples.get(reason, []))})"
                 for reason, count in self.reasons.most_common()]
        return "\n".join([head, *lines])

    def check(self, max_fraction: float, min_rows: int = 0) -> None:
        """Raise TooManySkipsError when more than `max_fraction` of the rows seen (at least `min_rows`) were skipped."""
        if self.rows_seen >= max(min_rows, 1) and self.skipped_fraction > max_fraction:
            raise TooManySkipsError(f"{self.summary()}\nmore than --max-skip-fraction={max_fraction} of the rows "
                                    "were skipped: fix the data (or raise the threshold)")
