"""The GaLore examples: a Flax NNX LLaMA, offline data, training, plots.

Importable as ``examples`` from the repository root (``python -m
examples.pretrain_llama``) and, once installed with ``pip install -e
".[examples]"``, as ``galore_optax_examples`` from anywhere (``from
galore_optax_examples import llama, data``); the modules import each other
relatively so that both names work.
"""
