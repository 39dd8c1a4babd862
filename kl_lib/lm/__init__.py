"""Language models: building, loading and evaluating the policies the RL trainer fine-tunes.

* ``presets``   named models (the tiny from-scratch Llama, SmolLM2 from its GGUF package, Qwen/Llama by hub name);
* ``models``    tokenizer and model construction, loading by path or preset, prompt encoding, LoRA setup;
* ``sft``       the supervised base model of the arithmetic study;
* ``evaluate``  greedy accuracy, pass@1 and pass@k of a model on a task's held-out splits.

Layer: imports the core, ``kl_lib.files`` and ``kl_lib.tasks``; never ``kl_lib.rl`` or ``kl_lib.study``.
"""
