"""Loading and generating with a Hugging Face causal LM (the embedded teachers and exported
students): imports nothing else of the package, so the corpus, the teacher build and the evaluation
(:mod:`zeda_megatron.eval`) all use it without an import cycle."""

from __future__ import annotations

import torch


def log_print(*a):
    print(*a, flush=True)


def load(hf_dir: str):
    """(model in eval mode, tokenizer); remote code allowed (PlusPlus null-expert exports)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32)
    return model.eval(), tok


@torch.no_grad()
def generate(model_or_dir, prompts: list[str], tok=None, max_new_tokens: int = 48, do_sample: bool = False,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 32, add_bos: bool = True) -> list[str]:
    """Continuations (text only) of ``prompts``; each prompt is fed as ``bos + prompt`` (left-padded;
    without bos when ``add_bos`` is False or the tokenizer has none)."""
    if isinstance(model_or_dir, str):
        model, tok = load(model_or_dir)
    else:
        model = model_or_dir
    outs = []
    torch.manual_seed(seed)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i: i + batch_size]
        bos = [tok.bos_token_id] if add_bos and tok.bos_token_id is not None else []
        ids = [bos + tok.encode(p, add_special_tokens=False) for p in chunk]
        n = max(len(x) for x in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        inp = torch.full((len(ids), n), pad, dtype=torch.long)
        att = torch.zeros((len(ids), n), dtype=torch.long)
        for j, x in enumerate(ids):
            inp[j, n - len(x):] = torch.tensor(x, dtype=torch.long)
            att[j, n - len(x):] = 1
        kw = dict(do_sample=True, temperature=temperature, top_k=0) if do_sample else dict(do_sample=False)
        gen = model.generate(input_ids=inp, attention_mask=att, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=tok.eos_token_id, **kw)
        for j in range(len(ids)):
            outs.append(tok.decode(gen[j, n:], skip_special_tokens=True))
    return outs
