"""RL fine-tuning of language models with a KL term: the trainer and what it is made of.

* ``config``         ``RLConfig``: every setting of a run, validated before any compute; YAML + ``--set``;
* ``losses``         advantages and policy losses, each a small pure function behind a registry;
* ``rollout``        sampling groups of responses with their log-probs (Hugging Face generate);
* ``vllm_backend``   the same with vLLM (optional, GPU only);
* ``checkpoints``    run identity, trainable state, save / load / latest, metrics truncation on resume, loading a
                     checkpoint for evaluation (``load_checkpoint_model``, ``evaluate_run``);
* ``runlock``        one process per run directory: a lock naming its holder, stale locks taken over;
* ``distributed``    data-parallel helpers (rank-sharded rollouts, gradient all-reduce);
* ``train``          the loop: resume, rollout, update, log, checkpoint;
* ``sweep``          a grid of runs from one YAML file, each trained and evaluated once.

Layer: imports the core, ``kl_lib.files``, ``kl_lib.lm`` and ``kl_lib.tasks``; never ``kl_lib.study``.
"""
