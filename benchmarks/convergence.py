"""Convergence: GaLore against AdamW at an equal token budget.

Every run trains the same model (``examples/llama.py`` preset ``tiny``: 3.4M
parameters, LLaMA architecture on ByT5 bytes) on the same data (the Python
standard library's source, the example's default corpus), with the same seed,
batches, schedule (10% warm-up, cosine to 10%), clipping and token budget, by
calling the pre-training example (``examples.pretrain_llama.main``) once per
optimizer. GaLore runs share rank, gap, scale and targets (attention and MLP),
``optax.contrib.galore`` included. Peak learning rates are swept for both
sides (AdamW 1e-4 .. 1e-2, GaLore and Fira 5e-3 and 1e-2, APOLLO 3e-3 ..
1e-2, APOLLO-Mini 1e-3 .. 1e-2). Reported: the final
held-out loss and perplexity of each, and the ratio of each final loss to
the best AdamW run's; the loss curves go to a PNG.

Q-GaLore's lazy refresh (issue 24) runs with gap 100 (20 windows in 2000
updates) beside the fixed schedule at the same gap, with the reference's
queue 5 and threshold 0.4; a second table gives, per matrix type (q/k/v/o/
gate/up/down, over the layers), the lazy run's refresh counts, final
intervals and mean similarities of the last queued projectors against the
fixed schedule's refresh count.

Run from the repository root (about 15 minutes per run on two CPU cores)::

    python -m benchmarks.convergence                       # all runs
    python -m benchmarks.convergence --runs adamw galore_adamw --steps 200

A run whose ``summary.json`` in ``--out-dir`` already matches the requested
configuration is reused, so an interrupted benchmark continues where it
stopped and runs can be added one at a time.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
from pathlib import Path
from typing import Any

import jax

from examples import pretrain_llama

# name -> extra example arguments. Learning rates are the example's defaults
# (the paper's 0.01 with scale 0.25 for GaLore, 3e-3 for the full-rank runs).
RUNS: dict[str, list[str]] = {
    "adamw": ["--optimizer", "adamw"],
    # The baseline at five rates (1e-4 .. 1e-2), so that neither side is
    # favoured by the learning rate: the ratios use the best AdamW run.
    "adamw_lr1e-3": ["--optimizer", "adamw", "--lr", "1e-3"],
    "adamw_lr1e-2": ["--optimizer", "adamw", "--lr", "1e-2"],
    "adamw_lr3e-4": ["--optimizer", "adamw", "--lr", "3e-4"],
    "adamw_lr1e-4": ["--optimizer", "adamw", "--lr", "1e-4"],
    "galore_adamw": ["--optimizer", "galore_adamw"],
    "galore_adamw_8bit": ["--optimizer", "galore_adamw_8bit"],
    "optax_contrib_galore": ["--optimizer", "optax_contrib_galore"],
    "galore_adamw_project": ["--optimizer", "galore_adamw",
                             "--moments", "project"],
    "galore_adamw_reset": ["--optimizer", "galore_adamw",
                           "--moments", "reset"],
    # GaLore's rate swept as AdamW's is (same scale, so the projected
    # matrices see lr * scale and the rest lr).
    "galore_adamw_lr5e-3": ["--optimizer", "galore_adamw", "--lr", "5e-3"],
    "galore_adamw_8bit_lr5e-3": ["--optimizer", "galore_adamw_8bit",
                                 "--lr", "5e-3"],
    "optax_contrib_galore_lr5e-3": ["--optimizer", "optax_contrib_galore",
                                    "--lr", "5e-3"],
    "galore_adamw_reset_lr5e-3": ["--optimizer", "galore_adamw",
                                  "--moments", "reset", "--lr", "5e-3"],
    # Weight storage (issue 8): bf16 weights against int8 attention/MLP
    # matrices (group-wise scales, dequantised to bf16 for the model), with
    # stochastic and with round-to-nearest updates.
    "galore_adamw_8bit_bf16": ["--optimizer", "galore_adamw_8bit",
                               "--param-dtype", "bfloat16"],
    "galore_adamw_8bit_int8_weights": [
        "--optimizer", "galore_adamw_8bit", "--param-dtype", "bfloat16",
        "--weights", "int8", "--weight-rounding", "stochastic"],
    "galore_adamw_8bit_int8_weights_nearest": [
        "--optimizer", "galore_adamw_8bit", "--param-dtype", "bfloat16",
        "--weights", "int8", "--weight-rounding", "nearest"],
    # Q-GaLore's lazy, layer-adaptive refresh (issue 24) against the fixed
    # schedule at the same, shorter gap (20 windows in 2000 updates).
    "galore_adamw_gap100": ["--optimizer", "galore_adamw",
                            "--update-proj-gap", "100"],
    "galore_adamw_lazy_gap100": ["--optimizer", "galore_adamw",
                                 "--update-proj-gap", "100",
                                 "--refresh-schedule", "lazy"],
    # GaLore's successors (issue 24), rates swept as GaLore's. Fira: the
    # GaLore settings (scale 0.25) plus the scaled residual. APOLLO: random
    # projection, scale 1 (Hugging Face's default); APOLLO-Mini: rank 1,
    # per-matrix factor, scale 128 (a factor sqrt(128) on the update), at
    # lower rates (the paper: the same as APOLLO's or below).
    **{f"fira_adamw{tag}": ["--optimizer", "fira_adamw", *lr]
       for tag, lr in (("", []), ("_lr5e-3", ["--lr", "5e-3"]))},
    **{f"apollo_adamw{tag}": [
        "--optimizer", "apollo_adamw", "--projector-method", "random",
        "--scale", "1.0", *lr]
       for tag, lr in (("", []), ("_lr5e-3", ["--lr", "5e-3"]),
                       ("_lr3e-3", ["--lr", "3e-3"]))},
    **{f"apollo_mini{tag}": [
        "--optimizer", "apollo_adamw", "--projector-method", "random",
        "--rank", "1", "--scale", "128", "--scale-type", "tensor",
        "--lr", lr]
       for tag, lr in (("", "1e-2"), ("_lr3e-3", "3e-3"),
                       ("_lr1e-3", "1e-3"))},
}
# The fixed-schedule run each lazy run is compared with.
LAZY_AGAINST = {"galore_adamw_lazy_gap100": "galore_adamw_gap100"}
MATRIX_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                "up_proj", "down_proj")
BASELINES = ("adamw", "adamw_lr1e-3", "adamw_lr1e-2", "adamw_lr3e-4",
             "adamw_lr1e-4")


def common_args(args: argparse.Namespace) -> list[str]:
  return [
      "--model", args.model, "--steps", str(args.steps),
      "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
      "--rank", str(args.rank), "--update-proj-gap", str(args.update_proj_gap),
      "--scale", str(args.scale), "--target-modules", "attn,mlp",
      "--eval-every", str(args.eval_every),
      "--eval-batches", str(args.eval_batches), "--seed", str(args.seed),
      "--log-every", "50", "--no-tensorboard", "--no-plot",
  ]


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
  """Runs (or reuses) one optimizer's training; returns its summary."""
  out_dir = Path(args.out_dir) / name
  argv = common_args(args) + RUNS[name] + ["--out-dir", str(out_dir)]
  done = out_dir / "summary.json"
  if done.exists():
    summary = json.loads(done.read_text())
    if summary.get("argv") == argv:
      print(f"[{name}] reusing {done}")
      return summary
  print(f"[{name}] python -m examples.pretrain_llama {' '.join(argv)}",
        flush=True)
  # A run whose summary is missing or stale is redone from scratch.
  summary = pretrain_llama.main(argv + ["--overwrite"])
  summary["argv"] = argv
  done.write_text(json.dumps(summary, indent=2))
  return summary


