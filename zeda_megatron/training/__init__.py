"""The distillation trainer.

One concern per module: ``build`` (teacher + student, DDP, optimizer, scheduler -> ``Engine``),
``distill`` (the co-located student/teacher module and the last stage's loss), ``step`` (batches onto
the device, padded for the layout; the pipeline schedule; one optimizer step), ``rollout`` (stage 2's
KV-cached sampler under the training layout, routing recorded while sampling for router replay;
grads and optimizer state off the device meanwhile), ``moe_metrics`` (null share, expert FLOPs
removed, group loss), ``checkpoint`` (with ``trainer.keep_checkpoints`` retention), ``metrics``
(metrics.jsonl, W&B, progress line), ``signals`` (SIGTERM/SIGUSR1 -> save and exit), ``validate``
(config checks before anything is built), ``random_init`` (random-init HF teachers for test models),
the data modules (``data`` and its split). ``engine`` re-exports the public API of
build/distill/step/moe_metrics.
"""
