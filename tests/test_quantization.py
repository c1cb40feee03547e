"""Block-wise 8-bit quantisation against bitsandbytes and on its own.

The fixture ``fixtures/bitsandbytes_blockwise.npz`` comes from
``fixtures/generate_bitsandbytes.py`` (bitsandbytes 0.50.2, CPU backend).
"""

import collections
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galore_optax import quantization as qz

FIXTURE = (pathlib.Path(__file__).parent / "fixtures" /
           "bitsandbytes_blockwise.npz")
DATA = np.load(FIXTURE)
CASES = json.loads(str(DATA["__meta__"]))["cases"]
CASE_IDS = [c["name"] for c in CASES]

# Jitted once per static setting: eager mode would compile every op.
quantize = jax.jit(qz.quantize, static_argnames=("signed", "block_size"))
dequantize = jax.jit(qz.dequantize,
                     static_argnames=("signed", "block_size", "dtype"))


def _map_name(signed):
  return "signed" if signed else "unsigned"


@functools.lru_cache(maxsize=None)
def _results():
  """Our codes/absmax/reconstruction for every case, plus bnb's codes
  dequantised by us.

  Cases sharing a map and block size are run as one padded flat array (each
  case padded with zeros to whole blocks, so no block mixes two cases), and
  all groups in one jitted function: a single compilation.
  """
  groups = collections.defaultdict(list)
  for case in CASES:
    groups[(case["signed"], case["block_size"])].append(case)
  groups = sorted(groups.items())

  def padded(a, bs):
    a = a.reshape(-1)
    return np.pad(a, (0, -a.size % bs))

  inputs = [
      (np.concatenate([padded(DATA[c["name"] + "/x"], bs) for c in cases]),
       np.concatenate([padded(DATA[c["name"] + "/codes"], bs) for c in cases]),
       np.concatenate([DATA[c["name"] + "/absmax"] for c in cases]))
      for (_, bs), cases in groups
  ]

  @jax.jit
  def run(inputs):
    outs = []
    for ((signed, bs), _), (x, b_codes, b_absmax) in zip(groups, inputs):
      code = qz.create_dynamic_map(signed)  # concrete: created outside jit
      codes, absmax = qz.quantize_blockwise(x, code, bs)
      # Both inputs are whole blocks: dequantise ours and bnb's in one go.
      both = qz.dequantize_blockwise(jnp.concatenate([codes, b_codes]),
                                     jnp.concatenate([absmax, b_absmax]),
                                     code, bs)
      outs.append((codes, absmax, both[:x.size], both[x.size:]))
    return outs

  out = {}
  for ((_, bs), cases), group_out in zip(groups, run(inputs)):
    codes, absmax, deq, deq_bnb_codes = map(np.asarray, group_out)
    start = 0
    for c in cases:
      size = int(np.prod(c["shape"]))
      nb = -(-size // bs)
      out[c["name"]] = dict(
          codes=codes[start:start + size],
          absmax=absmax[start // bs:start // bs + nb],
          deq=deq[start:start + size],
          deq_bnb_codes=deq_bnb_codes[start:start + size],
      )
      start += nb * bs
  return out


def test_dynamic_maps_equal_bitsandbytes_to_the_bit():
  for signed in (True, False):
    ours = np.asarray(qz.create_dynamic_map(signed))
    ref = DATA["map/" + _map_name(signed)]
    assert ours.dtype == np.float32 and ours.shape == (256,)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
  signed_map = np.asarray(qz.create_dynamic_map())
  assert signed_map[0] == np.float32(-0.99296875)
  assert signed_map[127] == 0 and signed_map[-1] == 1
  assert np.all(np.diff(signed_map) > 0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_absmax_equal_and_dequantization_bit_exact(case):
  name, ours = case["name"], _results()[case["name"]]
  np.testing.assert_array_equal(ours["absmax"], DATA[name + "/absmax"])
  # Our dequantiser on bnb's own codes reproduces bnb's output exactly.
  np.testing.assert_array_equal(ours["deq_bnb_codes"],
                                DATA[name + "/deq"].reshape(-1))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_codes_nearest_and_error_never_above_bitsandbytes(case):
  name, ours = case["name"], _results()[case["name"]]
  bs = case["block_size"]
  x = DATA[name + "/x"].reshape(-1)
  bnb_codes = DATA[name + "/codes"].reshape(-1)
  code = DATA["map/" + _map_name(case["signed"])].astype(np.float64)
  absmax = np.repeat(DATA[name + "/absmax"], bs)[:x.size]

  # Where codes differ, ours is the nearer code (bnb's CPU search is coarse
  # for tiny normalised values; it codes an exact 0 as 2.1e-5 (signed map) or
  # 1.6e-5 (unsigned) times absmax, for example).
  live = absmax > 0
  s = np.clip(x[live] / absmax[live].astype(np.float64), -1, 1)
  d_ours = np.abs(code[ours["codes"][live]] - s)
  d_bnb = np.abs(code[bnb_codes[live]] - s)
  assert np.all(d_ours <= d_bnb + 1e-7)
  # bnb's search is reliable above 1% of the block maximum.
  big = np.abs(s) >= 0.01
  if big.any():
    assert np.mean(ours["codes"][live][big] == bnb_codes[live][big]) >= 0.99

  if case["kind"] in ("normal", "sqnormal"):
    assert np.mean(ours["codes"] == bnb_codes) >= 0.95

  err = np.abs(ours["deq"] - x)
  bnb_err = np.abs(DATA[name + "/deq"].reshape(-1) - x)
  assert err.mean() <= bnb_err.mean()
  assert err.max() <= bnb_err.max()


def test_nearest_code_lookup_equals_binary_search_at_every_boundary():
  for signed in (True, False):
    code = np.asarray(qz.create_dynamic_map(signed))
    mids = (code[:-1] + code[1:]) / np.float32(2)
    probes = np.concatenate([
        mids, np.nextafter(mids, np.float32(-2)), np.nextafter(mids,
                                                               np.float32(2)),
        code, [-1.0, -0.0, 0.0, 1.0, 1e-38, -1e-38, 1e-45, 3e-7, -3e-7],
        np.random.default_rng(0).uniform(-1, 1, 4096),
    ]).astype(np.float32)
    probes = np.clip(probes, -1, 1)
    expected = np.searchsorted(mids, probes, side="left")
    fast = jax.jit(lambda p, code=code: qz._nearest_code(p, code))(probes)
    # A traced map takes jnp.searchsorted: both paths must agree.
    generic = jax.jit(qz._nearest_code)(probes, code)
    np.testing.assert_array_equal(np.asarray(fast), expected)
    np.testing.assert_array_equal(np.asarray(generic), expected)


def _worst_error(signed):
  """Largest distance from a value in [-1 or 0, 1] to its nearest code."""
  code = np.asarray(qz.create_dynamic_map(signed), np.float64)
  lowest = -1.0 if signed else 0.0
  return max(np.diff(code).max() / 2, code[0] - lowest, 1.0 - code[-1])


def test_round_trip_error_on_normal_data_matches_reference_figures():
  x = np.random.default_rng(0).standard_normal((64, 4096), np.float32)
  q = quantize(x)
  y = np.asarray(dequantize(q))
  err = np.abs(y - x)
  mean_abs = float(np.mean(err))
  mean_rel = float(np.mean(err / np.abs(x)))
  # REFERENCE.md: mean abs ~0.0085, mean rel ~0.015 (block 256, signed map).
  assert 0.0080 < mean_abs < 0.0090, mean_abs
  assert 0.013 < mean_rel < 0.017, mean_rel
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == x.shape
  assert q.absmax.dtype == jnp.float32 and q.absmax.shape == (1024,)
  # Nearest code: never off by more than half the widest gap of the map
  # (or, for -1, the distance to the signed map's end, -0.99296875).
  # 2e-6: float32 rounding of x, y and y - x.
  block_max = np.repeat(np.asarray(q.absmax), 256).reshape(x.shape)
  assert np.all(err <= (_worst_error(True) + 2e-6) * block_max)


def test_partial_last_block_zero_blocks_and_batch_dims():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, 75, 3)).astype(np.float32)  # 900 = 3*256 + 132
  x.reshape(-1)[256:512] = 0.0  # a whole zero block
  q = quantize(x)
  assert q.codes.shape == (4, 75, 3) and q.absmax.shape == (4,)
  flat = x.reshape(-1)
  np.testing.assert_array_equal(
      np.asarray(q.absmax),
      [np.abs(flat[i:i + 256]).max() for i in range(0, 900, 256)])
  assert float(q.absmax[1]) == 0.0
  y = np.asarray(dequantize(q))
  assert np.all(np.isfinite(y))
  assert np.all(y.reshape(-1)[256:512] == 0.0)
  assert np.all(np.asarray(q.codes).reshape(-1)[256:512] == 127)  # code of 0
  # Leading dimensions are just part of the flattened array.
  q_flat = quantize(flat)
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1),
                                np.asarray(q_flat.codes))
  np.testing.assert_array_equal(np.asarray(q.absmax), np.asarray(q_flat.absmax))


