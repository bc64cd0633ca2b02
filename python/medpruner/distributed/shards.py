"""JSONL shards for archive-scale results: ``<stem>-<k>.jsonl`` files of at most ``rows`` lines each, so
no single file grows with the archive and finished shards can be moved or read while the job runs."""

from __future__ import annotations

import re
from pathlib import Path

from medpruner.cli.batch import append_line

__all__ = ["ShardWriter", "shard_files"]


def shard_files(folder: Path, stem: str) -> list[Path]:
    """The shards ``<stem>-<k>.jsonl`` in ``folder``, by ``k``."""
    pattern = re.compile(rf"^{re.escape(stem)}-(\d+)\.jsonl$")
    found = [(int(m.group(1)), path) for path in Path(folder).glob(f"{stem}-*.jsonl")
             if (m := pattern.match(path.name))]
    return [path for _, path in sorted(found)]


class ShardWriter:
    """Appends whole lines to the shards of ``stem`` in ``folder``: to the last one until it holds
    ``rows`` lines, then to a new one. Each line is one fsynced write on an O_APPEND descriptor (a crash
    leaves at most a cut-off last line, which the readers remove)."""

    def __init__(self, folder: Path, stem: str, rows: int) -> None:
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise ValueError(f"rows: a shard holds at least one line, got {rows!r}")
        self.folder, self.stem, self.rows = Path(folder), stem, rows
        existing = shard_files(self.folder, stem)
        self.index, self.count = 0, 0
        if existing:
            last = existing[-1]
            self.index = int(last.stem.rsplit("-", 1)[1])
            self.count = last.read_bytes().count(b"\n")

    @property
    def path(self) -> Path:
        return self.folder / f"{self.stem}-{self.index:05d}.jsonl"

    def write(self, line: str) -> Path:
        """Append ``line`` (no newline) and return the shard it went to."""
        if self.count >= self.rows:
            self.index, self.count = self.index + 1, 0
        path = self.path
        append_line(path, line)
        self.count += 1
        return path
