"""Per-layer (layer-wise) updates: each gradient is consumed in the backward pass.

``galore_torch``'s per-layer mode steps one optimizer per parameter from a
post-accumulate-grad hook, so a parameter's gradient is freed right after its
update and the full gradient never exists at once; that is how GaLore trains
LLaMA-7B in 22 GB. ``make_layerwise_step`` is the JAX equivalent: from a loss
function and any optax transformation it builds one jit-compiled train step

    params, opt_state, loss = step(params, opt_state, batch)

in which every parameter leaf passes through an identity ``jax.custom_vjp``
"hook". The hook's backward rule receives the leaf's gradient, runs the
optimizer for that leaf alone and returns, as cotangents, the *new* parameter
and the *new* optimizer state of the leaf, so ``jax.grad`` of the hooked loss
with respect to ``(params, opt_state)`` is the updated ``(params,
opt_state)``. Each gradient is consumed as soon as the backward pass has made
it; XLA is free to reuse its memory for the rest of the backward pass, and
with ``donate=True`` the new parameters and states are written into the
buffers of the old ones.

State. Every leaf (or, for ``per_layer`` leaves, every layer slice of a leaf)
has its own optimizer state, ``tx.init`` of a tree in which all other leaves
are ``optax.MaskedNode()``; the tree keeps its structure so name-based labels
(``optax.partition``, ``galore_labels``) see the real paths. Cotangents must
be floating point, so each leaf's state is stored *packed*: floating leaves
as they are, 32-bit integers bit-cast to float32, 16-bit ones to float16,
8-bit codes (8-bit moments and projectors) four to a float32 along the last
axis. Packing is a bit-cast, never arithmetic, so every bit pattern survives
(NaN payloads included; tested), and only its arrays are kept, as a flat
tuple (``pack_leaves``): the tree's structure, as large as the parameter
tree's, is static (unflattening 22,575 nodes after every LLaMA-60M step
cost 0.3 s of Python). ``LayerwiseStep.unpack_state`` gives the ordinary
optax states back.

What the step supports:

* ordinary (unrolled) models: each leaf is updated as soon as its gradient is
  complete (a leaf used several times is updated once, with the sum). Run
  each layer through ``call_layer(f, carry, layer_params, *args)`` (the
  plain call outside a layer-wise step) and its products through
  ``dense(x, kernel)``: the layer is recomputed when its output gradient
  arrives, and each kernel is updated inside its product's backward rule,
  after the input gradient that reads it and before the next product's
  weight gradient is made, so a layer's weight gradients exist one at a
  time. Without ``call_layer`` XLA (checked on CPU) keeps a copy of every
  donated weight for the whole step. Likewise ``embedding_lookup(table,
  ids)`` for embeddings, whose gradient is created only when it arrives
  (one row block at a time for a ``row_chunks`` or int8 table);
* int8 weights: ``weight_quantization.QuantizedWeight`` leaves of
  ``params`` are dequantised to ``weight_dtype`` for the model and the
  optimizer, and each is rounded back inside the backward pass
  (``weight_quantization.apply_update``; stochastic with
  ``fold_in(key, i)`` for the i-th int8 leaf when the step gets ``key``,
  as ``weight_quantization.apply_updates``). Inside ``call_layer`` the
  layer dequantises them itself (forward and recomputation), so no
  dequantised weight is kept from the forward to the backward pass;
  ``embedding_lookup`` dequantises only the looked-up rows and ``dense``
  the kernel inside the product. int8 leaves cannot be ``per_layer``;
* ``dense(x, kernel)``: the kernel's gradient ``x^T dy`` is made inside the
  kernel's update, one row block at a time for a ``row_chunks`` leaf (a
  large head never has its whole gradient in memory);
* fused low-rank kernel gradients (``fused=True``): between refreshes a
  kernel that ``dense`` multiplies and ``galore_project`` projects gets its
  low-rank gradient made from the product's inputs, ``(x P)^T dy`` or
  ``x^T (dy Q)`` (``galore_optax.gradient_supply``), never its ``m x n``
  gradient; updates that refresh its projector make the full gradient, the
  choice being made inside the compiled step. Fira and APOLLO (which use
  the full gradient), ``moments="project"``/``"reset"``, ``matrix_axes``
  views and stacked leaves take the full gradient as without ``fused``.
  With ``clip_norm``, the low-rank gradient is clipped by its own norm;
  with accumulation, the accumulated low-rank mean goes to the optimizer
  as it is (the unfused step back-projects it and the optimizer projects
  it again: the same for orthonormal projectors, to rounding). The same
  for ``scan_layers`` stacks whose layer function closes over no traced
  value (pass those as ``scan_layers``' ``args``);
* scanned layer stacks as written (``nnx.scan``/``lax.scan`` over stacked
  weights): correct, the stacked leaf is hooked as a whole, so its gradient is
  the full stacked gradient before its update (no per-layer memory saving for
  that leaf);
* scanned layer stacks with per-layer memory: name the stacked leaves in
  ``per_layer`` and run the stack with ``scan_layers(f, carry, layers)`` in
  the loss instead of ``lax.scan``; the layer gradients are then consumed
  one layer at a time inside the reverse loop, whose parameters and states
  are updated in place. ``scan_layers`` recomputes each layer's forward pass
  in the backward loop (activation checkpointing per layer). Outside a
  layer-wise step ``scan_layers`` is a plain ``lax.scan``.
* any optax transformation whose update of a leaf depends only on that leaf
  (``optax.adamw``, ``adamw_8bit``, ``galore_adamw``, ``galore_adamw_8bit``,
  ``galore_adafactor``, LAMB's per-leaf trust ratio, ...). A transformation
  that couples leaves (e.g. ``optax.clip_by_global_norm`` inside ``tx``) is
  computed per leaf, which changes its meaning. ``galore_project``'s
  ``stagger_refresh`` and the randomized projector's keys depend on a leaf's
  position among all projected leaves, which a per-leaf state does not know:
  every leaf refreshes in the same step (as without staggering) and the
  randomized method draws the keys of the first leaf; exact-SVD results are
  unaffected, and so are random projectors (APOLLO's), keyed by the leaf's
  name.
* sharded parameters: the step is ordinary jitted JAX; shardings propagate as
  in a normal step (the packing keeps every axis but the last).

Clipping (``clip_norm``): a global norm cannot be known before the backward
pass ends, so each *leaf's* gradient (each layer slice's for ``per_layer``
leaves) is clipped on its own: ``g <- g * min(1, clip_norm / ||g||_2)`` with
``||g||_2`` the Frobenius norm of that leaf's full gradient from the current
micro-batch, before accumulation and projection. It equals
``optax.chain(clip_by_leaf_norm(clip_norm), tx)`` in an ordinary step.

Gradient accumulation (``accumulate_steps=k``): each call is one micro-batch;
parameters change on every k-th call. Leaves that ``galore_project`` projects
accumulate the *projected* gradient (low-rank shape), the others the full
gradient (Fira and APOLLO, which use the full gradient too, accumulate it
at full size), as a running mean in ``accumulate_dtype`` (float32, as
``optax.MultiSteps``). On a window that starts with a projector refresh, the
refresh is run on the first micro-batch's gradient (by the optimizer itself,
so method and storage are the optimizer's), every micro-batch of the window
is projected with that new projector, and the optimizer's own refresh at the
end of the window sees the accumulated gradient, which lies in that subspace
(so it returns the same subspace, rotated to the accumulated gradient's
singular vectors). Without refreshes this equals ``optax.MultiSteps(tx, k)``
to float32 rounding; with refreshes MultiSteps uses the window's mean
gradient for the SVD, which only exists at full size.

Requirements and limits: parameters must be floating point; the loss must
be a scalar; a ``per_layer`` leaf must reach the loss only through one
``scan_layers`` call; leaves the loss does not use are updated with a zero
gradient (as optax would). The per-leaf hooks trace ``tx.update`` once per
leaf, so tracing time grows with the number of leaves.

Where each piece lives: ``primitives`` (the public ``call_layer``,
``dense``, ``embedding_lookup`` and ``scan_layers``, the leaf hook and
their ``jax.custom_vjp`` wiring), ``context`` (the trace-time context that
the primitives consult, with their backward rules as its methods),
``scan`` (the scanned-stack path), ``layout`` (static facts about a
parameter tree), ``packing`` (``pack_state``/``unpack_state`` and the state
containers), ``unit_update`` (the update of one leaf, layer slice or block
of rows: clipping, accumulation, ``tx``), ``options`` and ``step``
(``make_layerwise_step``).

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", ICML 2024, arXiv 2403.03507 (per-layer weight updates).
  Lv et al., "Full Parameter Fine-tuning for Large Language Models with
  Limited Resources" (LOMO), 2023, arXiv 2306.09782 (fused update in the
  backward pass).
"""

