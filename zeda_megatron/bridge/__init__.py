"""Hugging Face <-> megatron-core checkpoints for qwen3_moe and glm4_moe_lite, with null experts.

See README.md in this folder: ``import_hf`` (HF -> this rank's megatron model, optional null-expert
injection), ``export_hf`` (megatron model, any layout -> HF directory, stock or "++" with shipped
modeling code), ``checkpoint`` (the distributed checkpoints of tools/convert_hf.py and
tools/export_hf.py, and training runs' checkpoint folders), ``ds_weights`` (the student weights an
``engine=deepspeed`` run saves beside DeepSpeed's own files). The mapping is our own: Megatron-Bridge needs Python 3.12 and
transformers<=5.12.1 and does not install here.
"""
