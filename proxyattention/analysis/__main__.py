"""``python -m proxyattention.analysis SWEEP_DIR [report.KEY=VALUE ...]``: the sweep report."""

import sys

from proxyattention.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
