"""``python -m proxyattention.report SWEEP_DIR [report.KEY=VALUE ...]``.

The command of :mod:`proxyattention.analysis.report`.
"""

import sys

from proxyattention.analysis.report import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
