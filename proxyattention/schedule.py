"""Proxy schedules: ``"5,p,9,p,9,p,9,p,4"`` — integers are training epochs, ``p`` a proxy step.

With ``proxy.p_trains=true`` each ``p`` is, as the thesis counted it, one training epoch followed by the
proxy step: ``20,p,19`` then trains 40 epochs with the step after epoch 21, and its baseline trains 40.

Pure Python (no torch) so the launcher can validate schedules before any cell starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


class ScheduleError(ValueError):
    """A schedule string that cannot be run."""


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule. ``text`` is its canonical spelling (as written, ``p`` steps included).

    ``segments`` are the epoch counts between proxy steps; a proxy step sits between two consecutive
    segments. ``proxy_after`` lists the (1-based) epoch numbers after which a proxy step runs.
    """

    text: str
    segments: tuple[int, ...]

    @property
    def epochs(self) -> int:
        return sum(self.segments)

    @property
    def proxy_after(self) -> tuple[int, ...]:
        done, out = 0, []
        for seg in self.segments[:-1]:
            done += seg
            out.append(done)
        return tuple(out)

    @property
    def has_proxy(self) -> bool:
        return len(self.segments) > 1

    @property
    def baseline(self) -> "Schedule":
        """The matching baseline: same epochs, no proxy steps."""
        return Schedule(text=str(self.epochs), segments=(self.epochs,))


def parse_schedule(text: str | int, key: str = "proxy.schedule", p_trains: bool = False) -> Schedule:
    """Parse and validate a schedule string (cached: a sweep parses the same few thousands of times).

    Rules: comma-separated tokens, each a positive integer or ``p``; it starts and ends with epochs, and
    two ``p`` never touch (a proxy step needs an epoch just before it to record misclassified images, and
    one after it to use the proxies).
    """
    return _parse(str(text), key, bool(p_trains))


@lru_cache(maxsize=4096)
def _parse(text: str, key: str, p_trains: bool) -> Schedule:
    raw = text.strip()
    hint = (f"{key}={raw!r} is not a valid schedule: write epochs and proxy steps separated by commas, "
            "e.g. '5,p,9,p,4' (integers are training epochs > 0, 'p' is a proxy step, which must sit "
            "between two epoch counts)")
    if not raw:
        raise ScheduleError(hint + "; it is empty")
    tokens = [t.strip().lower() for t in raw.split(",")]
    segments: list[int] = []
    expect_epochs = True
    for i, tok in enumerate(tokens):
        if tok == "p":
            if expect_epochs:
                where = "starts with 'p'" if i == 0 else "has two 'p' in a row"
                raise ScheduleError(f"{hint}; it {where}")
            expect_epochs = True
            continue
        try:
            n = int(tok)
        except ValueError:
            raise ScheduleError(f"{hint}; token {tok!r} is neither an integer nor 'p'") from None
        if n <= 0:
            raise ScheduleError(f"{hint}; epoch count {n} must be > 0")
        if not expect_epochs:
            # "5,3" — adjacent epoch counts merge; allowed but normalised.
            segments[-1] += n
        else:
            segments.append(n)
        expect_epochs = False
    if expect_epochs:
        raise ScheduleError(f"{hint}; it ends with 'p' (a proxy step must be followed by epochs)")
    canonical = ",p,".join(str(s) for s in segments)
    if p_trains:  # every segment followed by a `p` gains the epoch that `p` trains
        segments = [s + 1 for s in segments[:-1]] + segments[-1:]
    return Schedule(text=canonical, segments=tuple(segments))


def quote_schedule_overrides(argv: list[str]) -> list[str]:
    """``proxy.schedule=20,p,19`` → ``proxy.schedule='20,p,19'`` on a command line.

    Unquoted, Hydra reads a comma list as ambiguous (one run) or as a sweep over "20", "p" and "19"
    (multirun). A value with a ``p`` step can only be one schedule, so it is quoted for the user; to
    sweep several schedules, quote each: ``proxy.schedule="'5,p,4','20,p,19'"``. A list with a token
    that is neither an epoch count nor ``p`` (``5,q,3``) is quoted too, so the error names the whole
    schedule rather than a sweep over its pieces; a list of plain epoch counts (``2,4``) stays a sweep.
    """
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        tokens = [t.strip().lower() for t in value.split(",")]
        one_schedule = "p" in tokens or any(not tok.isdigit() for tok in tokens)
        if (eq and key.lstrip("+~") == "proxy.schedule" and "," in value and value[:1] not in "'\"["
                and one_schedule and "(" not in value):
            arg = f"{key}='{value}'"
        out.append(arg)
    return out