from galore_optax.layerwise.options import PerLayerSpec
from galore_optax.layerwise.packing import LayerwiseState
from galore_optax.layerwise.packing import LeafState
from galore_optax.layerwise.packing import pack_leaves
from galore_optax.layerwise.packing import pack_state
from galore_optax.layerwise.packing import unpack_leaves
from galore_optax.layerwise.packing import unpack_state
from galore_optax.layerwise.primitives import DENSE_OUTPUT
from galore_optax.layerwise.primitives import KEEP_DENSE_OUTPUTS
from galore_optax.layerwise.primitives import call_layer
from galore_optax.layerwise.primitives import dense
from galore_optax.layerwise.primitives import embedding_lookup
from galore_optax.layerwise.primitives import scan_layers
from galore_optax.layerwise.step import LayerwiseStep
from galore_optax.layerwise.step import make_layerwise_step
from galore_optax.layerwise.unit_update import clip_by_leaf_norm

__all__ = (
    "DENSE_OUTPUT",
    "KEEP_DENSE_OUTPUTS",
    "LayerwiseState",
    "LayerwiseStep",
    "LeafState",
    "PerLayerSpec",
    "call_layer",
    "clip_by_leaf_norm",
    "dense",
    "embedding_lookup",
    "make_layerwise_step",
    "pack_leaves",
    "pack_state",
    "scan_layers",
    "unpack_leaves",
    "unpack_state",
)
