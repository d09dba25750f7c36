"""What a sweep folder says: its cells as one table, paired proxy − baseline statistics, the report.

:mod:`~proxyattention.analysis.table` reads the folder, :mod:`~proxyattention.analysis.stats` pairs
proxy cells with their same-seed baselines, :mod:`~proxyattention.analysis.figures` and
:mod:`~proxyattention.analysis.maps` draw, and :mod:`~proxyattention.analysis.report` writes the report
(``python -m proxyattention.report SWEEP_DIR``). Importing this package imports neither torch nor
matplotlib.
"""

from proxyattention.analysis.stats import (
                                           Interval,
                                           baseline_summary,
                                           grouped_paired,
                                           mean_interval,
                                           notes_for,
                                           paired_differences,
                                           paired_summary,
                                           t_cdf,
                                           t_quantile,
)
from proxyattention.analysis.table import (
                                           EXPLAIN_METRICS,
                                           METRIC_DIRECTIONS,
                                           MIN_SEEDS,
                                           PROXY_PARAMS,
                                           ResultsError,
                                           check_tensorboard,
                                           config_labels,
                                           ids_for,
                                           load_results,
                                           read_scalars,
                                           results_csv_frame,
                                           varying_keys,
)

__all__ = [
    "EXPLAIN_METRICS", "METRIC_DIRECTIONS", "MIN_SEEDS", "PROXY_PARAMS", "Interval", "ResultsError",
    "baseline_summary", "check_tensorboard", "config_labels", "grouped_paired", "ids_for", "load_results",
    "mean_interval", "notes_for", "paired_differences", "paired_summary", "read_scalars",
    "results_csv_frame", "t_cdf", "t_quantile", "varying_keys",
]
