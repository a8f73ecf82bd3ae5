"""Teacher vs adapted student on held-out code and arithmetic, plus the student's null-expert routing.

``evaluate(teacher_dir, student_dir, out_dir=None, seed=0)`` returns (and writes ``summary.json``):
``teacher_nll``, ``student_nll`` (mean per-token NLL on held-out stdlib code, nats), ``kl_teacher_student``
(mean per-token KL(teacher||student)), ``kl_student_teacher``, ``teacher_arith_acc``,
``student_arith_acc`` (exact match of greedy generation on 2-digit add/sub), ``null_share_per_layer``,
``null_share`` (overall), ``expert_flops_removed`` (= routed null-slot share),
``expert_flops_removed_incl_shared`` (= share*K*F / (K*F + shared_F)), ``null_share_by_token_class``.

Routing is read by wrapping the ``route`` method of the PlusPlus MoE blocks (the remote code's
``Glm4MoeLitePlusPlusMoE.route`` / ``Qwen3MoePlusPlusSparseMoeBlock.route`` return
``(logits, weights, index)``; index >= E is a null slot). A stock model has no null slots (share 0).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import torch
import torch.nn.functional as F

from . import corpus

TOKEN_CLASSES = ("code_punctuation", "identifiers_keywords", "digits", "whitespace", "prose_other")


# ---- NLL helpers ------------------------------------------------------------------------------------
def _encode(tok, texts, max_len):
    out = []
    for t in texts:
        enc = tok(t, add_special_tokens=False, return_offsets_mapping=True)
        ids = [tok.bos_token_id] + list(enc["input_ids"])[: max_len - 1]
        offs = [(0, 0)] + [tuple(o) for o in enc["offset_mapping"]][: max_len - 1]
        out.append((ids, offs))
    return out


@torch.no_grad()
def _token_logprobs(model, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1].float()
    return F.log_softmax(logits, dim=-1)  # [n-1, V]: predictions for tokens 1..n-1


@torch.no_grad()
def heldout_nll(model, tok, texts: list[str], max_len: int = 256) -> float:
    """Mean per-token NLL (nats) of ``bos + text`` (bos not scored)."""
    model.eval()
    tot, n = 0.0, 0
    for ids, _ in _encode(tok, texts, max_len):
        lp = _token_logprobs(model, ids)
        tgt = torch.tensor(ids[1:])
        tot += -lp.gather(1, tgt[:, None]).sum().item()
        n += len(tgt)
    return tot / max(n, 1)


def unigram_nll(tok, train_texts: list[str], texts: list[str]) -> float:
    """NLL of ``texts`` under the add-one-smoothed unigram distribution of ``train_texts``' tokens."""
    c = Counter()
    for ids in tok(train_texts, add_special_tokens=False)["input_ids"]:
        c.update(ids)
    V = len(tok)
    total = sum(c.values()) + V
    tot, n = 0.0, 0
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        for i in ids:
            tot -= math.log((c[i] + 1) / total)
            n += 1
    return tot / max(n, 1)


# ---- arithmetic -----------------------------------------------------------------------------------
def arith_accuracy(model, tok, problems: list[dict], batch_size: int = 50) -> float:
    from .hf_model import generate

    outs = generate(model, [p["prompt"] for p in problems], tok=tok, max_new_tokens=6, batch_size=batch_size)
    ok = sum(o.split("\n")[0].strip() == p["answer"] for o, p in zip(outs, problems))
    return ok / max(len(problems), 1)


# ---- routing --------------------------------------------------------------------------------------
class RoutingRecorder:
    """Wraps ``route`` of every null-expert MoE block; records the chosen indices per call."""

    def __init__(self, model):
        self.blocks = [(n, m) for n, m in model.named_modules() if hasattr(m, "route") and hasattr(m, "num_zce")]
        self.records: dict[str, list[torch.Tensor]] = {n: [] for n, _ in self.blocks}
        self.num_real = {n: int(m.num_experts) for n, m in self.blocks}
        self._orig = []
        for name, m in self.blocks:
            orig = m.route

            def wrapped(x, _orig=orig, _name=name):
                out = _orig(x)
                self.records[_name].append(out[2].detach().clone())
                return out

            m.route = wrapped
            self._orig.append((m, orig))

    def clear(self):
        for v in self.records.values():
            v.clear()

    def remove(self):
        for m, _ in self._orig:
            del m.route  # back to the class method


