"""The command lines of ``examples.pretrain_llama`` and ``galore_optax.memory``.

Every bad value is one line on stderr and exit status 2, never a traceback;
every option has a help text with its default shown at most once; a run does
not print transformers' "PyTorch was not found" banner; a run directory that
holds an earlier run is only reused with ``--resume`` or ``--overwrite``.
Most values are tried in-process (``main(argv)``); a few in subprocesses,
the honest check that no traceback reaches the terminal.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples import pretrain_llama
from galore_optax import memory

REPO = Path(__file__).resolve().parents[1]

# A 2-layer, d=64 model (tests/test_pretrain_example.py's), for fast runs.
SMALL_CONFIG = {
    "model_type": "llama", "vocab_size": 384, "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 4, "num_hidden_layers": 2, "head_dim": 16,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Config files (good, not JSON, JSON without the fields) and a cache."""
  root = tmp_path_factory.mktemp("cli")
  paths = {"good": root / "small.json", "not_json": root / "bad.json",
           "no_fields": root / "empty.json"}
  paths["good"].write_text(json.dumps(SMALL_CONFIG))
  paths["not_json"].write_text("{hidden_size: 64")
  paths["no_fields"].write_text(json.dumps({"model_type": "llama"}))
  return {k: str(v) for k, v in paths.items()} | {
      "cache": str(root / "cache")}


def small_run(files, out_dir, *extra):
  """Arguments of a one-update run of the small model."""
  return ["--model", files["good"], "--cache-dir", files["cache"],
          "--max-train-bytes", "50000", "--seq-len", "16", "--batch-size",
          "2", "--steps", "1", "--eval-every", "0", "--eval-batches", "1",
          "--optimizer", "adamw", "--checkpoint-every", "-1",
          "--fast-compile", "--no-progress", "--no-tensorboard", "--no-plot",
          "--out-dir", str(out_dir), *extra]


def assert_one_line_error(stderr, prog, *fragments):
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr
  assert lines[0].startswith(f"{prog}: error: "), stderr
  assert "Traceback" not in stderr
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


def run_in_process(main, argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2
  return capsys.readouterr().err


def run_subprocess(module, argv, timeout=180):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO,
                        env=env, capture_output=True, text=True,
                        timeout=timeout)


# -- pretrain_llama: bad values ------------------------------------------------

