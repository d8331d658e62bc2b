"""`regsweep report`: pull runs back from MLflow and answer "which regularisation, and is the difference real?"

A pipeline of plain functions, one file per part:

    fetch.py    the only code that reads MLflow: runs into pandas, the metric histories the figures need
    stats.py    grouping runs into configurations, mean and 95% CI, paired or Welch t-tests, verdicts,
                the Pareto front, flips: DataFrames in, DataFrames out
    figures.py  the eight figures (matplotlib)
    tables.py   the tables as CSV, Markdown, plain text and JSON
    command.py  fetch -> analyse -> draw -> write -> log, as the CLI runs it
"""

from .command import analyse, draw, make_report, write
from .fetch import ReportError, Selection, fetch_predictions, fetch_runs

__all__ = ["ReportError", "Selection", "analyse", "draw", "fetch_predictions", "fetch_runs", "make_report", "write"]
