"""mltd_jax: Meta-Learning the Difference (Hou, Salazar, Polovets; TACL 2022) in JAX/Flax.

Modules: `models` (model families, GPT-2 and T5, with transformers' parameter names), `tarp` (task-adaptive
reparameterization), `meta` (one adaptation function and exact second-order meta-gradients over an injected
loss), `decode` (greedy and beam search with a key/value cache), `losses`, `data` (task sources, encoders,
episodes), `evaluate` (meta-testing), `train` (the phases: multitask pretraining, meta-training, meta-testing),
`checkpoint` (Orbax), `hostmem` (host memory of XLA:CPU processes: trim, huge pages).
"""

__version__ = "0.1.0"
