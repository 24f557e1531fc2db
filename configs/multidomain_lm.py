"""MLtD on multi-domain language modelling with GPT-2 (paper section 4.3).

Default (paper scale, needs internet for the weights and a JSONL file of {"task": domain, "text": ...}):
  python -m mltd_jax.main --config=configs/multidomain_lm.py --workdir=runs/mdlm \
      --config.data.jsonl.path=/path/to/domains.jsonl
Tiny (offline, built-in synthetic facts family, 2-layer d=64 GPT-2; 3-7 min on 2 CPU cores):
  python -m mltd_jax.main --config=configs/multidomain_lm.py:tiny --workdir=runs/tiny
Expected on :tiny (README "Results" has the measured table): after K=5 steps the meta-trained model's query
perplexity is clearly below full fine-tuning of the multitask model and below TARP without meta-training.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.log_every = 50  # steps between metric lines (metrics.jsonl, TensorBoard, console)
  c.checkpoint_every = 200  # steps between Orbax checkpoints (and at each phase's end)
  c.keep_checkpoints = 2  # newest checkpoints kept per phase

  c.mesh = ml_collections.ConfigDict()  # devices and hosts (mltd_jax/sharding.py)
  c.mesh.tasks = -1  # devices on the tasks axis: a meta-batch's tasks are split over them (-1: all)
  c.mesh.model = 1  # devices on the model axis: > 1 shards parameters and optimizer state (FSDP, by shape)
  c.mesh.distributed = "auto"  # jax.distributed.initialize(): auto (TPU pod, SLURM, coordinator set) | on | off
  c.mesh.coordinator_address = ""  # explicit multi-host launch: host:port of process 0
  c.mesh.num_processes = 0  # explicit multi-host launch: number of processes (0: from the environment)
  c.mesh.process_id = -1  # explicit multi-host launch: this process's id (-1: from the environment)

  c.model = ml_collections.ConfigDict()
  c.model.name_or_dir = "gpt2-medium"  # hub name or save_pretrained dir; "" = a fresh model of `family`, size `init`
  c.model.family = "gpt2"  # model family of a fresh model (a loaded one's comes from its config.json)
  c.model.remat = False  # jax.checkpoint every transformer block (less memory, more compute)
  c.model.remat_policy = ""  # with remat: "" recomputes blocks whole; a jax.checkpoint_policies name (dots_saveable)
  c.model.allow_pickle = False  # accept pytorch_model.bin (only for trusted files)
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32; CPU: mltd_jax.matmul)
  # Dropout of a fresh model (a loaded one keeps config.json's rates); used in pretraining when > 0. Adaptation
  # (meta-training's inner loop and query, meta-testing) always runs deterministically.
  c.model.dropout = 0.0
  # The size of a fresh model, in its family's config field names.
  c.model.init = ml_collections.ConfigDict(dict(n_layer=2, n_embd=64, n_head=4, n_inner=256, n_positions=64))

  c.data = ml_collections.ConfigDict()
  c.data.source = "jsonl"  # facts | jsonl | adaptsum | tfds (personachat, personas: configs/personachat.py)
  c.data.tokenizer = "gpt2-medium"  # facts | bytes | tokenizer.json path | dir | hub name
  c.data.seq_len = 512  # causal LM: tokens per sequence, with bos (and eos); longer is an error unless truncate
  c.data.add_eos = True
  c.data.truncate = False
  c.data.source_len = 512  # seq2seq: source tokens per example, eos included
  c.data.target_len = 128  # seq2seq: target tokens per example, eos included
  c.data.jsonl = ml_collections.ConfigDict(
    dict(
      path="",
      kind="text",  # text: {"task", "text"} lines (causal LM) | pair: {"task", "source", "target"} lines (seq2seq)
      task_key="task",
      text_key="text",
      source_key="source",
      target_key="target",
      support_size=4,
      query_size=4,
      validation_tasks=(),
      test_tasks=(),
      eval_episodes=4,
    )
  )
  # AdaptSum in its published layout (https://github.com/TysonYu/AdaptSum): <root>/<domain>/{train,valid,test}.*
  c.data.adaptsum = ml_collections.ConfigDict(
    dict(
      root="",
      domains=("dialog", "email", "movie_review", "debate", "social_media", "science"),
      test_domain="science",  # held out: adapted on its low-resource train split, scored on its test split
      validation_domain="",  # "" = the test domain's low-resource valid split chooses the learning rate
      low_resource_dir="AdaptSum300sample",
      support_size=8,
      query_size=8,
      eval_episodes=4,
      mode="pair",  # pair: (document, summary) for seq2seq | text: documents for language modelling
      text_fields=("source",),  # mode text: which sides make the text
      max_examples=0,  # lines read per file (0 = all)
      eval_support_size=-1,  # held-out support examples: -1 = support_size, 0 = the whole low-resource train split
      eval_query_size=-1,  # held-out query examples: -1 = query_size, 0 = the whole valid / test split
    )
  )
  # TensorFlow Datasets prepared as array_record (`tfds build NAME --file_format=array_record`); one dataset per
  # domain, e.g. {"email": "aeslc", "dialog": "samsum"} with source_field {"email": "email_body", "dialog":
  # "dialogue"} (fields and splits: one string for all domains, or a dict per domain; dicts go in a config file).
  c.data.tfds = ml_collections.ConfigDict(
    dict(
      datasets={},
      source_field="document",
      target_field="summary",
      text_field="text",
      mode="pair",
      data_dir="",
      train_split="train",
      validation_split="validation",
      test_split="test",
      test_domain="",
      validation_domain="",
      support_size=8,
      query_size=8,
      eval_episodes=4,
      max_examples=0,
    )
  )
  c.data.facts = ml_collections.ConfigDict(
    dict(
      n_filler=30,
      n_subjects=40,
      n_objects=40,
      dirichlet_alpha=0.1,
      facts_per_task=8,
      facts_per_text=3,
      words_per_text=47,
      support_size=8,
      query_size=8,
      num_eval_tasks=20,
      mode="text",  # text (causal LM) | summary ((source, target) pairs for seq2seq)
    )
  )

  c.tarp = ml_collections.ConfigDict()
  c.tarp.kind = "dynamic"  # bilinear | kronecker | dynamic (paper's proposed kind)
  c.tarp.rank = 32  # r of U [C_in, r], V [C_out, r]
  c.tarp.targets = ""  # regex over Dense module paths that get a difference; "" = the family's default targets
  c.tarp.multiplicative = False  # also learn Phi1 = 1 + U1 V1^T
  c.tarp.kron_terms = 2  # kronecker: number of terms
  c.tarp.kron_n = 2  # kronecker: size of each H_k (divides every target's in and out size)
  c.tarp.sigma_hidden = 0  # dynamic: 0 = Sigma(x) a linear map of x (released code); > 0 = an MLP of this width
  c.tarp.dynamic_multiplicative = False  # dynamic + multiplicative: Phi1(x) = 1 + U1 Sigma1(x) V1^T (Eq. 3)
  c.tarp.init_scale = 0.02  # std of the Gaussian U (V starts at zero: no difference at init)

  # TAMS (paper section 2.2, mltd_jax/tams.py): a Gumbel-softmax controller picks, per task, one operation for each
  # edge of a DARTS-style cell added to every block's FFN sublayer. Its weights are the 'tams' collection.
  c.tams = ml_collections.ConfigDict()
  c.tams.enabled = False
  c.tams.ops = ("linear", "conv3", "conv5", "glu", "zero", "skip")  # candidate operations of every edge
  c.tams.width = 64  # the cell's width (d_model is projected down to it)
  c.tams.nodes = 3  # intermediate nodes (3: 9 edges)
  c.tams.hidden = 128  # the controller MLP's hidden units
  c.tams.tau = (10.0, 0.1, "exponential")  # Gumbel-softmax temperature (start, end, constant|linear|exponential|cosine)
  c.tams.anneal_steps = 2000  # outer steps over which tau goes from start to end (the meta-training length)
  c.tams.per_layer = False  # one architecture per block instead of one shared by all blocks
  c.tams.noise = True  # Gumbel noise in meta-training (False: straight-through hard argmax, the released code)
  c.tams.init_scale = 0.02  # std of the controller's output layer (near-uniform choices at first)
  # The inner loop and every meta-test method also adapt the cells' weights (the controller only in the outer
  # loop): train.py adapts "(?:<config.meta.fast_params>)|" + tams.FAST_REGEX (and likewise each
  # config.eval.methods regex); the config strings themselves are left as written.
  c.tams.adapt_cells = True
  c.tams.overhead_steps = 3  # meta-steps timed with and without TAMS before meta-training (0: no measurement)

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.steps = 0  # multitask LM steps on the meta-training tasks (0: start meta-training from the weights)
  c.pretrain.tasks_per_step = 8  # tasks per batch (all their support and query texts)
  c.pretrain.lr = 5e-5  # AdamW peak learning rate
  c.pretrain.warmup_steps = 100
  c.pretrain.weight_decay = 0.0

  c.meta = ml_collections.ConfigDict()
  c.meta.steps = 2000  # outer (meta) steps
  c.meta.tasks_per_step = 4  # tasks per meta-batch (vmapped, or task_chunk at a time)
  c.meta.task_chunk = 1  # tasks adapted in parallel (0 = all vmapped); fewer bounds memory, same result
  c.meta.inner_steps = 1  # T_in: inner steps on the support set per task
  c.meta.inner_lr = 5e-4  # inner learning rate
  c.meta.inner_optimizer = "adam"  # sgd (Algorithm 1) | adam (the paper's released setting)
  c.meta.outer_lr = 5e-5  # outer Adam learning rate (base model + difference init)
  c.meta.outer_warmup_steps = 0  # linear warmup of the outer rate from 0
  c.meta.outer_schedule = "constant"  # after warmup: constant | inverse_sqrt (rate * sqrt(warmup / step))
  c.meta.clip_grad_norm = 1.0  # outer gradient clipping
  c.meta.first_order = False  # True: FOMAML (no gradient through inner gradients)
  # jax.checkpoint the inner step (backward "autodiff"): memory flat in T_in (PERFORMANCE_LOG.md, earlier grid)
  c.meta.remat = True
  # how the inner loop is differentiated: auto (hvp for SGD) | hvp (hand-derived SGD backward, one Hessian-vector
  # product per step, only the fast variables kept per step) | autodiff (jax.grad through the scan; Adam needs it)
  c.meta.inner_backward = "auto"
  c.meta.support_chunks = 1  # split each inner step's support batch into chunks run in sequence (less memory)
  c.meta.inner_adam_eps_root = 1e-8  # Adam's eps_root in the differentiated inner loop (0 gives NaN; README)
  c.meta.fast_params = "^tarp/"  # regex of the variables the inner loop adapts ("^tarp/|ln_" adds layer norms)

  c.eval = ml_collections.ConfigDict()
  c.eval.adapt_steps = 5  # K: adaptation steps on each held-out task's support set
  c.eval.optimizer = "adam"  # adaptation optimizer at meta-test time (the inner loop's: sgd | adam)
  c.eval.lr_schedule = "constant"  # constant | linear (decays to 0 over adapt_steps, the paper's fine-tuning)
  c.eval.methods = {"tarp": "^tarp/", "full": "^params/"}  # name -> variables adapted at meta-test time
  c.eval.lr_grid = {"default": (1e-4, 3e-4, 1e-3, 3e-3), "full": (1e-5, 3e-5, 1e-4, 3e-4)}  # per method
  c.eval.tasks_per_batch = 1  # held-out tasks adapted at once (vmapped); raise on small models
  c.eval.metrics = ("query",)  # query: query-set perplexity; query_focus: of the tokens after focus_token
  c.eval.focus_token = ""  # the token whose successors query_focus scores
  c.eval.support_chunks = 1  # split each adaptation step's support batch into chunks run in sequence (less memory)
  c.eval.query_chunks = 1  # score each query batch in this many chunks (less memory; must divide the query size)
  c.eval.select_by = ("query",)  # metrics whose validation loss chooses the learning rate per k (one table each)
  # Decoding metrics (ROUGE, BLEU) of the test tasks' query outputs, before adaptation and after it at the (lr, k)
  # of the lowest validation loss (of select_by[0]); metrics () = no decoding.
  c.eval.decode = ml_collections.ConfigDict(
    dict(metrics=(), num_beams=4, max_new_tokens=64, length_penalty=1.0, batch_size=0)  # batch_size 0: a task at once
  )
  # Dialogue: a transformers NLI checkpoint (hub name or dir) for the C-score of responses against the persona
  # (mltd_jax/consistency.py; needs torch); "" skips it with one log line.
  c.eval.decode.nli_model = ""

  if arg == "tiny":
    tiny(c)
  elif arg == "adaptsum":
    adaptsum(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/multidomain_lm.py; use ':tiny', ':adaptsum' or nothing.")
  return c


def tiny(c: ml_collections.ConfigDict) -> None:
  """The offline variant: the synthetic facts family and a 2-layer d=64 GPT-2 (../shared/DESIGN.md)."""
  c.log_every = 50
  c.checkpoint_every = 100
  c.model.name_or_dir = ""
  c.data.source = "facts"
  c.data.tokenizer = "facts"
  c.data.seq_len = 48
  c.data.add_eos = False
  c.tarp.kind = "bilinear"
  c.tarp.rank = 4
  c.tarp.init_scale = 0.1
  c.pretrain.steps = 600
  c.pretrain.tasks_per_step = 8  # 128 sequences
  c.pretrain.lr = 3e-3
  c.pretrain.warmup_steps = 50
  c.meta.steps = 300
  c.meta.tasks_per_step = 4
  c.meta.inner_steps = 3
  c.meta.inner_lr = 1.0
  c.meta.inner_optimizer = "sgd"
  c.meta.outer_lr = 1e-3
  c.meta.task_chunk = 0  # all 4 tasks vmapped
  c.tams.width = 8  # d_model / 8, as the paper's 768 -> 64 (TAMS stays off unless config.tams.enabled=True)
  c.tams.hidden = 32
  c.tams.anneal_steps = 300  # = config.meta.steps
  c.eval.optimizer = "sgd"
  c.eval.lr_grid = {"default": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0), "full": (1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3)}
  c.eval.tasks_per_batch = 20
  c.eval.metrics = ("query", "query_focus")
  c.eval.focus_token = "is"  # the objects of the facts: what only adaptation can know
  c.eval.select_by = ("query", "query_focus")


def adaptsum(c: ml_collections.ConfigDict) -> None:
  """The paper's multi-domain LM protocol (Table 3) on AdaptSum's six domains' documents.

  GPT-2 is meta-trained on five domains' training documents (few-shot episodes, as above); the held-out domain
  (config.data.adaptsum.test_domain) is then fine-tuned on its whole low-resource training split for
  config.eval.adapt_steps full-batch Adam steps whose rate decays linearly (chunked to bound memory) and scored by
  perplexity on its whole test split (each document's first config.data.seq_len tokens: longer ones are cut, so
  the perplexity is over those tokens only): k = 0 is zero-shot, "full" is plain fine-tuning of the same model,
  "tarp" is MLtD's difference. The learning rate is chosen on the held-out domain's valid split. Command:
    python -m mltd_jax.main --config=configs/multidomain_lm.py:adaptsum --workdir=runs/mdlm_adaptsum \
        --config.data.adaptsum.root=AdaptSum/dataset --config.data.adaptsum.test_domain=debate
  (The default, K steps on a few texts per episode, stays the few-shot variant.)
  """
  c.data.source = "adaptsum"
  c.data.truncate = True  # documents longer than seq_len are cut
  c.data.adaptsum.mode = "text"
  c.data.adaptsum.text_fields = ("source",)
  c.data.adaptsum.eval_episodes = 1
  c.data.adaptsum.eval_support_size = 0  # the whole low-resource training split (AdaptSum300sample: 300 documents)
  c.data.adaptsum.eval_query_size = 0  # the whole valid / test split
  c.eval.lr_schedule = "linear"
  c.eval.optimizer = "adam"
  c.eval.adapt_steps = 10
  c.eval.support_chunks = 30  # 300 documents in chunks of 10 (must divide the split's size)
  c.eval.query_chunks = 1  # raise to a divisor of the test split's size when it does not fit memory
  c.eval.tasks_per_batch = 1
