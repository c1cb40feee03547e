"""Overlay the curves of several pre-training runs in one PNG.

Reads the run directories that ``python -m examples.pretrain_llama`` writes
(``metrics.csv`` and ``args.json``) and draws, against optimizer steps or
training tokens:

* the loss panel: each run's train loss (dashed) and eval loss (solid, with
  markers) in one colour per run;
* the learning-rate panel: each run's learning rate;
* light vertical lines in the run's colour where its GaLore projectors are
  refreshed: at updates ``0, T, 2T, ...`` (``T`` = ``update_proj_gap``;
  the line at step ``s`` marks the refresh inside update ``s + 1``); a
  run with ``stagger_refresh`` spreads its refreshes over each window of
  ``T`` updates, so the lines then mark the window boundaries (the legend
  says so). Runs of other optimizers get no lines.

Run from the repository root::

    python -m examples.compare runs/galore_adamw-tiny runs/adamw-tiny
    python -m examples.compare runs/a runs/b --x tokens --labels GaLore AdamW \
        --out compare.png

``pretrain_llama`` draws its own ``loss.png`` with ``plot_runs`` too.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from galore_optax import cli

X_AXES = ("steps", "tokens")
_X_LABELS = {"steps": "optimizer step", "tokens": "training tokens"}


@dataclasses.dataclass
class Run:
  """One run's curves and its projector refresh schedule.

  Attributes:
    label: the name in the legend.
    rows: the ``metrics.csv`` rows (strings; empty where a value is absent).
    tokens_per_update: tokens of one optimizer update (batch size x sequence
      length x gradient accumulation).
    refresh_steps: the updates at which projectors are refreshed (empty for
      an optimizer without GaLore projectors).
    staggered: whether the refreshes are spread over each window, so that
      ``refresh_steps`` are window boundaries.
  """
  label: str
  rows: list[dict[str, str]]
  tokens_per_update: int
  refresh_steps: list[int]
  staggered: bool = False


def tokens_per_update(args: Mapping[str, Any]) -> int:
  """Tokens of one optimizer update of a run.

  Args:
    args: the run's ``args.json`` (``batch_size``, ``seq_len``,
      ``grad_accum``).

  Returns:
    ``batch_size * seq_len * grad_accum``.
  """
  return int(args["batch_size"]) * int(args["seq_len"]) * int(
      args.get("grad_accum", 1))


def refresh_steps(args: Mapping[str, Any]) -> list[int]:
  """The updates at which a run refreshes its GaLore projectors.

  Args:
    args: the run's ``args.json`` (``optimizer``, ``steps``,
      ``update_proj_gap``).

  Returns:
    ``[0, T, 2T, ...]`` below ``steps`` for a GaLore optimizer (with
    ``stagger_refresh`` these are the boundaries of the windows the refreshes
    are spread over); ``[]`` for the others.
  """
  if "galore" not in str(args.get("optimizer", "")):
    return []
  return list(range(0, int(args["steps"]), int(args["update_proj_gap"])))


def make_run(args: Mapping[str, Any], rows: list[dict[str, str]],
             label: str) -> Run:
  """A ``Run`` from a run's arguments and metrics rows.

  Args:
    args: the run's arguments (``args.json``, or ``vars`` of the parsed
      arguments).
    rows: the ``metrics.csv`` rows.
    label: the name in the legend.

  Returns:
    The run, its refresh marks limited to the updates it has recorded.
  """
  last_step = max((int(r["step"]) for r in rows if r.get("step")), default=0)
  return Run(label=label, rows=rows, tokens_per_update=tokens_per_update(args),
             refresh_steps=[s for s in refresh_steps(args) if s <= last_step],
             staggered=bool(args.get("stagger_refresh", False)))


def load_run(directory: str | Path, label: str | None = None) -> Run:
  """Reads a run directory written by ``pretrain_llama``.

  Args:
    directory: holds ``metrics.csv`` and ``args.json``.
    label: the name in the legend (default: the directory's name).

  Returns:
    The run.

  Raises:
    FileNotFoundError: the directory, its ``metrics.csv`` or its
      ``args.json`` is missing.
    ValueError: ``metrics.csv`` has no rows or lacks a needed column, or
      ``args.json`` lacks a needed key.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"No run directory {str(directory)!r}.")
  metrics_path, args_path = directory / "metrics.csv", directory / "args.json"
  for path in (metrics_path, args_path):
    if not path.is_file():
      raise FileNotFoundError(f"No {path.name} in {str(directory)!r}.")
  with metrics_path.open(newline="") as f:
    reader = csv.DictReader(f)
    rows = [row for row in reader if row.get("step")]
    missing = {"step", "train_loss", "eval_loss", "lr"} - set(
        reader.fieldnames or ())
  if missing:
    raise ValueError(f"{metrics_path} lacks the columns "
                     f"{', '.join(sorted(missing))}.")
  if not rows:
    raise ValueError(f"{metrics_path} has no rows.")
  args = json.loads(args_path.read_text())
  try:
    return make_run(args, rows, label or directory.resolve().name)
  except KeyError as e:
    raise ValueError(f"{args_path} lacks {e}.") from None


