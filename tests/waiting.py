"""Polling helper shared by the tests that watch real processes."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(pred: Callable[[], T], timeout: float = 120, what: str = "the condition", step: float = 0.05) -> T:
    """Return ``pred()``'s first truthy value; fail the test after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