def test_unsigned_map_bfloat16_input_and_output_dtype():
  x = np.abs(np.random.default_rng(2).standard_normal(300, np.float32))
  x[:3] = -1.0  # the unsigned map stores negative values as 0
  x = x.astype(jnp.bfloat16)
  q = quantize(x, signed=False, block_size=128)
  y = dequantize(q, signed=False, block_size=128, dtype=jnp.bfloat16)
  assert y.dtype == jnp.bfloat16 and y.shape == (300,)
  y32 = np.asarray(dequantize(q, signed=False, block_size=128))
  assert y32.dtype == np.float32
  np.testing.assert_array_equal(y32[:3], 0.0)
  block_max = np.repeat(np.asarray(q.absmax), 128)[:300]
  err = np.abs(y32 - np.asarray(x, np.float32))
  assert np.all(err[3:] <= (_worst_error(False) + 2e-6) * block_max[3:])


ONES = np.ones(4, np.float32)


@pytest.mark.parametrize("bad", [0, -256, 2.5, True, "256", None])
def test_bad_block_size_raises(bad):
  with pytest.raises(ValueError, match="block_size"):
    qz.quantize(ONES, block_size=bad)
  with pytest.raises(ValueError, match="block_size"):
    qz.quantize_blockwise(ONES, qz.create_dynamic_map(), bad)
  with pytest.raises(ValueError, match="block_size"):
    qz.dequantize_blockwise(np.zeros(4, np.uint8), np.ones(1, np.float32),
                            qz.create_dynamic_map(), bad)