def _points(run: Run, column: str, x: str) -> tuple[list[float], list[float]]:
  """The (x, value) pairs of the rows that have ``column``."""
  scale = run.tokens_per_update if x == "tokens" else 1
  pairs = [(int(r["step"]) * scale, float(r[column])) for r in run.rows
           if r.get(column)]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def _refresh_label(run: Run, prefix: str) -> str:
  steps = run.refresh_steps
  every = f" every {steps[1] - steps[0]} steps" if len(steps) > 1 else ""
  if run.staggered:
    return f"{prefix}refresh windows{every} (staggered within each)"
  return f"{prefix}projector refreshes{every}"


def plot_runs(runs: Sequence[Run], path: str | Path, x: str = "steps",
              title: str | None = None) -> bool:
  """Writes the runs' loss and learning-rate curves to a PNG.

  Args:
    runs: the runs, one colour each.
    path: the PNG to write.
    x: ``"steps"`` (optimizer updates) or ``"tokens"``.
    title: the figure's title.

  Returns:
    Whether the PNG was written (False: matplotlib is not installed).
  """
  try:
    import matplotlib  # noqa: PLC0415  (optional, imported when plotting)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    print("matplotlib is not installed: no plot.")
    return False
  fig, (loss_ax, lr_ax) = plt.subplots(
      2, 1, sharex=True, figsize=(8, 6.5), height_ratios=(3, 1))
  for k, run in enumerate(runs):
    color = f"C{k % 10}"
    prefix = f"{run.label}: " if len(runs) > 1 else ""
    loss_ax.plot(*_points(run, "train_loss", x), "--", color=color, lw=1,
                 alpha=0.8, label=f"{prefix}train loss")
    loss_ax.plot(*_points(run, "eval_loss", x), "o-", color=color, lw=1.5,
                 ms=3, label=f"{prefix}eval loss")
    lr_ax.plot(*_points(run, "lr", x), color=color, lw=1.2, label=run.label)
    marks = [s * (run.tokens_per_update if x == "tokens" else 1)
             for s in run.refresh_steps]
    for ax in (loss_ax, lr_ax):
      # One collection per run, spanning the panel's height: cheap even with
      # thousands of refreshes.
      ax.vlines(marks, 0, 1, transform=ax.get_xaxis_transform(),
                colors=color, lw=0.8, alpha=0.35,
                label=(_refresh_label(run, prefix)
                       if ax is loss_ax and marks else None))
  loss_ax.set_ylabel("cross-entropy (nats / token)")
  lr_ax.set_ylabel("learning rate")
  lr_ax.set_xlabel(_X_LABELS[x])
  if title:
    loss_ax.set_title(title)
  for ax in (loss_ax, lr_ax):
    ax.grid(alpha=0.3)
  loss_ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def build_parser() -> cli.ArgumentParser:
  """The command line: run directories, x axis, output, labels.

  A bad value is one line on stderr and exit status 2 (``cli.ArgumentParser``).
  """
  p = cli.ArgumentParser(
      prog="python -m examples.compare", error_name="compare",
      description="Overlay pre-training runs' loss and learning-rate curves, "
      "with projector refresh marks, in one PNG.")
  p.add_argument("runs", nargs="+",
                 help="run directories of examples.pretrain_llama "
                 "(metrics.csv, args.json)")
  p.add_argument("--x", default="steps", choices=X_AXES,
                 help="the horizontal axis: optimizer steps or training "
                 "tokens")
  p.add_argument("--out", default="compare.png", help="the PNG to write")
  p.add_argument("--labels", nargs="+", default=None,
                 help="one legend name per run (default: the directory "
                 "names)")
  p.add_argument("--title", default=None, help="the figure's title")
  return p


def main(argv: Sequence[str] | None = None) -> Path:
  """Reads the runs and writes the comparison PNG.

  Args:
    argv: command-line arguments (default ``sys.argv[1:]``).

  Returns:
    The path of the PNG.
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  labels = args.labels or [None] * len(args.runs)
  if len(labels) != len(args.runs):
    parser.error(f"--labels gives {len(labels)} names for {len(args.runs)} "
                 "runs")
  out = Path(args.out)
  if not out.parent.is_dir():
    parser.error(f"no directory {str(out.parent)!r} for --out")
  with cli.user_errors(parser):
    runs = [load_run(d, label) for d, label in zip(args.runs, labels)]
  if not plot_runs(runs, out, x=args.x, title=args.title):
    parser.error("matplotlib is not installed (pip install -e "
                 "'.[examples]')")
  print(f"wrote {out}")
  return out


if __name__ == "__main__":
  main()
