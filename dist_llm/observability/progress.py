"""Progress bar that only draws where someone is watching.

Under Slurm or Ray, stderr is a log file; a tqdm bar there writes a carriage-return line per
refresh and buries the real log. ``auto`` therefore draws only on a TTY; callers use the same
``update``/``set_postfix``/``close`` calls either way.
"""
from __future__ import annotations

import sys
from typing import Any

from dist_llm.config.choices import ProgressBar

PROGRESS_MODES = ProgressBar.values()


class NullProgress:
    """The no-op stand-in for a tqdm bar."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_progress(total: int, initial: int, enabled: str) -> Any:
    """A tqdm bar when ``enabled == "on"`` or (``"auto"`` and stderr is a TTY), else NullProgress.

    ``initial`` lets a resumed run start the bar at its resume step instead of 0.
    """
    if enabled not in PROGRESS_MODES:
        raise ValueError(f"train.ui.progress_bar={enabled!r} is not one of {', '.join(PROGRESS_MODES)}")
    isatty = getattr(sys.stderr, "isatty", None)
    if enabled == "on" or (enabled == "auto" and callable(isatty) and isatty()):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr)
    return NullProgress()
