"""Plot the curves of one or more runs from their metrics.jsonl.

    python -m pretrain.plot RUN_DIR [RUN_DIR ...] [--metric loss ...] [--smooth 0.9] --output FILE.png

One panel per metric (default: loss, lr, grad_norm, tokens_per_s, and every downstream task
metric a run logged, `downstream/<task>/<metric>`), one colour per run, labelled by its
directory. Noisy curves are drawn faint as logged and solid smoothed (an exponential moving
average with TensorBoard's debiasing, `--smooth`); the learning rate, a schedule, as it is; the
loss panel adds the evaluation loss as a dashed line with markers, which needs no smoothing
(each point is a whole held-out set), and the downstream scores are drawn so too.
The file's suffix picks the format (png, svg, pdf).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from pretrain.errors import RunError
from pretrain.metrics import read_records

DEFAULT_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s")
EXACT = {"lr"}  # schedules, not measurements: drawn as logged
TITLES = {"loss": "loss (eval dashed)", "lr": "learning rate", "grad_norm": "gradient norm", "tokens_per_s": "tokens/s"}
DOWNSTREAM = "downstream/"  # pretrain.evaluation's metrics: one point per evaluation


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (each with a metrics.jsonl)")
    parser.add_argument(
        "--metric", action="append", dest="metrics",
        help=f"a panel's metric, repeatable (default: {' '.join(DEFAULT_METRICS)} and the downstream metrics logged)",
    )
    parser.add_argument("--smooth", type=float, default=0.9, help="EMA weight of the past, in [0, 1); 0 draws the curves as logged")
    parser.add_argument("--output", required=True, type=Path, help="the image to write (.png, .svg, .pdf)")
    return parser.parse_args(argv)


def smoothed(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased as TensorBoard does (early points are not pulled to 0)."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def curve(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """The steps that logged `key` with a number (a diverged step's null is left out)."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [s for s, _ in points], [v for _, v in points]


def load_runs(runs: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Each run's records, under a label: its directory's name, or its path when names repeat."""
    names = [run.name for run in runs]
    loaded = {}
    for run, name in zip(runs, names):
        path = run / "metrics.jsonl"
        if not path.is_file():
            raise RunError(f"{run} has no metrics.jsonl (is it a run directory?)")
        loaded[name if names.count(name) == 1 else str(run)] = read_records(path)
    return loaded


def draw(runs: dict[str, list[dict[str, Any]]], metrics: list[str], weight: float) -> Figure:
    figure = Figure(figsize=(6.4 * min(len(metrics), 2), 4.0 * ((len(metrics) + 1) // 2)), layout="constrained")
    axes = figure.subplots((len(metrics) + 1) // 2, min(len(metrics), 2), squeeze=False).flatten()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, metric in zip(axes, metrics):
        for (label, records), colour in zip(runs.items(), colours):
            steps, values = curve(records, metric)
            if values and metric in EXACT:
                ax.plot(steps, values, color=colour, linewidth=1.6, label=label)
            elif values and metric.startswith(DOWNSTREAM):
                ax.plot(steps, values, color=colour, linestyle="--", marker="o", markersize=3, linewidth=1.2, label=label)
            elif values:
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
                ax.plot(steps, smoothed(values, weight), color=colour, linewidth=1.6, label=label)
            if metric == "loss":
                steps, values = curve(records, "eval_loss")
                ax.plot(steps, values, color=colour, linestyle="--", marker="o", markersize=3, linewidth=1.2)
        ax.set_title(TITLES.get(metric, metric.removeprefix(DOWNSTREAM).replace("/", " ")))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    return figure


def downstream_metrics(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The downstream metrics any run logged, sorted."""
    return sorted({key for records in runs.values() for record in records for key in record if key.startswith(DOWNSTREAM)})


def plot(runs: list[Path], metrics: list[str] | None, weight: float, output: Path) -> None:
    if not 0 <= weight < 1:
        raise RunError(f"--smooth must be in [0, 1) (got {weight})")
    loaded = load_runs(runs)
    metrics = metrics or [*DEFAULT_METRICS, *downstream_metrics(loaded)]
    for metric in metrics:
        if not any(curve(records, metric)[1] for records in loaded.values()):
            raise RunError(f"--metric {metric}: no run logged it (e.g. {', '.join(DEFAULT_METRICS)})")
    figure = draw(loaded, metrics, weight)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(output, dpi=120)
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot write {output}: {getattr(exc, 'strerror', None) or exc}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plot(args.runs, args.metrics, args.smooth, args.output)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