def layer_index(name: str) -> int:
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p == "layers" and i + 1 < len(parts):
            return int(parts[i + 1])
    return -1


def char_class(text: str, prose: list[bool], a: int, b: int) -> str:
    s = text[a:b]
    if not s.strip():
        return "whitespace"
    core = s.strip()
    if core.isdigit():
        return "digits"
    if any(prose[a:b]):
        return "prose_other"
    if not any(ch.isalnum() or ch == "_" for ch in core):
        return "code_punctuation"
    if all(ch.isalnum() or ch == "_" for ch in core):
        return "identifiers_keywords"
    return "prose_other"


def _moe_sizes(cfg) -> tuple[int, int, int, int]:
    """(E, K, routed expert ffn F, shared ffn size)."""
    E = getattr(cfg, "n_routed_experts", None) or getattr(cfg, "num_experts", None)
    K = cfg.num_experts_per_tok
    Fm = cfg.moe_intermediate_size
    shared = Fm * int(getattr(cfg, "n_shared_experts", 0) or 0)
    return int(E), int(K), int(Fm), int(shared)


# ---- main entry -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(teacher_dir, student_dir, out_dir: str | None = None, seed: int = 0,
             n_chunks: int = 48, chunk_chars: int = 600, max_len: int = 256, n_arith: int = 200,
             threads: int | None = None, log=None) -> dict:
    """Compare ``student_dir`` (e.g. a PlusPlus export) with ``teacher_dir``; see the module docstring.
    Either may also be a ``(model, tokenizer)`` pair instead of a directory."""
    from .hf_model import load, log_print

    log = log or log_print
    if threads:
        torch.set_num_threads(threads)
    teacher, tok = load(teacher_dir) if isinstance(teacher_dir, str) else teacher_dir
    student, stok = load(student_dir) if isinstance(student_dir, str) else student_dir
    if len(stok) != len(tok):
        raise ValueError(f"tokenizers differ: teacher {len(tok)} tokens, student {len(stok)}")
    records = corpus.heldout_code_records(seed, n_chunks, chunk_chars)
    enc = _encode(tok, [r["text"] for r in records], max_len)
    rec = RoutingRecorder(student)
    t_nll = s_nll = kl_ts = kl_st = 0.0
    n_tok = 0
    E, K, Fm, shared = _moe_sizes(student.config)
    layer_null = Counter()
    layer_slots = Counter()
    cls_null = Counter()
    cls_slots = Counter()
    cls_tokens = Counter()
    for (ids, offs), r in zip(enc, records):
        rec.clear()
        lt = _token_logprobs(teacher, ids)
        ls = _token_logprobs(student, ids)
        tgt = torch.tensor(ids[1:])
        t_nll += -lt.gather(1, tgt[:, None]).sum().item()
        s_nll += -ls.gather(1, tgt[:, None]).sum().item()
        pt, ps = lt.exp(), ls.exp()
        kl_ts += (pt * (lt - ls)).sum().item()
        kl_st += (ps * (ls - lt)).sum().item()
        n_tok += len(tgt)
        classes = ["whitespace"] + [char_class(r["text"], r["prose_mask"], a, b) for a, b in offs[1:]]
        cls_tokens.update(classes[1:])
        for name, idx_list in rec.records.items():
            if not idx_list:
                continue
            idx = idx_list[-1]  # [T, K] for this sequence (one forward per chunk)
            null = idx >= rec.num_real[name]
            li = layer_index(name)
            layer_null[li] += int(null.sum())
            layer_slots[li] += null.numel()
            per_tok = null.sum(dim=1).tolist()
            for pos in range(1, min(len(per_tok), len(classes))):  # skip bos
                cls_null[classes[pos]] += per_tok[pos]
                cls_slots[classes[pos]] += idx.shape[1]
    rec.remove()
    layers = sorted(layer_slots)
    per_layer = {str(li): layer_null[li] / layer_slots[li] for li in layers}
    share = sum(layer_null.values()) / max(sum(layer_slots.values()), 1)
    by_class = {c: (cls_null[c] / cls_slots[c] if cls_slots[c] else None) for c in TOKEN_CLASSES}
    cls_tokens = {c: cls_tokens[c] for c in TOKEN_CLASSES}
    problems = corpus.arithmetic_problems(n_arith, seed)
    log("[eval] arithmetic (greedy generation)...")
    t_acc = arith_accuracy(teacher, tok, problems)
    s_acc = arith_accuracy(student, stok, problems)
    incl_shared = share * K * Fm / (K * Fm + shared)
    summary = dict(
        teacher_dir=os.path.abspath(teacher_dir) if isinstance(teacher_dir, str) else None,
        student_dir=os.path.abspath(student_dir) if isinstance(student_dir, str) else None,
        heldout_tokens=n_tok, heldout_chunks=len(records),
        teacher_nll=t_nll / n_tok, student_nll=s_nll / n_tok,
        nll_ratio=(s_nll / n_tok) / (t_nll / n_tok),
        kl_teacher_student=kl_ts / n_tok, kl_student_teacher=kl_st / n_tok,
        teacher_arith_acc=t_acc, student_arith_acc=s_acc, arith_problems=len(problems),
        num_experts=E, topk=K, moe_ffn=Fm, shared_ffn=shared,
        num_null_experts=int(getattr(student.config, "zce_nums", [0])[0] if getattr(student.config, "zce_nums", None) else 0),
        null_share=share, null_share_per_layer=per_layer,
        expert_flops_removed=share, expert_flops_removed_incl_shared=incl_shared,
        null_share_by_token_class=by_class, tokens_by_class=cls_tokens,
    )
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


