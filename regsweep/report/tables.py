"""The report's tables as text: raw numbers for CSV and JSON, percentages with spreads for people.

CSV and JSON keep fractions and full precision (they are for further analysis); the Markdown and plain-text
tables show accuracies in percent, `mean ± sd` and `[low, high]` 95% intervals, differences in points.
"""

from __future__ import annotations

import json
import math

import pandas as pd


def pct(x: float, digits: int = 2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def num(x: float, digits: int = 3, zeros: bool = False) -> str:
    """`digits` significant digits; `zeros` keeps trailing ones, so that a column's numbers line up (1.50, 1.66)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:{'#' if zeros else ''}.{digits}g}".rstrip(".")


def mean_sd(mean: float, sd: float) -> str:
    return pct(mean) + (f" ± {pct(sd)}" if not math.isnan(sd) else "")


def interval(low: float, high: float, scale: float = 100, digits: int = 2) -> str:
    if math.isnan(low) or math.isnan(high):
        return ""
    return f"[{scale * low:.{digits}f}, {scale * high:.{digits}f}]"


def at_epoch(value: float, epoch: float) -> str:
    return f"{pct(value)} @ {epoch:.3g}" if not math.isnan(value) else ""


def configurations_for_people(table: pd.DataFrame) -> pd.DataFrame:
    """The configuration table as people read it; the notebooks' summary columns say that they are."""
    rows = []
    for r in table.to_dict("records"):
        rows.append({
            "configuration": r["configuration"],
            "n": r["n"],
            "best val acc (%)": mean_sd(r["best_val_acc_mean"], r["best_val_acc_sd"]),
            "95% CI": interval(r["best_val_acc_ci_low"], r["best_val_acc_ci_high"]),
            "at epoch": num(r["best_val_epoch"]),
            "test acc at best val (%)": mean_sd(r["test_acc_at_best_val_mean"], r["test_acc_at_best_val_sd"]),
            "95% CI ": interval(r["test_acc_at_best_val_ci_low"], r["test_acc_at_best_val_ci_high"]),
            "notebooks: max test acc (%) @ epoch": at_epoch(r["best_test_acc"], r["best_test_epoch"]),
            "notebooks: max train acc (%) @ epoch": at_epoch(r.get("max_train_acc", math.nan),
                                                             r.get("max_train_epoch", math.nan)),
            "final loss train / val / test": " / ".join(
                num(r[k], zeros=True) for k in ("final_train_loss", "final_val_loss", "final_test_loss")),
            "params": f"{r['n_params']:,.0f}" if not math.isnan(r["n_params"]) else "",
            "s / epoch": num(r["epoch_seconds"], zeros=True),
            "|w| < 1e-3 (%)": pct(r.get("all/frac_small", math.nan), 1),
            "seeds lost to divergence": r.get("diverged", 0),
            "seeds pruned": r.get("pruned", 0),
            "seeds on one stack's batches": "yes" if r.get("shared_batches", False) else "",
        })
    people = pd.DataFrame(rows)
    # Shown where some configuration lost seeds that way (its n and mean are then of the seeds that trained), or
    # had seeds that shared their batches (stats.shared_batches).
    for column in ("seeds lost to divergence", "seeds pruned", "seeds on one stack's batches"):
        if column in people and not people[column].astype(bool).any():
            people = people.drop(columns=column)
    return people


def verdicts_for_people(verdicts: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in verdicts.to_dict("records"):
        rows.append({
            "configuration": r["configuration"],
            "baseline": r["baseline"],
            # The verdict's n; the validation comparison's where it differs (a run without a test accuracy)
            "n / n baseline": f"{r['n']} / {r['n_baseline']}" + (
                "" if (r["val_n"], r["val_n_baseline"]) == (r["n"], r["n_baseline"])
                else f" (val {r['val_n']} / {r['val_n_baseline']})"),
            "Δ test acc at best val (points)": f"{100 * r['test_diff']:+.2f}",
            "95% CI": interval(r["test_ci_low"], r["test_ci_high"]),
            "p": num(r["test_p"], 2),
            "p adjusted": num(r["test_p_adjusted"], 2),
            "verdict": r["test_verdict"],
            "Δ best val acc (points)": f"{100 * r['val_diff']:+.2f}",
            "95% CI ": interval(r["val_ci_low"], r["val_ci_high"]),
            "p ": num(r["val_p"], 2),
            "p adjusted ": num(r["val_p_adjusted"], 2),
            # The two comparisons use the same test unless one had no spread (stats.compare).
            "test": r["test_used"] if r["val_test_used"] == r["test_used"]
            else f"{r['test_used'] or '-'} / {r['val_test_used'] or '-'}",
        })
    columns = ["configuration", "baseline", "n / n baseline", "Δ test acc at best val (points)", "95% CI", "p",
               "p adjusted", "verdict", "Δ best val acc (points)", "95% CI ", "p ", "p adjusted ", "test"]
    return pd.DataFrame(rows, columns=columns)


def markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' to_markdown needs the tabulate package)."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c).strip() for c in df.columns) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def render(tables: dict[str, tuple[pd.DataFrame, pd.DataFrame]], fmt: str) -> str:
    """`tables`: title -> (raw, for people). What `regsweep report --format` prints."""
    if fmt == "json":
        return json.dumps({title: json.loads(raw.to_json(orient="records")) for title, (raw, _) in tables.items()},
                          indent=1)
    parts = []
    for title, (raw, people) in tables.items():
        if fmt == "csv":
            parts.append(f"# {title}\n{raw.to_csv(index=False)}")
        elif fmt == "markdown":
            parts.append(f"### {title}\n\n{markdown(people)}\n")
        else:
            parts.append(f"{title}\n{people.to_string(index=False) if len(people) else '(none)'}\n")
    return "\n".join(parts)
