"""The plain training step of the PyTorch peer's model: forward+backward+Adam of transformers' GPT-2 over the
tokens of one meta-step, with the peer's settings (its flags). One JSON line, comparable to
``benchmarks/meta_step.py --mode fwdbwd``: the practical limit of the framework on this machine, against which the
meta-step's own ratio (second order / fwd+bwd) is read.

  python benchmarks/torch_fwdbwd.py --inner 4 [--attn eager|sdpa]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import transformers


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  flags = dict(layers=4, d=256, heads=4, vocab=4096, seq=128, tasks=4, shots=4, inner=4, steps=5, threads=2)
  for k, v in flags.items():
    p.add_argument(f"--{k}", type=int, default=v)
  p.add_argument("--attn", default="eager", choices=("eager", "sdpa"))
  a = p.parse_args()
  torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(
    n_layer=a.layers, n_embd=a.d, n_head=a.heads, vocab_size=a.vocab, n_positions=a.seq,
    attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
  )  # fmt: skip
  cfg._attn_implementation = a.attn
  model = transformers.GPT2LMHeadModel(cfg).train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-4)
  n = a.tasks * (a.inner + 1) * a.shots  # sequences of one meta-step

  def step(ids):
    opt.zero_grad()
    model(ids, labels=ids).loss.backward()
    opt.step()

  step(torch.randint(0, a.vocab, (n, a.seq)))  # warm-up
  times = []
  for _ in range(a.steps):
    ids = torch.randint(0, a.vocab, (n, a.seq))
    t0 = time.perf_counter()
    step(ids)
    times.append(time.perf_counter() - t0)
  med = sorted(times)[len(times) // 2]
  row = {"impl": "torch", "mode": "fwdbwd", "attn": a.attn, "inner": a.inner, "median_step_s": round(med, 4)}
  row["tokens_per_s"] = round(n * a.seq / med, 1)
  row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
  print(json.dumps(row))


if __name__ == "__main__":
  main()