def eval_curve(out_dir: Path) -> tuple[list[int], list[float]]:
  with (out_dir / "metrics.csv").open() as f:
    rows = [r for r in csv.DictReader(f) if r["eval_loss"]]
  return [int(r["step"]) for r in rows], [float(r["eval_loss"]) for r in rows]


def plot(names: list[str], out_dir: Path, path: Path) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(10, 5))
  colors = plt.get_cmap("tab20").colors
  for k, name in enumerate(names):
    steps, losses = eval_curve(out_dir / name)
    ax.plot(steps, losses, label=name, marker=".", color=colors[k % 20],
            linestyle="--" if name.startswith("adamw") else "-")
  ax.set_xlabel("optimizer step")
  ax.set_ylabel("held-out loss (nats per byte)")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
  ax.set_title("Convergence at equal token budget")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def lazy_refresh_table(name: str, summary: dict[str, Any],
                       fixed_gap: int, steps: int) -> list[str]:
  """Markdown rows: a lazy run's schedules per matrix type.

  Args:
    name: the lazy run's name.
    summary: its summary (``lazy_refresh``: per leaf and matrix).
    fixed_gap: the fixed schedule's gap it is compared with.
    steps: updates of the run.

  Returns:
    A header and one row per matrix type found: matrices, refreshes (mean,
    min-max) against the fixed schedule's, final intervals (min-max) and
    the mean similarity of the last queued projectors (mean, min-max).
  """
  fixed = len(range(0, steps, fixed_gap))
  rows = [f"lazy refresh of {name} (fixed schedule: {fixed} refreshes per "
          "matrix)", "| matrix | matrices | refreshes (mean, min..max) | "
          "final interval | similarity (mean, min..max) |",
          "|---|---|---|---|---|"]
  for kind in MATRIX_TYPES:
    stats = [v for k, v in summary["lazy_refresh"].items()
             if f".{kind}." in f".{k}."]
    refreshes = [r for s in stats for r in s["refreshes"]]
    if not refreshes:
      continue
    intervals = [i for s in stats for i in s["interval"]]
    sims = [x for s in stats for x in s["similarity"] if x is not None]
    sim = (f"{sum(sims) / len(sims):.3f} ({min(sims):.3f}..{max(sims):.3f})"
           if sims else "-")
    rows.append(f"| {kind} | {len(refreshes)} | "
                f"{sum(refreshes) / len(refreshes):.1f} "
                f"({min(refreshes)}..{max(refreshes)}) vs {fixed} | "
                f"{min(intervals)}..{max(intervals)} | {sim} |")
  return rows


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", nargs="+", default=list(RUNS),
                      choices=list(RUNS))
  parser.add_argument("--model", default="tiny")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--rank", type=int, default=64)
  parser.add_argument("--update-proj-gap", type=int, default=200)
  parser.add_argument("--scale", type=float, default=0.25)
  parser.add_argument("--eval-every", type=int, default=250)
  parser.add_argument("--eval-batches", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out-dir", default="runs/convergence")
  args = parser.parse_args(argv)

  summaries = {name: run_one(name, args) for name in args.runs}
  out_dir = Path(args.out_dir)
  done = [summaries[b] for b in BASELINES if b in summaries]
  base = min(done, key=lambda s: s["final_eval_loss"]) if done else None
  print(f"\nmachine: {platform.machine()}, {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}; model {args.model}, {args.steps} steps of "
        f"{args.batch_size} x {args.seq_len} tokens, rank {args.rank}, "
        f"gap {args.update_proj_gap}, scale {args.scale}")
  if base:
    print(f"baseline: the best AdamW run, {base['out_dir']}")
  print("| run | final eval loss | eval ppl | loss / best adamw | optimizer "
        "state | wall time |")
  print("|---|---|---|---|---|---|")
  for name, s in summaries.items():
    ratio = (f"{s['final_eval_loss'] / base['final_eval_loss']:.4f}x"
             if base else "-")
    print(f"| {name} | {s['final_eval_loss']:.4f} | "
          f"{s['final_eval_ppl']:.3f} | {ratio} | "
          f"{s['opt_state_bytes'] / 2**20:.2f} MiB | "
          f"{s['wall_time_s'] / 60:.1f} min |")
  for name, s in summaries.items():
    if s.get("lazy_refresh"):
      against = summaries.get(LAZY_AGAINST.get(name, ""))
      if against:
        print(f"{name}: eval loss / {LAZY_AGAINST[name]}'s = "
              f"{s['final_eval_loss'] / against['final_eval_loss']:.4f}x")
      gap = int(RUNS[name][RUNS[name].index("--update-proj-gap") + 1])
      print("\n".join(lazy_refresh_table(name, s, gap, args.steps)))
  plot(list(summaries), out_dir, out_dir / "convergence.png")
  (out_dir / "results.json").write_text(json.dumps(summaries, indent=2))
  print(f"plot: {out_dir / 'convergence.png'}")


if __name__ == "__main__":
  main()
