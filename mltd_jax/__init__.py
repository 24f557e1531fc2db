"""mltd_jax: Meta-Learning the Difference (Hou, Salazar, Polovets; TACL 2022) in JAX/Flax.

Modules: `models` (Flax GPT-2 with transformers' parameter names), `tarp` (task-adaptive reparameterization),
`meta` (inner loop and exact second-order meta-gradients), `losses`, `data` (task sources and episodes),
`train` (the phases: multitask pretraining, meta-training, meta-testing), `checkpoint` (Orbax).
"""

__version__ = "0.1.0"
