"""Evaluation of an adapted model against its teacher, one library for the embedded demo, the
``python -m zeda_megatron.evaluate`` command, ``tools/bench_quality.py`` and the lm-eval harness:

* :mod:`.data`: the held-out sets (stdlib code chunks with token classes, arithmetic problems);
* :mod:`.models`: loading HF directories, exporting checkpoints (through the bridge), the null-expert
  blocks and the compute dial, the teacher as a PlusPlus directory;
* :mod:`.scoring`: routing counters, NLL, KL, arithmetic, one model's figures, the dial sweep,
  calibration to a null share;
* :mod:`.baselines`: static top-k', top-p, XMoE threshold, trained null-expert models, at matched
  expert FLOPs;
* :mod:`.report`: Markdown tables, the adaptation report and its figures;
* :mod:`.harness`: lm-evaluation-harness on exported models, with the run's null share.
"""
