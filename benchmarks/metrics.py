"""Per-request timing records and their summary (throughput, percentiles)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What a streaming client saw of one request (times in seconds, monotonic clock)."""

    prompt_index: int
    start_s: float = 0.0
    first_token_s: float | None = None
    end_s: float | None = None
    tokens: int = 0
    # Gap before every token after the first. Tokens that arrive together in one
    # message get a 0 gap: that is what a client sees.
    gaps_s: list[float] = field(default_factory=list)
    # Time to first token as the serving worker measured it (from its arrival there);
    # client TTFT minus this is transport + routing overhead.
    server_ttft_ms: float | None = None
    server_tokens: int | None = None
    worker_id: str | None = None
    error: str | None = None
    _last_s: float = field(default=0.0, repr=False)  # arrival of the previous message

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.start_s

    @property
    def total_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.start_s

    def on_tokens(self, now: float, count: int) -> None:
        """Records ``count`` tokens arriving in one message at ``now``."""
        if count <= 0:
            return
        if self.first_token_s is None:
            self.first_token_s = now
            self.gaps_s.extend([0.0] * (count - 1))
        else:
            self.gaps_s.append(now - self._last_s)
            self.gaps_s.extend([0.0] * (count - 1))
        self._last_s = now
        self.tokens += count

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("gaps_s")
        data.pop("_last_s")
        data.update(ttft_s=self.ttft_s, total_s=self.total_s)
        return data

    @classmethod
    def from_json(cls, data: dict) -> RequestRecord:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ms_percentiles(values_s: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in PERCENTILES:
        v = percentile(values_s, q)
        out[f"p{q}"] = None if v is None else round(v * 1000.0, 3)
    out["mean"] = round(sum(values_s) / len(values_s) * 1000.0, 3) if values_s else None
    return out


def summarize(records: list[RequestRecord], expected_tokens: int | None = None) -> dict:
    """Throughput over the wall time from the first start to the last end, and TTFT /
    inter-token / end-to-end latency percentiles in milliseconds."""
    ok = [r for r in records if r.error is None and r.end_s is not None]
    errors = [r.error for r in records if r.error is not None]
    summary: dict = {
        "requests": len(records),
        "completed": len(ok),
        "errors": len(errors),
        "first_errors": errors[:3],
    }
    if not ok:
        return summary
    wall_s = max(r.end_s or 0.0 for r in ok) - min(r.start_s for r in ok)
    tokens = sum(r.tokens for r in ok)
    summary.update(
        wall_s=round(wall_s, 4),
        generated_tokens=tokens,
        tokens_per_s=round(tokens / wall_s, 2) if wall_s > 0 else None,
        requests_per_s=round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        ttft_ms=_ms_percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        itl_ms=_ms_percentiles([g for r in ok for g in r.gaps_s]),
        e2e_ms=_ms_percentiles([r.total_s for r in ok if r.total_s is not None]),
    )
    if expected_tokens is not None:
        # ignore_eos makes every request generate exactly max_new_tokens; anything else
        # means the system did not honour the workload and its figures are not comparable.
        summary["short_requests"] = sum(1 for r in ok if r.tokens != expected_tokens)
    overheads = [
        r.ttft_s * 1000.0 - r.server_ttft_ms
        for r in ok
        if r.ttft_s is not None and r.server_ttft_ms is not None
    ]
    if overheads:
        summary["client_minus_server_ttft_ms"] = {
            f"p{q}": round(percentile(overheads, q), 3)  # type: ignore[arg-type]
            for q in PERCENTILES
        }
    return summary


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident set size (VmHWM) of a live process, in MB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a live process (all its threads) has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # Fields after "(comm)": state is index 0, so utime (14th) and stime (15th) are 11, 12.
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def self_peak_rss_mb() -> float | None:
    return peak_rss_mb(os.getpid())
