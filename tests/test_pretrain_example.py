"""Tests for the pre-training job, examples/pretrain_llama.py.

Every run uses a 2-layer, d=64 LLaMA on the ByT5 byte vocabulary, 32-token
sequences, a 200 kB slice of the stdlib corpus and XLA's cheapest CPU compile
settings (``--fast-compile``): compiling the train step dominates each run.
"""

import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import galore_optax
from examples import llama
from examples import pretrain_llama

REPO = Path(__file__).resolve().parents[1]

SMALL_CONFIG = {
    "model_type": "llama",
    "vocab_size": llama.BYT5_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 2,
    "head_dim": 16,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """A small model config file and a shared tokenised-corpus cache."""
  root = tmp_path_factory.mktemp("pretrain")
  config = root / "small_llama.json"
  config.write_text(json.dumps(SMALL_CONFIG))
  return {"config": str(config), "cache": str(root / "cache")}


def small_args(shared, out_dir, **overrides):
  """Command-line arguments of a fast run; overrides use flag names."""
  opts = {
      "--model": shared["config"],
      "--cache-dir": shared["cache"],
      "--max-train-bytes": 200_000,
      "--seq-len": 32,
      "--batch-size": 4,
      "--steps": 3,
      "--eval-every": 0,
      "--eval-batches": 1,
      "--rank": 16,
      "--update-proj-gap": 2,
      "--out-dir": str(out_dir),
  }
  flags = ["--fast-compile", "--no-progress", "--no-tensorboard", "--no-plot"]
  for key, value in overrides.items():
    if value is True:
      flags = [f for f in flags if f != f"--no-{key[2:]}"] + [key]
    else:
      opts[key] = value
  return [str(x) for kv in opts.items() for x in kv] + flags


def read_metrics(out_dir):
  with open(Path(out_dir) / "metrics.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  train = {int(r["step"]): r["train_loss"] for r in rows if r["train_loss"]}
  evals = {int(r["step"]): r["eval_loss"] for r in rows if r["eval_loss"]}
  return rows, train, evals


def test_short_run_writes_outputs_and_learns(shared, tmp_path):
  out = tmp_path / "run"
  summary = pretrain_llama.main(small_args(
      shared, out, **{"--steps": 8, "--eval-every": 4, "--plot": True,
                      "--tensorboard": True}))
  for name in ("metrics.csv", "summary.json", "loss.png", "args.json"):
    assert (out / name).is_file(), name
  assert list((out / "tensorboard").iterdir())
  assert (out / "checkpoints" / "8").is_dir()  # the final checkpoint

  rows, train, evals = read_metrics(out)
  assert list(rows[0]) == list(pretrain_llama.METRIC_FIELDS)
  assert sorted(train) == list(range(1, 9))
  assert sorted(evals) == [0, 4, 8]
  losses = [float(train[s]) for s in range(1, 9)]
  assert all(math.isfinite(x) for x in losses)
  # From about ln(384) = 5.95 nats; byte-level text is learnt fast.
  assert np.mean(losses[-3:]) < losses[0] - 0.5
  assert float(evals[8]) < float(evals[0]) - 0.5

  on_disk = json.loads((out / "summary.json").read_text())
  assert on_disk == summary
  assert summary["final_eval_loss"] == pytest.approx(float(evals[8]))
  assert summary["final_eval_ppl"] == pytest.approx(math.exp(float(evals[8])))
  assert summary["start_eval_loss"] == pytest.approx(float(evals[0]))
  assert summary["param_count"] == llama.param_count(
      llama.abstract_model_state(llama.get_config(shared["config"])))
  assert summary["opt_state_bytes"] > 0
  assert summary["peak_tokens_per_s"] > 0
  assert summary["wall_time_s"] > 0
  # One compilation of each jitted function for the whole run.
  assert summary["train_step_traces"] == 1
  assert summary["eval_step_traces"] == 1


@pytest.mark.parametrize("optimizer,extra", [
    ("galore_adamw_8bit", {}), ("galore_adamw_layerwise", {}),
    # int8 weights, stochastic rounding: the keys come from the step.
    ("galore_adamw_8bit", {"--weights": "int8", "--param-dtype": "bfloat16"}),
    # ... and rounded inside the per-layer step's backward pass.
    ("galore_adamw_8bit_layerwise", {"--weights": "int8"}),
])
def test_resume_reproduces_an_uninterrupted_run_exactly(
    shared, tmp_path, optimizer, extra):
  # Gradient accumulation and a projector refresh after the resume point
  # (gap 2) are included on purpose; N = 3 updates of 2 micro-batches.
  n = 3
  common = {"--steps": 2 * n, "--eval-every": n, "--grad-accum": 2,
            "--checkpoint-every": n, "--optimizer": optimizer, **extra}
  full = tmp_path / "full"
  pretrain_llama.main(small_args(shared, full, **common))
  assert (full / "checkpoints" / str(n)).is_dir()

  resumed = tmp_path / "resumed"
  (resumed / "checkpoints").mkdir(parents=True)
  shutil.copytree(full / "checkpoints" / str(n),
                  resumed / "checkpoints" / str(n))
  summary = pretrain_llama.main(
      small_args(shared, resumed, **common, **{"--resume": True}))
  assert summary["start_step"] == n
  assert summary["train_step_traces"] == 1

  _, train_full, eval_full = read_metrics(full)
  _, train_resumed, eval_resumed = read_metrics(resumed)
  assert sorted(train_resumed) == list(range(n + 1, 2 * n + 1))
  # Bit for bit: the CSV holds each float32 loss's exact repr.
  for step in range(n + 1, 2 * n + 1):
    assert train_resumed[step] == train_full[step], step
  assert eval_resumed[2 * n] == eval_full[2 * n]


def _start_subprocess(args, env_extra):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update(env_extra)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  return subprocess.Popen(
      [sys.executable, "-m", "examples.pretrain_llama", *args],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


def _wait(proc):
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-5000:]


def test_eight_sharded_devices_match_one_device(shared, tmp_path):
  # 8 simulated CPU devices (the flag must be set before jax is imported,
  # hence subprocesses): batch sharded over data x fsdp, parameters and
  # optimizer state over fsdp. Sharded matmuls and reductions sum in a
  # different order, so float32 results agree to a relative 1e-5, not
  # bit for bit.
  common = {"--steps": 3, "--batch-size": 8, "--eval-every": 0,
            "--checkpoint-every": -1}
  one, eight = tmp_path / "one", tmp_path / "eight"
  # Both at once: each is mostly single-threaded compilation.
  procs = [
      _start_subprocess(small_args(shared, one, **common), {}),
      _start_subprocess(
          small_args(shared, eight, **common, **{"--mesh": "data=2,fsdp=4"}),
          {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}),
  ]
  for proc in procs:
    _wait(proc)

  s1 = json.loads((one / "summary.json").read_text())
  s8 = json.loads((eight / "summary.json").read_text())
  assert s1["mesh"] == {"data": 1, "fsdp": 1}
  assert s8["mesh"] == {"data": 2, "fsdp": 4}
  assert s1["sharded_param_leaves"] == 0
  assert s8["sharded_param_leaves"] > 0
  assert s8["sharded_opt_state_leaves"] > 0
  assert s8["train_step_traces"] == 1

  _, train1, eval1 = read_metrics(one)
  _, train8, eval8 = read_metrics(eight)
  assert sorted(train1) == sorted(train8) == [1, 2, 3]
  for step in train1:
    np.testing.assert_allclose(float(train8[step]), float(train1[step]),
                               rtol=1e-5, err_msg=f"train step {step}")
  for step in eval1:
    np.testing.assert_allclose(float(eval8[step]), float(eval1[step]),
                               rtol=1e-5, err_msg=f"eval step {step}")


def _free_port():
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def test_two_processes_match_one_device(shared, tmp_path):
  # A multi-host job on one machine: 2 processes x 2 simulated devices
  # joined by jax.distributed (--coordinator), mesh data=2 x fsdp=2 across
  # the processes, a final checkpoint written jointly; against one device.
  common = {"--steps": 3, "--batch-size": 8, "--eval-every": 0}
  one, multi = tmp_path / "one", tmp_path / "multi"
  coordinator = f"localhost:{_free_port()}"
  two_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [_start_subprocess(small_args(shared, one, **common), {})] + [
      _start_subprocess(
          small_args(shared, multi, **common, **{
              "--mesh": "data=2,fsdp=2", "--coordinator": coordinator,
              "--num-processes": 2, "--process-id": i}), two_devices)
      for i in range(2)
  ]
  for proc in procs:
    _wait(proc)
  s0 = json.loads((multi / "summary.json").read_text())
  assert s0["mesh"] == {"data": 2, "fsdp": 2}
  assert s0["sharded_param_leaves"] > 0
  assert (multi / "checkpoints" / "3").is_dir()
  _, train1, _ = read_metrics(one)
  for out in (multi, multi / "process-1"):
    _, train, _ = read_metrics(out)
    assert sorted(train) == [1, 2, 3]
    for step in train1:
      np.testing.assert_allclose(float(train[step]), float(train1[step]),
                                 rtol=1e-5, err_msg=f"{out} step {step}")


@pytest.mark.parametrize("optimizer", pretrain_llama.OPTIMIZERS)
def test_every_optimizer_runs(shared, tmp_path, optimizer):
  summary = pretrain_llama.main(small_args(
      shared, tmp_path / optimizer, **{"--optimizer": optimizer}))
  _, train, evals = read_metrics(tmp_path / optimizer)
  assert sorted(train) == [1, 2, 3]
  assert all(math.isfinite(float(x)) for x in train.values())
  assert math.isfinite(summary["final_eval_loss"])
  assert summary["train_step_traces"] == 1


def test_layer_residuals_do_not_change_the_per_layer_run(shared, tmp_path):
  # Recomputing each layer or keeping its products: the same fused
  # per-layer updates, to float32 rounding (refresh at update 0 and 2, gap
  # 2). Keeping everything is tests/test_layerwise_recompute.py's.
  losses = {}
  for keep in ("recompute", "products"):
    out = tmp_path / keep
    pretrain_llama.main(small_args(
        shared, out, **{"--optimizer": "galore_adamw_layerwise", "--fused": True,
                        "--update-proj-gap": 2, "--layer-residuals": keep}))
    _, train, _ = read_metrics(out)
    losses[keep] = [float(train[k]) for k in sorted(train)]
  assert len(losses["recompute"]) == 3
  np.testing.assert_allclose(losses["products"], losses["recompute"],
                             rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["galore_adamw_8bit",
                                       "galore_adamw_8bit_layerwise"])
def test_int8_weights_learn_and_are_stored_in_int8(shared, tmp_path,
                                                   optimizer):
  out = tmp_path / "int8"
  summary = pretrain_llama.main(small_args(
      shared, out, **{"--steps": 8, "--eval-every": 8, "--weights": "int8",
                      "--optimizer": optimizer}))
  assert summary["weights"] == "int8"
  assert summary["train_step_traces"] == 1
  _, train, evals = read_metrics(out)
  assert float(evals[8]) < float(evals[0]) - 0.5
  float_bytes = pretrain_llama.tree_bytes(llama.get_params(
      llama.abstract_model(llama.get_config(shared["config"]))))
  # Attention and MLP matrices: 1 byte + a scale per 64..128 values
  # instead of 4 bytes.
  assert summary["param_bytes"] < 0.7 * float_bytes


def test_optimizer_state_sizes_are_ordered(shared):
  # Abstract shapes only: nothing is compiled or allocated.
  config = llama.get_config("60m")
  params = llama.get_params(llama.abstract_model(config))
  args = pretrain_llama.parse_args(["--rank", "128"])
  schedule = pretrain_llama.make_schedule(args)
  sizes = {}
  for name in ("adamw", "adamw_8bit", "galore_adamw", "galore_adamw_8bit",
               "galore_adafactor", "optax_contrib_galore"):
    tx = pretrain_llama.make_optimizer(name, schedule, args, params)
    sizes[name] = pretrain_llama.tree_bytes(jax.eval_shape(tx.init, params))
  assert sizes["galore_adamw"] < sizes["adamw"]
  assert sizes["adamw_8bit"] < sizes["adamw"]
  assert sizes["galore_adamw_8bit"] < sizes["galore_adamw"]
  assert sizes["galore_adafactor"] < sizes["galore_adamw"]
  assert sizes["optax_contrib_galore"] < sizes["adamw"]


def test_cli_parsing():
  parse = pretrain_llama.parse_target_modules
  assert parse("attn,mlp") == ["attn", "mlp"]
  assert parse("re:.*q_proj.*") == ".*q_proj.*"
  assert parse("all-linear") == "all-linear"
  assert parse("all") is None
  assert pretrain_llama.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
  assert pretrain_llama.parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8}
  assert pretrain_llama.parse_mesh(None) == {"data": 1, "fsdp": 1}
  with pytest.raises(ValueError):
    pretrain_llama.parse_mesh("model=2")
  spec = pretrain_llama.fsdp_spec
  assert spec((384, 64), 8) == jax.sharding.PartitionSpec("fsdp", None)
  assert spec((64, 128), 4) == jax.sharding.PartitionSpec(None, "fsdp")
  assert spec((64,), 4) == jax.sharding.PartitionSpec()  # small: replicated
  assert spec((99, 33), 4) == jax.sharding.PartitionSpec()  # indivisible
  args = pretrain_llama.parse_args([])
  assert args.optimizer == "galore_adamw" and args.model == "tiny"
  assert args.out_dir == os.path.join("runs", "galore_adamw-tiny")
  assert pretrain_llama.parse_args(["--optimizer", "adamw"]).lr == 3e-3


def test_target_flags_select_linear_layers_or_every_matrix():
  # Abstract shapes only. Default "attn,mlp": the attention and MLP kernels
  # (Hugging Face semantics); "all": every matrix, embedding included.
  params = llama.get_params(llama.abstract_model(llama.get_config("60m")))
  schedule = pretrain_llama.make_schedule(pretrain_llama.parse_args([]))

  def projected(*flags):
    args = pretrain_llama.parse_args(["--rank", "8", *flags])
    tx = pretrain_llama.make_optimizer("galore_adamw", schedule, args, params)
    state = jax.eval_shape(tx.init, params)
    found = [s for s in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, galore_optax.GaLoreState))
             if isinstance(s, galore_optax.GaLoreState)]
    return sorted(found[0].projectors)

  default = projected()
  assert default and all(".self_attn." in n or ".mlp." in n for n in default)
  assert len(default) == 7 * llama.get_config("60m").num_hidden_layers
  every = projected("--target-modules", "all")
  assert "model.embed_tokens.embedding" in every and "lm_head.kernel" in every
  with pytest.raises(ValueError, match="No target modules found"):
    projected("--target-modules", "embed_tokens")
