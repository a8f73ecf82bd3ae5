"""The distillation trainer.

One concern per module: ``engine`` (the engine interface, its megatron and DeepSpeed implementations,
``build_engine``), ``build`` (teacher + student, the megatron DDP and optimizer, the one LR scheduler),
``ds_engine`` (DeepSpeed's engine around the student), ``offload`` (grad buffers and optimizer state
off the device while sampling), ``distill`` (the co-located student/teacher module and the last stage's
loss), ``stages`` (what each step trains on: the dataset's batches, or the live student's samples of its
prompts), ``step`` (batches onto the device, padded for the layout; the pipeline schedule; one
optimizer step), ``rollout`` (stage 2's KV-cached sampler under the training layout, routing recorded
while sampling for router replay), ``moe_metrics`` (null share, expert FLOPs removed, group loss),
``checkpoint`` (iteration folders, resume, ``trainer.keep_checkpoints`` retention), ``metrics``
(metrics.jsonl, W&B, progress line), ``signals`` (SIGTERM/SIGUSR1 -> save and exit), ``validate``
(config checks before anything is built), ``random_init`` (random-init HF teachers for test models),
the data modules (``data`` and its split).
"""
