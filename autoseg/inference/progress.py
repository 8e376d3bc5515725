"""A per-tile progress bar inside one case: a CPU case can take minutes of sliding window with no other sign of
life. The sliding window reports ``(done, total)`` tiles of one pass; a case makes one pass per fold (and per
configuration), so the bar adds the passes up, estimating the ones not started from the current one."""

from __future__ import annotations

from tqdm import tqdm


class TileProgress:
    """``tqdm`` bar over the tiles of ``passes`` sliding-window passes of one case; use ``update`` as the
    sliding window's ``progress`` callback."""

    def __init__(self, case_id: str, passes: int):
        self.case_id, self.passes = case_id, passes
        self.started, self.finished_tiles = 0, 0
        self.bar: tqdm | None = None

    def update(self, done: int, total: int) -> None:
        """Callback: ``done`` of ``total`` tiles of the current pass."""
        if self.bar is None:
            self.bar = tqdm(total=0, desc=f"{self.case_id} tiles", unit="tile", leave=False)
        if done <= total and self.bar.n <= self.finished_tiles:  # first report of a new pass
            self.started += 1
            self.bar.total = self.finished_tiles + total * (self.passes - self.started + 1)
        self.bar.n = self.finished_tiles + done
        self.bar.refresh()
        if done == total:
            self.finished_tiles += total

    def __enter__(self) -> "TileProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
