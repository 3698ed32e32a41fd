"""Progress of long steps (decoding an image folder, the modularizing pass): a tqdm bar when stderr
is a terminal, otherwise one line on stdout every ``MWT_RAY_PROGRESS_EVERY_S`` seconds (default 10),
which is what a log file or a Ray worker's forwarded output wants."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

__all__ = ["progress"]

T = TypeVar("T")


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("MWT_RAY_PROGRESS_EVERY_S", "10")))
    except ValueError:
        return 10.0


def progress(items: Iterable[T], total: int, what: str, *, count: Callable[[T], int] = lambda item: 1,
             unit: str = "images") -> Iterator[T]:
    """Yield ``items`` unchanged while showing how many of ``total`` units (``count(item)`` each) are done."""
    stream = sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm

        with tqdm(total=total, desc=what, unit=f" {unit}", file=stream, leave=False, dynamic_ncols=True) as bar:
            for item in items:
                yield item
                bar.update(count(item))
        return
    every = _interval()
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += count(item)
        now = time.monotonic()
        if now - last >= every and done < total:
            last = now
            rate = done / max(now - start, 1e-9)
            left = (total - done) / rate if rate > 0 else float("nan")
            sys.stdout.write(f"{what}: {done}/{total} {unit} ({done / max(total, 1):.0%}, "
                             f"{rate:.0f} {unit}/s, about {left:.0f} s left)\n")
            sys.stdout.flush()
