"""``python -m examples.compare``: runs' curves and refresh marks in one PNG.

Fake run directories (``metrics.csv`` with ``pretrain_llama``'s columns and
an ``args.json``) stand in for real runs; bad input is one line on stderr and
exit status 2.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from examples import compare
from examples import pretrain_llama

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(directory, *, optimizer="galore_adamw", steps=10, gap=4,
              **extra_args):
  """A run directory as pretrain_llama writes it (evals at 0, 5 and 10)."""
  directory.mkdir(parents=True)
  args = {"optimizer": optimizer, "model": "tiny", "steps": steps,
          "update_proj_gap": gap, "batch_size": 2, "seq_len": 16,
          "grad_accum": 3, **extra_args}
  (directory / "args.json").write_text(json.dumps(args))
  with (directory / "metrics.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=pretrain_llama.METRIC_FIELDS)
    writer.writeheader()
    for step in range(steps + 1):
      if step:
        writer.writerow({"step": step, "train_loss": 6.0 - 0.1 * step,
                         "lr": 1e-3 * min(step, 3) / 3,
                         "tokens_per_s": 1000.0, "elapsed": 0.1 * step})
      if step % 5 == 0:
        writer.writerow({"step": step, "eval_loss": 6.1 - 0.1 * step,
                         "eval_ppl": 400.0, "elapsed": 0.1 * step})
  return directory


def test_refresh_steps_and_tokens_come_from_args():
  assert compare.refresh_steps(
      {"optimizer": "galore_adamw", "steps": 10, "update_proj_gap": 4}) == [
          0, 4, 8]
  assert compare.refresh_steps(
      {"optimizer": "galore_adamw_8bit_layerwise", "steps": 8,
       "update_proj_gap": 4}) == [0, 4]
  assert compare.refresh_steps(
      {"optimizer": "adamw", "steps": 10, "update_proj_gap": 4}) == []
  assert compare.tokens_per_update(
      {"batch_size": 2, "seq_len": 16, "grad_accum": 3}) == 96


def test_load_run_reads_a_run_directory(tmp_path):
  run = compare.load_run(write_run(tmp_path / "a", stagger_refresh=True))
  assert run.label == "a"
  assert run.refresh_steps == [0, 4, 8]
  assert run.staggered
  assert run.tokens_per_update == 96
  assert compare.load_run(write_run(tmp_path / "b", optimizer="adamw"),
                          "AdamW").refresh_steps == []


def test_refresh_marks_stop_at_the_last_recorded_step(tmp_path):
  run_dir = write_run(tmp_path / "a", steps=6, gap=2)
  args = json.loads((run_dir / "args.json").read_text())
  args["steps"] = 100  # an interrupted run: only 6 updates recorded
  (run_dir / "args.json").write_text(json.dumps(args))
  assert compare.load_run(run_dir).refresh_steps == [0, 2, 4, 6]


@pytest.mark.parametrize("x", compare.X_AXES)
def test_main_writes_one_png_of_several_runs(tmp_path, x):
  a = write_run(tmp_path / "a")
  b = write_run(tmp_path / "b", optimizer="adamw")
  c = write_run(tmp_path / "c", gap=3, stagger_refresh=True)
  out = tmp_path / "compare.png"
  assert compare.main([str(a), str(b), str(c), "--x", x, "--out", str(out),
                       "--labels", "GaLore", "AdamW", "staggered"]) == out
  assert out.read_bytes()[:8] == PNG_MAGIC


def run_compare(*argv, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "examples.compare", *argv],
                        capture_output=True, text=True, cwd=cwd, check=False)


def assert_one_line_error(result, *fragments):
  assert result.returncode == 2, result
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("compare: error: "), result.stderr
  for fragment in fragments:
    assert fragment in lines[0], result.stderr


def test_a_missing_run_directory_is_one_line(tmp_path):
  assert_one_line_error(run_compare(str(tmp_path / "nope")),
                        "No run directory")


def test_bad_runs_are_one_line(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  no_rows = write_run(tmp_path / "no_rows")
  (no_rows / "metrics.csv").write_text(
      ",".join(pretrain_llama.METRIC_FIELDS) + "\n")
  good = write_run(tmp_path / "good")
  for argv, fragment in [
      ([str(tmp_path / "empty")], "No metrics.csv"),
      ([str(no_rows)], "has no rows"),
      ([str(good), "--labels", "a", "b"], "--labels gives 2 names for 1"),
      ([str(good), "--out", str(tmp_path / "no" / "x.png")], "no directory"),
      ([str(good), "--x", "time"], "invalid choice"),
  ]:
    with pytest.raises(SystemExit) as exit_info:
      compare.main(argv)
    assert exit_info.value.code == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compare: error: "), err
    assert fragment in err[0], err
