"""sharding: which arrays are sharded over Explicit mesh axes.

One simulated device is enough for the queries (an axis of size 1 is still
an axis of the type); ``test_sharding.py`` runs the library on 8 devices.
"""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from galore_optax import sharding


def _mesh(axis_type):
  return jax.make_mesh((1,), ("x",), axis_types=(axis_type,))


def test_unsharded_and_replicated_arrays_are_not_explicitly_sharded():
  x = jnp.ones((4, 3))
  assert sharding.explicit_sharding(x) is None
  assert not sharding.is_explicitly_sharded(x)
  replicated = jax.device_put(x, NamedSharding(_mesh(AxisType.Explicit), P()))
  assert sharding.explicit_sharding(replicated) is None
  assert not sharding.is_explicitly_sharded(replicated)


def test_auto_axes_do_not_show_in_the_type():
  x = jax.device_put(jnp.ones((4, 3)),
                     NamedSharding(_mesh(AxisType.Auto), P("x", None)))
  assert sharding.explicit_sharding(x) is None
  assert not sharding.is_explicitly_sharded(x)


def test_explicit_axes_give_the_sharding_also_under_jit():
  x = jax.device_put(jnp.ones((4, 3)),
                     NamedSharding(_mesh(AxisType.Explicit), P(None, "x")))
  found = sharding.explicit_sharding(x)
  assert isinstance(found, NamedSharding)
  assert tuple(found.spec) == (None, "x")
  assert sharding.is_explicitly_sharded(x)
  seen = []

  @jax.jit
  def f(a):
    seen.append((sharding.is_explicitly_sharded(a),
                 tuple(sharding.explicit_sharding(a).spec)))
    return a

  f(x)
  assert seen == [(True, (None, "x"))]


def test_with_sharding_of_gives_the_type_of_like():
  mesh = _mesh(AxisType.Explicit)
  sharded = jax.device_put(jnp.ones((4, 3)), NamedSharding(mesh, P("x", None)))
  replicated = jax.device_put(jnp.ones((4, 3)), NamedSharding(mesh, P()))
  plain = jnp.ones((4, 3))
  assert sharding.with_sharding_of(plain, plain) is plain
  seen = []

  @jax.jit
  def f(a, b):
    # A mask sharded like a gradient shards what it selects from.
    merged = jnp.where(a[:, :1] > 0, b, b)
    seen.append((tuple(jax.typeof(merged).sharding.spec),
                 tuple(jax.typeof(sharding.with_sharding_of(merged, b))
                       .sharding.spec),
                 tuple(jax.typeof(sharding.with_sharding_of(b, a))
                       .sharding.spec)))
    return a

  with jax.set_mesh(mesh):
    f(sharded, replicated)
  assert seen == [(("x", None), (None, None), ("x", None))]
