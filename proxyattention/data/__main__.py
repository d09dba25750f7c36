"""``python -m proxyattention.data prepare|verify`` (see :mod:`proxyattention.data.cli`)."""

from proxyattention.data.cli import main

raise SystemExit(main())
