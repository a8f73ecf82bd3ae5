"""ZEDA on stock Megatron-Core."""