def test_bad_absmax_shape_and_code_map_raise():
  q = qz.QuantizedArray(np.zeros(600, np.uint8), np.ones(3, np.float32))
  with pytest.raises(ValueError, match="absmax must have shape"):
    qz.dequantize(q, block_size=128)
  with pytest.raises(ValueError, match="absmax must have shape"):
    qz.quantize(np.ones(600, np.float32), absmax=np.ones(2, np.float32))
  with pytest.raises(ValueError, match="sorted"):
    qz.quantize_blockwise(ONES, np.asarray(qz.create_dynamic_map())[::-1])
  with pytest.raises(ValueError, match="1-D map"):
    qz.quantize_blockwise(ONES, np.zeros((2, 256), np.float32))


def test_given_absmax_gives_the_same_codes_as_computed_absmax():
  x = np.random.default_rng(3).standard_normal((37, 53)).astype(np.float32)
  x[:2] = 0.0  # a zero block (block size 64)
  absmax = jax.jit(qz.block_abs_max, static_argnums=1)(x, 64)
  np.testing.assert_array_equal(
      absmax, np.abs(np.pad(x.reshape(-1), (0, 31 * 64 - x.size))).reshape(
          -1, 64).max(1))
  computed = jax.jit(lambda x: qz.quantize(x, block_size=64))(x)
  given = jax.jit(lambda x, a: qz.quantize(x, block_size=64, absmax=a))(
      x, absmax)
  np.testing.assert_array_equal(given.codes, computed.codes)
  np.testing.assert_array_equal(given.absmax, computed.absmax)


