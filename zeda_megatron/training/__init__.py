"""The distillation trainer (issue 4).

Infrastructure: ``data`` (tokenizer, JSONL datasets, deterministic resumable batches), ``metrics``
(metrics.jsonl, W&B, progress line), ``signals`` (SIGTERM/SIGUSR1 -> save and exit), ``validate``
(config checks before anything is built). The engine: ``engine`` and the lead's training core.
"""
