"""Run one sweep cell from its snapshot: ``python -m proxyattention.cell CELL_DIR``.

The cell folder's ``config.yaml`` (written by the launcher when the sweep was planned) is the whole
trial config, so editing ``conf/`` mid-sweep does not change queued cells. Exit code: 0 done or pruned, 1 failed,
2 bad config, 130 interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m proxyattention.cell CELL_DIR", file=sys.stderr)
        return 2
    cell = Path(args[0])
    snapshot = cell / "config.yaml"
    if not snapshot.is_file():
        print(f"error: {snapshot} does not exist; a cell folder needs its config.yaml snapshot",
              file=sys.stderr)
        return 2
    from proxyattention.train import run_trial  # torch is imported only now

    return run_trial(OmegaConf.load(snapshot), cell)


if __name__ == "__main__":
    sys.exit(main())
