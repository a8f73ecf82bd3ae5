"""Test helpers: tiny HF checkpoints built with transformers' own classes (no downloads), logits of
HF and megatron models, distributed import/export workers.

Weights are re-drawn (zeda_megatron.training.random_init.randomize_) at a scale where routing, norms
and biases all matter (the default HF init makes logits nearly flat, which would hide mapping
mistakes).
"""

from __future__ import annotations

import os

import torch

from zeda_megatron.bridge.hf_config import GLM, QWEN3
from zeda_megatron.training.random_init import randomize_  # noqa: F401 (re-exported for tests)

VOCAB = 128


def tiny_config(family: str, **overrides):
    from transformers import Glm4MoeLiteConfig, Qwen3MoeConfig

    if family == QWEN3:
        kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                  mlp_only_layers=[1], max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        kw.update(overrides)
        return Qwen3MoeConfig(**kw)
    if family == GLM:
        kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                  num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
                  v_head_dim=16, qk_nope_head_dim=16, n_shared_experts=1, routed_scaling_factor=1.8,
                  max_position_embeddings=256, rms_norm_eps=1e-5,
                  mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        kw.update(overrides)
        return Glm4MoeLiteConfig(**kw)
    raise ValueError(family)


def write_tokenizer(out_dir: str) -> None:
    """A tiny word-level fast tokenizer, so tokenizer files can be checked for copy-through."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "<eos>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(out_dir)


def make_tiny_hf(family: str, out_dir: str, seed: int = 0, tokenizer: bool = True, **overrides) -> str:
    """Build, randomise and save_pretrained a tiny model of ``family`` into ``out_dir``."""
    from transformers import Glm4MoeLiteForCausalLM, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    cls = Qwen3MoeForCausalLM if family == QWEN3 else Glm4MoeLiteForCausalLM
    model = cls(cfg).float().eval()
    randomize_(model, seed)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    if tokenizer:
        write_tokenizer(out_dir)
    return out_dir


def hf_logits(hf_dir: str, input_ids: torch.Tensor, trust_remote_code: bool = False) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    with torch.no_grad():
        return model(input_ids).logits


def mcore_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a single-stage (PP=1, TP=1) megatron GPTModel, [b, s, V]."""
    model.eval()
    b, s = input_ids.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)
    with torch.no_grad():
        return model(input_ids, pos, None)


def pipeline_logits(model, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Forward through a PP>1 model by hand (send/recv of the hidden states between stages);
    returns the logits on the last stage and None elsewhere. TP=1 only."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    model.eval()
    b, s = input_ids.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)
    rank, size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    h = model.config.hidden_size
    with torch.no_grad():
        if rank > 0:
            buf = torch.empty(s, b, h, dtype=model.config.params_dtype)
            dist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(buf)
        out = model(input_ids, pos, None)
        if rank < size - 1:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        return out


def dist_import_logits(rank, world, hf_dir, ep, pp, input_ids, null_kwargs, tp=1, ckpt_dir=None):
    """Worker: import ``hf_dir`` under TP/EP/PP on ``world`` gloo ranks; return the full-vocab
    logits (last stage, None elsewhere) and the checkpoint keys this rank read. With ``ckpt_dir``
    the model is also saved there as a megatron-core distributed checkpoint."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from zeda_megatron.bridge.import_hf import import_hf
    from zeda_megatron.distributed import init_parallel

    init_parallel(tp=tp, pp=pp, ep=ep)
    model, report = import_hf(hf_dir, **null_kwargs)
    logits = pipeline_logits(model, input_ids) if pp > 1 else mcore_logits(model, input_ids)
    if logits is not None and tp > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    if ckpt_dir is not None:
        from zeda_megatron.bridge.checkpoint import save_checkpoint

        save_checkpoint(model, ckpt_dir, hf_dir=hf_dir, seed=null_kwargs.get("seed"))
    return {"logits": logits, "read": report["read"]}


def dist_export(rank, world, ckpt_dir, out_dir, ep, pp, tp=1):
    """Worker: load a convert_hf checkpoint under TP/EP/PP and export it to ``out_dir``."""
    from zeda_megatron.bridge.checkpoint import assets_dir, load_checkpoint
    from zeda_megatron.bridge.export_hf import save_hf_pretrained
    from zeda_megatron.distributed import init_parallel

    init_parallel(tp=tp, pp=pp, ep=ep)
    model = load_checkpoint(ckpt_dir)
    save_hf_pretrained(model, out_dir, assets_dir=assets_dir(ckpt_dir))
    return sorted(model.state_dict().keys())


def read_hf_tensors(hf_dir: str) -> dict:
    """All tensors of an HF directory (single file or index), for comparisons in tests."""
    import json

    from safetensors.torch import load_file

    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for fname in files:
        out.update(load_file(os.path.join(hf_dir, fname)))
    return out
