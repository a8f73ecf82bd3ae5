"""The embedded default: text every machine has (the stdlib's source, generated arithmetic) and a small
trained MoE teacher built from it (shipped in ``assets/``); evaluated by :mod:`zeda_megatron.eval`."""
