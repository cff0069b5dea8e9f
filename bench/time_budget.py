"""Timed cases under one time budget: what each gave, the deadline a part must end by, and a
guess whether the next case still fits, so a benchmark on a lent machine ends on time."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Result:
    case: str
    status: str  # INFO, FAIL (the case raised) or SKIP (time budget); FAIL sets the exit status
    detail: str


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)

    def add(self, case: str, status: str, detail: str) -> None:
        self.results.append(Result(case, status, detail))
        print(f"  [{status}] {case}: {detail}", flush=True)

    @property
    def failed(self) -> bool:
        return any(r.status == "FAIL" for r in self.results)

    def table(self) -> str:
        width = max([4, *(len(r.case) for r in self.results)])
        lines = [f"{'case'.ljust(width)}  status  detail", f"{'-' * width}  ------  ------"]
        lines += [f"{r.case.ljust(width)}  {r.status.ljust(6)}  {r.detail}" for r in self.results]
        return "\n".join(lines)


@dataclass
class Deadline:
    """An absolute point in time (time.monotonic) a part must finish by."""

    at: float

    def left(self) -> float:
        return self.at - time.monotonic()


class Pace:
    """Guesses how long the next case takes from the last one, scaled by its size (batch)."""

    def __init__(self) -> None:
        self.last: tuple[int, float] | None = None

    def estimate(self, size: int) -> float:
        if self.last is None:
            return 0.0
        last_size, secs = self.last
        return secs * max(1.0, size / max(1, last_size))

    def fits(self, deadline: Deadline, size: int) -> bool:
        return deadline.left() > self.estimate(size)

    def record(self, size: int, since: float) -> None:
        """The case of this size started at time.monotonic() `since` and is done now."""
        self.last = (size, time.monotonic() - since)