PRETRAIN_PARSE_ERRORS = [
    (["--lr", "-1"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--rank", "0"], "--rank"),
    (["--rank", "-4"], "--rank"),
    (["--steps", "0"], "--steps"),
    (["--steps", "ten"], "--steps"),
    (["--scale", "nan"], "--scale"),
    (["--seed", "-1"], "--seed"),
    (["--warmup-ratio", "2"], "--warmup-ratio"),
    (["--target-modules", "re:("], "--target-modules"),
    (["--target-modules", ","], "--target-modules"),
    (["--model", "13b"], "--model"),
    (["--mesh", "model=2"], "--mesh"),
    (["--mesh", "fsdp=0"], "--mesh"),
    (["--param-dtype", "fp16"], "--param-dtype"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--resume", "--overwrite"], "--overwrite"),
    (["--no-such-flag"], "--no-such-flag"),
    # Every other flag with a checked value.
    (["--seed", "99999999999999999999"], "--seed"),
    (["--seed", "4294967296"], "--seed"),
    (["--mesh", ""], "--mesh"),
    (["--mesh", "data=2,data=2"], "--mesh"),
    (["--mesh", "fsdp"], "--mesh"),
    (["--model", ""], "--model"),
    (["--weight-group-size", "0"], "--weight-group-size"),
    (["--weight-modules", "re:("], "--weight-modules"),
    (["--weights", "int4"], "--weights"),
    (["--weight-rounding", "up"], "--weight-rounding"),
    (["--update-proj-gap", "0"], "--update-proj-gap"),
    (["--scale", "0"], "--scale"),
    (["--proj-type", "diag"], "--proj-type"),
    (["--projector-method", "qr"], "--projector-method"),
    (["--moments", "drop"], "--moments"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--max-grad-norm", "nan"], "--max-grad-norm"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--max-train-bytes", "0"], "--max-train-bytes"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seq-len", "0"], "--seq-len"),
    (["--eval-every", "-1"], "--eval-every"),
    (["--eval-batches", "0"], "--eval-batches"),
    (["--num-processes", "0"], "--num-processes"),
    (["--process-id", "-1"], "--process-id"),
    (["--log-every", "0"], "--log-every"),
    (["--checkpoint-every", "x"], "--checkpoint-every"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (["--num-processes", "2"], "--coordinator"),
    (["--process-id", "0"], "--coordinator"),
    (["--fused"], "--fused"),
    (["--layer-residuals", "products"], "--layer-residuals"),
    (["--optimizer", "galore_adamw_layerwise", "--layer-residuals", "some"],
     "--layer-residuals"),
]


@pytest.mark.parametrize("argv,flag", PRETRAIN_PARSE_ERRORS,
                         ids=[" ".join(a) for a, _ in PRETRAIN_PARSE_ERRORS])
def test_pretrain_bad_value_is_one_line(argv, flag, capsys, tmp_path):
  err = run_in_process(pretrain_llama.main,
                       argv + ["--out-dir", str(tmp_path / "run")], capsys)
  assert_one_line_error(err, "pretrain_llama", flag)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,fragment", [
    ("not_json", "not valid JSON"), ("no_fields", "hidden_size")])
def test_pretrain_bad_config_json_is_one_line(files, name, fragment, capsys,
                                              tmp_path):
  err = run_in_process(pretrain_llama.main,
                       ["--model", files[name], "--out-dir", str(tmp_path)],
                       capsys)
  assert_one_line_error(err, "pretrain_llama", "--model", fragment)


@pytest.mark.parametrize("extra,fragment", [
    (["--data", "/no/such/corpus.txt"], "/no/such/corpus.txt"),
    (["--optimizer", "galore_adamw", "--target-modules", "no_such_module"],
     "matches no parameter"),
    (["--optimizer", "galore_adamw_8bit_layerwise", "--target-modules",
      "re:.*no_such_module.*"], "matches no parameter"),
    (["--optimizer", "optax_contrib_galore", "--target-modules", "nothing"],
     "matches no parameter"),
    (["--weights", "int8", "--weight-modules", "no_such_module"],
     "matches no parameter"),
    (["--mesh", "fsdp=64"], "needs 64 devices"),
    (["--optimizer", "galore_adamw_8bit", "--moments", "project"],
     "moments='project' needs float moments"),
    (["--optimizer", "galore_adafactor", "--moments", "project"],
     "moments='project'"),
    (["--cache-dir", "{good}"], "{good}"),  # a file, not a directory
    (["--out-dir", "{good}"], "{good}"),
    (["--optimizer", "galore_adamw", "--update-proj-gap", str(2**31)],
     "update_proj_gap"),
])
def test_pretrain_setup_error_is_one_line(files, extra, fragment, capsys,
                                          tmp_path):
  # The last --optimizer given wins over small_run's adamw.
  extra = [a.format(**files) for a in extra]
  argv = small_run(files, tmp_path / "run", *extra)
  fragment = fragment.format(**files)
  err = run_in_process(pretrain_llama.main, argv, capsys)
  assert_one_line_error(err, "pretrain_llama", fragment)


# -- pretrain_llama: the run directory ------------------------------------------


def _fake_earlier_run(out_dir):
  (out_dir / "checkpoints" / "3").mkdir(parents=True)
  (out_dir / "metrics.csv").write_text("step\n1\n")
  (out_dir / "notes.txt").write_text("not the run's")


def test_existing_run_dir_needs_resume_or_overwrite(capsys, tmp_path):
  out = tmp_path / "run"
  _fake_earlier_run(out)
  err = run_in_process(pretrain_llama.main, ["--out-dir", str(out)], capsys)
  assert_one_line_error(err, "pretrain_llama", "already holds a run",
                        "--resume", "--overwrite")
  assert (out / "metrics.csv").exists()

  # --resume keeps the outputs (to continue them) ...
  args = pretrain_llama.parse_args(["--out-dir", str(out), "--resume"])
  pretrain_llama.prepare_run(args)
  assert (out / "metrics.csv").exists() and (out / "checkpoints").exists()
  # ... --overwrite removes exactly the run's outputs.
  args = pretrain_llama.parse_args(["--out-dir", str(out), "--overwrite"])
  assert pretrain_llama.prepare_run(args)[0] == out
  assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
  # An empty or unrelated directory is used as it is.
  args = pretrain_llama.parse_args(["--out-dir", str(out)])
  assert pretrain_llama.prepare_run(args)[0] == out


def test_default_run_dir_message_names_the_default(monkeypatch, capsys,
                                                   tmp_path):
  monkeypatch.chdir(tmp_path)
  _fake_earlier_run(tmp_path / "runs" / "galore_adamw-tiny")
  err = run_in_process(pretrain_llama.main, [], capsys)
  assert_one_line_error(err, "pretrain_llama", "the default --out-dir",
                        "--overwrite")


# -- memory: bad values ---------------------------------------------------------

MEMORY_PARSE_ERRORS = [
    (["--models", "13b"], "--models"),
    (["--models", ""], "--models"),
    (["--dtypes", "fp16"], "--dtypes"),
    (["--param-dtype", "int4"], "--param-dtype"),
    (["--rank", "0"], "--rank"),
    (["--rank", "-1"], "--rank"),
    (["--target-modules", "re:("], "--target-modules"),
    (["--projector-dtype", "fp8"], "--projector-dtype"),
    (["--optimizers", "sgd"], "--optimizers"),
    (["--config", "/no/such/config.json"], "--config"),
]


@pytest.mark.parametrize("argv,flag", MEMORY_PARSE_ERRORS,
                         ids=[" ".join(a) for a, _ in MEMORY_PARSE_ERRORS])
def test_memory_bad_value_is_one_line(argv, flag, capsys):
  err = run_in_process(memory.main, argv, capsys)
  assert_one_line_error(err, "galore_optax.memory", flag)


@pytest.mark.parametrize("name,fragment", [
    ("not_json", "not valid JSON"), ("no_fields", "hidden_size")])
def test_memory_bad_config_json_is_one_line(files, name, fragment, capsys):
  err = run_in_process(memory.main, ["--config", files[name]], capsys)
  assert_one_line_error(err, "galore_optax.memory", "--config", fragment)


def test_memory_targets_matching_nothing_is_one_line(capsys):
  err = run_in_process(memory.main, ["--models", "tiny", "--target-modules",
                                     "no_such_module"], capsys)
  assert_one_line_error(err, "galore_optax.memory", "matches no parameter")


# -- --help ---------------------------------------------------------------------


@pytest.mark.parametrize("parser", [pretrain_llama.build_parser(),
                                    memory.build_parser()],
                         ids=["pretrain_llama", "memory"])
def test_every_option_has_help_and_one_default(parser):
  for action in parser._actions:  # pylint: disable=protected-access
    assert action.help and action.help.strip(), action.option_strings
  text = parser.format_help()
  assert "(default: None)" not in text
  assert "(default: False)" not in text
  assert "(default: [])" not in text
  # Each option's entry names its default at most once.
  entries = text.split("\n  -")
  for entry in entries:
    assert entry.count("default") <= 1, entry


# -- subprocesses: no traceback, no banner, the run directory -------------------


def test_subprocesses_print_one_line_and_no_banner(files, tmp_path):
  out = tmp_path / "run"
  bad = run_subprocess("examples.pretrain_llama", ["--lr", "-1"])
  assert bad.returncode == 2
  assert_one_line_error(bad.stderr, "pretrain_llama", "--lr", "'-1'")

  run = run_subprocess("examples.pretrain_llama", small_run(files, out))
  output = run.stdout + run.stderr
  assert run.returncode == 0, output[-3000:]
  assert "PyTorch was not found" not in output
  assert (out / "summary.json").is_file()

  again = run_subprocess("examples.pretrain_llama", small_run(files, out))
  assert again.returncode == 2
  assert_one_line_error(again.stderr, "pretrain_llama", "already holds a run")
  assert "PyTorch was not found" not in again.stdout + again.stderr

  for argv in (["--models", "13b"],
               ["--models", "tiny", "--target-modules", "nothing"]):
    bad = run_subprocess("galore_optax.memory", argv)
    assert bad.returncode == 2
    assert_one_line_error(bad.stderr, "galore_optax.memory")