# ---- a PlusPlus directory straight from a stock teacher (no training) ---------------------------------
def plusplus_from_teacher(teacher_dir: str, out_dir: str, num_null: int = 4, mask_null: bool = False,
                          null_bias: float = 0.0) -> str:
    """Write the stock HF teacher at ``teacher_dir`` as a null-expert ("++") HF directory with ``num_null``
    untrained null experts (router rows 0, expert bias ``null_bias`` for GLM), loadable with
    ``trust_remote_code=True``. With ``mask_null=True`` it computes exactly what the teacher computes.
    A baseline / test helper: no Megatron involved."""
    import shutil

    from safetensors.torch import load_file, save_file

    from zeda_megatron.bridge.export_hf import hf_config_dict
    from zeda_megatron.bridge.hf_config import GLM, model_info, read_config_json
    from zeda_megatron.bridge.remote_code import FILES, ROUTING_FILE

    info = model_info(read_config_json(teacher_dir))
    sd = {}
    for fn in sorted(os.listdir(teacher_dir)):
        if fn.endswith(".safetensors"):
            sd.update(load_file(os.path.join(teacher_dir, fn)))
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            Fm = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{pre}{e}.gate_proj.weight"] = v[e, :Fm].contiguous()
                out[f"{pre}{e}.up_proj.weight"] = v[e, Fm:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{pre}{e}.down_proj.weight"] = v[e].contiguous()
        elif k.endswith("mlp.gate.weight") and v.shape[0] == info.num_experts:
            out[k] = torch.cat([v, torch.zeros(num_null, v.shape[1], dtype=v.dtype)])
        elif k.endswith("mlp.gate.e_score_correction_bias"):
            out[k] = torch.cat([v.float(), torch.full((num_null,), float(null_bias))])
        else:
            out[k] = v
    if info.family == GLM:  # every GLM MoE layer needs the bias buffer
        for k in list(out):
            if k.endswith("mlp.gate.weight") and k.replace("weight", "e_score_correction_bias") not in out:
                out[k.replace("weight", "e_score_correction_bias")] = torch.cat(
                    [torch.zeros(info.num_experts), torch.full((num_null,), float(null_bias))])
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(info, num_null, mask_null=mask_null), f, indent=1)
    src = os.path.dirname(os.path.abspath(__import__("zeda_megatron.bridge.remote_code", fromlist=["x"]).__file__))
    for fn in FILES[info.family]:
        shutil.copy2(os.path.join(src, fn), os.path.join(out_dir, fn))
    shutil.copy2(ROUTING_FILE[1], os.path.join(out_dir, ROUTING_FILE[0]))
    for fn in os.listdir(teacher_dir):
        if fn.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy2(os.path.join(teacher_dir, fn), os.path.join(out_dir, fn))
    return out_dir