def _with_non_finite(signed):
  """Three blocks of 256: NaN and both infinities in block 0, a NaN in
  block 1 (whose finite values are tiny), block 2 clean; and the same
  values with the non-finite ones set to 0."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal(768).astype(np.float32)
  if not signed:
    x = np.abs(x)
  x[256:512] *= 1e-30
  clean = x.copy()
  x[[3, 200, 77, 300]] = [np.inf, -np.inf, np.nan, np.nan]
  clean[[3, 200, 77, 300]] = 0.0
  return x, clean


@pytest.mark.parametrize("signed", [True, False])
def test_non_finite_entries_stay_and_spoil_nothing_else(signed):
  x, clean = _with_non_finite(signed)
  q, q_clean = quantize(x, signed=signed), quantize(clean, signed=signed)
  y = np.asarray(dequantize(q, signed=signed))
  y_clean = np.asarray(dequantize(q_clean, signed=signed))
  # Each non-finite entry decodes to itself, on both maps.
  assert y[3] == np.inf and y[200] == -np.inf
  assert np.isnan(y[77]) and np.isnan(y[300])
  # Their blocks keep the largest finite magnitude, marked by the sign bit.
  absmax = np.asarray(q.absmax)
  np.testing.assert_array_equal(np.abs(absmax), np.asarray(q_clean.absmax))
  np.testing.assert_array_equal(np.signbit(absmax), [True, True, False])
  # The other entries decode as without the non-finite values, up to the
  # three codes set aside next to 0 (values below 2e-5 of the block maximum).
  others = np.ones(768, bool)
  others[[3, 200, 77, 300]] = False
  assert np.all(np.isfinite(y[others]))
  block_max = np.repeat(np.asarray(q_clean.absmax), 256)
  tiny = np.abs(clean) < 2e-5 * block_max
  np.testing.assert_array_equal(y[others & ~tiny], y_clean[others & ~tiny])
  assert np.all(np.abs(y - y_clean)[others & tiny] <= 2e-5 * block_max[
      others & tiny])
  # A clean block is coded exactly as without its neighbours' NaN and inf.
  np.testing.assert_array_equal(np.asarray(q.codes)[512:],
                                np.asarray(q_clean.codes)[512:])


def test_a_block_of_only_non_finite_values():
  x = np.array([np.nan, np.inf, -np.inf, np.inf], np.float32)
  q = quantize(x, signed=False, block_size=64)
  assert np.signbit(np.asarray(q.absmax)).all() and q.absmax[0] == 0.0
  y = np.asarray(dequantize(q, signed=False, block_size=64))
  np.testing.assert_array_equal(y, x)  # NaN == NaN for assert_array_equal


def test_a_map_without_room_for_non_finite_codes_raises():
  with pytest.raises(ValueError, match="at least 4 values above"):
    qz.quantize_blockwise(ONES, np.linspace(-1, 1, 7, dtype=np.float32))


def test_block_larger_than_the_array_costs_what_the_array_does():
  """A block size far beyond the array's size: one block of the array's own
  size, the same result, and memory in proportion to the array."""
  x = np.random.default_rng(6).standard_normal((4, 8)).astype(np.float32)
  huge = 2**30

  def round_trip(x, block_size):
    q = qz.quantize(x, block_size=block_size)
    return q, qz.dequantize(q, block_size=block_size)

  compiled = jax.jit(round_trip, static_argnums=1).lower(x, huge).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 2**16
  (q, y), (q32, y32) = compiled(x), jax.jit(round_trip,
                                            static_argnums=1)(x, 32)
  assert q.absmax.shape == (1,)
  for a, b in ((q.codes, q32.codes), (q.absmax, q32.absmax), (y, y32)):
    np.testing.assert_array_equal(a, b)
