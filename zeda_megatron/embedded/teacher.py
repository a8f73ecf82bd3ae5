"""A tiny *trained* MoE teacher built on this machine: GLM-4.7-Flash-shaped or Qwen3-MoE-shaped.

``build_teacher(out_dir, family="glm", preset="demo", seed=0)`` trains a byte-level BPE tokenizer
(``tokenizers``; digits split one per token so arithmetic is learnable) and a model with transformers'
own classes (``Glm4MoeLiteForCausalLM`` / ``Qwen3MoeForCausalLM``) on :mod:`.corpus` text with a plain
torch loop, then ``save_pretrained`` (safetensors) + the tokenizer. Deterministic for a seed (seeded
init, fixed thread count, seeded batch order). Cached: ``out_dir/.complete`` holds the settings hash;
a matching marker returns at once, deleting the directory rebuilds it.

The ``demo`` preset is a finished teacher (hours to build on a CPU core), so its seed-0 GLM build is
shipped in ``assets/`` with its recipe, hash and weights digest (``teacher_info.json``);
:func:`ensure_teacher` uses it unless asked to rebuild, ``tools/make_tiny_teacher.py --ship`` rebuilds it
with this script.

GLM's ``e_score_correction_bias`` is trained the aux-loss-free way (DeepSeek-V3 / GLM: after each
step, bias += rate * sign(mean load - expert load)), so the teacher arrives with a real expert bias.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time

import torch

from . import corpus
from .hf_model import log_print

VERSION = 3
MARKER = ".complete"
INFO = "teacher_info.json"
SHIPPED_THREADS = 1      # the shipped teacher's build: one thread (bitwise reproducible, and no spin-waiting
                         # OpenMP threads on a shared machine)
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
EOS = "<|endoftext|>"
PAD = "<|pad|>"

PRESETS = {
    # A finished teacher: ~33M tokens over 12M characters of stdlib code and 400k arithmetic lines, annealed
    # to 1% of its peak learning rate, long enough that more training on its own corpus no longer helps
    # (the saturation control in docs/quality.md). Hours on a CPU: shipped in assets/ (ensure_teacher).
    "demo": dict(vocab_size=1024, hidden=128, layers=3, heads=4, experts=16, topk=4, moe_ffn=64, dense_ffn=256,
                 seq_len=128, batch=16, steps=16000, lr=3e-3, warmup=300, min_lr_frac=0.01,
                 code_chars=12_000_000, arith_lines=400_000, eval_every=2000, max_train_seconds=None),
    # ~15 s: for tests; arithmetic-heavy so that even this size solves some problems
    "test": dict(vocab_size=512, hidden=96, layers=2, heads=2, experts=4, topk=2, moe_ffn=32, dense_ffn=128,
                 seq_len=64, batch=16, steps=500, lr=3e-3, warmup=10, code_chars=40_000,
                 arith_lines=40_000, min_lr_frac=0.1, eval_every=0, max_train_seconds=None),
}


# ---- tokenizer ------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (``tokenizers``), digits split individually; returns a PreTrainedTokenizerFast
    with ``<|endoftext|>`` as bos/eos and ``<|pad|>`` as pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False)


# ---- model configs --------------------------------------------------------------------------------
def model_config(family: str, p: dict, tok):
    vocab = len(tok)
    common = dict(vocab_size=vocab, hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                  num_attention_heads=p["heads"], intermediate_size=p["dense_ffn"],
                  moe_intermediate_size=p["moe_ffn"], num_experts_per_tok=p["topk"], hidden_act="silu",
                  max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, initializer_range=0.02, use_cache=True)
    if family == "glm":
        from transformers import Glm4MoeLiteConfig

        h = p["hidden"]
        cfg = Glm4MoeLiteConfig(
            **common, num_key_value_heads=p["heads"], q_lora_rank=h // 2, kv_lora_rank=h // 4,
            qk_nope_head_dim=max(8, h // (2 * p["heads"])), qk_rope_head_dim=max(8, h // (2 * p["heads"])),
            v_head_dim=h // p["heads"], n_routed_experts=p["experts"], n_shared_experts=1,
            routed_scaling_factor=1.8, n_group=1, topk_group=1, norm_topk_prob=True,
            mlp_layer_types=["dense"] + ["sparse"] * (p["layers"] - 1),
        )
        cfg.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if hasattr(cfg, "num_nextn_predict_layers"):
            cfg.num_nextn_predict_layers = 0
        return cfg
    if family == "qwen3":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            **common, num_key_value_heads=max(1, p["heads"] // 2), head_dim=p["hidden"] // p["heads"],
            num_experts=p["experts"], norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0],
            router_aux_loss_coef=1e-2, output_router_logits=False, use_sliding_window=False,
        )
    raise ValueError(f"family={family!r}: 'glm' or 'qwen3'")


def settings_hash(family: str, preset: str, seed: int, overrides: dict | None = None,
                  threads: int | None = None) -> str:
    """The teacher's recipe identity (what the build does, not where: the local stdlib's path is left
    out so that the shipped weights serve every machine; :func:`stdlib_digest` is recorded beside it).
    ``threads``: the build's thread count when the caller pins it (the trained weights differ bitwise
    between 1 and 2 threads)."""
    p = dict(PRESETS[preset], **(overrides or {}))
    ident = {"v": VERSION, "family": family, "preset": preset, "seed": seed, "p": p}
    if threads is not None:
        ident["threads"] = int(threads)
    blob = json.dumps(ident, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stdlib_digest() -> str:
    """Digest of the local stdlib's file list and sizes: the corpus (and the held-out split) a build saw."""
    root = corpus.stdlib_root()
    blob = json.dumps([(f, os.path.getsize(os.path.join(root, f))) for f in corpus.stdlib_files()])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_digest(out_dir: str) -> str:
    h = hashlib.sha256()
    with open(os.path.join(out_dir, "model.safetensors"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_built(out_dir: str, family: str = "glm", preset: str = "demo", seed: int = 0, overrides=None) -> bool:
    m = os.path.join(out_dir, MARKER)
    if not os.path.isfile(m):
        return False
    with open(m) as f:
        return json.load(f).get("hash") == settings_hash(family, preset, seed, overrides)


# ---- training -------------------------------------------------------------------------------------
def _token_stream(tok, docs: list[str]) -> torch.Tensor:
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    flat = []
    for x in ids:
        flat.append(tok.eos_token_id)
        flat.extend(x)
    return torch.tensor(flat, dtype=torch.long)


def _moe_gates(model):
    from torch import nn

    return [m for m in model.modules() if hasattr(m, "e_score_correction_bias") and isinstance(m, nn.Module)]


def _progress(model, tok, texts: list[str], problems: list[dict], max_len: int) -> dict:
    """Held-out NLL and arithmetic exact match mid-training (the saturation curve); leaves the model in
    train mode and every random stream as it found it."""
    from zeda_megatron.eval.scoring import arith_accuracy, heldout_nll

    state = torch.get_rng_state()
    model.eval()
    try:
        return dict(heldout_nll=heldout_nll(model, tok, texts, max_len=max_len),
                    arith_acc=arith_accuracy(model, tok, problems))
    finally:
        model.train()
        torch.set_rng_state(state)


def build_teacher(out_dir: str, family: str = "glm", preset: str = "demo", seed: int = 0,
                  overrides: dict | None = None, threads: int | None = None, log=None) -> dict:
    """Train (or reuse) the tiny teacher at ``out_dir``; returns the info dict stored in the marker
    (``hash``, ``train_seconds``, ``final_loss``, ``heldout_nll``, ``random_nll``, ``unigram_nll``,
    ``curve``: held-out NLL and arithmetic every ``eval_every`` steps, ``weights_sha256``...)."""
    log = log or log_print
    h = settings_hash(family, preset, seed, overrides, threads)
    marker = os.path.join(out_dir, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            info = json.load(f)
        if info.get("hash") == h:
            info["cached"] = True
            return info
        log(f"[teacher] {out_dir}: settings changed, rebuilding")
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    from transformers import Glm4MoeLiteForCausalLM, Qwen3MoeForCausalLM

    from zeda_megatron.eval.scoring import heldout_nll, unigram_nll

    p = dict(PRESETS[preset], **(overrides or {}))
    t0 = time.time()
    old_threads = torch.get_num_threads()
    n_threads = threads or min(2, os.cpu_count() or 1)
    torch.set_num_threads(n_threads)
    try:
        docs = corpus.training_texts(seed, code_chars=p["code_chars"], arith_lines=p["arith_lines"])
        tok = train_tokenizer(docs, p["vocab_size"])
        stream = _token_stream(tok, docs)
        cfg = model_config(family, p, tok)
        # transformers' default "grouped_mm" experts path is not bitwise reproducible on multi-threaded
        # CPU; the eager per-expert loop is (and as fast at this size). Not saved in config.json.
        cfg._experts_implementation = "eager"
        torch.manual_seed(seed)
        cls = Glm4MoeLiteForCausalLM if family == "glm" else Qwen3MoeForCausalLM
        model = cls(cfg).float()
        model.train()
        n_params = sum(x.numel() for x in model.parameters())
        log(f"[teacher] {family}/{preset}: {n_params/1e6:.2f}M params, {len(stream)/1e3:.0f}k train tokens, "
            f"vocab {len(tok)}, {p['steps']} steps")
        gates = _moe_gates(model)
        counts = {}

        def _hook(mod, inp, out):
            counts[id(mod)] = torch.bincount(out[2].reshape(-1), minlength=mod.e_score_correction_bias.numel())

        handles = [g.register_forward_hook(_hook) for g in gates]
        opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=(0.9, 0.95), weight_decay=0.01)
        g = torch.Generator().manual_seed(seed)
        L, B, steps = p["seq_len"], p["batch"], p["steps"]
        every = int(p.get("eval_every") or 0)
        curve_texts = corpus.heldout_code(seed, n_chunks=16)
        curve_problems = corpus.arithmetic_problems(200, seed)
        losses, curve = [], []
        t_loop = time.time()
        for step in range(steps):
            floor = p["min_lr_frac"]  # linear warmup, then cosine from the peak down to floor * peak
            lr = p["lr"] * min(1.0, (step + 1) / p["warmup"]) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / steps)))
            for grp in opt.param_groups:
                grp["lr"] = lr
            starts = torch.randint(0, len(stream) - L - 1, (B,), generator=g)
            batch = torch.stack([stream[s: s + L] for s in starts.tolist()])
            out = model(input_ids=batch, labels=batch)
            loss = out.loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():  # aux-loss-free expert-bias balancing
                for gt in gates:
                    c = counts.get(id(gt))
                    if c is not None:
                        c = c.float()
                        gt.e_score_correction_bias += 1e-3 * torch.sign(c.mean() - c)
            losses.append(loss.item())
            if every and ((step + 1) % every == 0 or step == steps - 1):
                point = dict(step=step + 1, train_loss=sum(losses[-every:]) / len(losses[-every:]),
                             **_progress(model, tok, curve_texts, curve_problems, L * 2))
                curve.append(point)
                log(f"[teacher] step {step + 1}: held-out NLL {point['heldout_nll']:.4f} (16 chunks), "
                    f"arithmetic {point['arith_acc']:.1%} (200 problems)")
            if step % max(1, steps // 10) == 0 or step == steps - 1:
                el = time.time() - t_loop
                eta = el / (step + 1) * (steps - step - 1)
                log(f"[teacher] step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s, ETA {eta / 60:.0f} min)")
            if p.get("max_train_seconds") and time.time() - t0 > p["max_train_seconds"]:
                log(f"[teacher] time budget reached at step {step}")
                break
        for hd in handles:
            hd.remove()
        model.eval()
        train_seconds = time.time() - t0
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
        # quick quality numbers (held-out code NLL vs a random model and a unigram model)
        texts = corpus.heldout_code(seed, n_chunks=16 if preset == "test" else 48)
        nll = heldout_nll(model, tok, texts, max_len=p["seq_len"] * 2)
        torch.manual_seed(seed + 1)
        rand = cls(cfg).float().eval()
        rnll = heldout_nll(rand, tok, texts, max_len=p["seq_len"] * 2)
        unll = unigram_nll(tok, docs, texts)
        info = dict(hash=h, family=family, preset=preset, seed=seed, settings=p, threads=n_threads,
                    n_params=n_params, train_tokens=len(stream), steps_done=len(losses),
                    train_seconds=round(train_seconds, 1), final_loss=sum(losses[-20:]) / len(losses[-20:]),
                    heldout_nll=nll, random_nll=rnll, unigram_nll=unll, curve=curve, version=VERSION,
                    python=platform.python_version(), torch=torch.__version__, stdlib_digest=stdlib_digest(),
                    weights_sha256=weights_digest(out_dir),
                    command=f"python tools/make_tiny_teacher.py --family {family} --preset {preset} --seed {seed} "
                            f"--threads {n_threads}")
        with open(os.path.join(out_dir, INFO), "w") as f:
            json.dump(info, f, indent=1)
        with open(marker, "w") as f:
            json.dump(info, f, indent=1)
        log(f"[teacher] done in {train_seconds:.0f}s: held-out NLL {nll:.3f} (random {rnll:.3f}, unigram {unll:.3f})")
        info["cached"] = False
        return info
    finally:
        torch.set_num_threads(old_threads)


# ---- the shipped teacher ------------------------------------------------------------------------------
def shipped_dir(family: str = "glm", preset: str = "demo", seed: int = 0) -> str:
    return os.path.join(ASSETS, f"teacher_{family}_{preset}_s{seed}")


def shipped_teacher(family: str = "glm", preset: str = "demo", seed: int = 0, log=None) -> dict | None:
    """The info of the teacher shipped in ``assets/`` for this recipe, or None when none ships (or
    its recipe is not this script's). A weights file that does not match its recorded digest is an
    error (a corrupted checkout or a partial download)."""
    log = log or log_print
    d = shipped_dir(family, preset, seed)
    path = os.path.join(d, INFO)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        info = json.load(f)
    if info.get("hash") != settings_hash(family, preset, seed, threads=info.get("threads")):
        log(f"[teacher] {d} was built by another recipe (hash {info.get('hash')}): not used")
        return None
    if weights_digest(d) != info.get("weights_sha256"):
        raise RuntimeError(f"{d}/model.safetensors does not match the sha256 in its {INFO}: restore it "
                           "(git checkout) or rebuild it: python tools/make_tiny_teacher.py --ship")
    if info.get("stdlib_digest") != stdlib_digest():
        log("[teacher] note: this Python's stdlib differs from the one the shipped teacher was built on "
            f"(Python {info.get('python')}): the held-out split may include files it trained on")
    return dict(info, cached=True, shipped=True)


def ensure_teacher(cache_dir: str, family: str = "glm", preset: str = "demo", seed: int = 0,
                   threads: int | None = None, rebuild: bool = False, log=None) -> tuple[str, dict]:
    """(HF directory, info) of the teacher: the shipped one where it exists (unless ``rebuild``),
    else built (or reused) in ``cache_dir`` with :func:`build_teacher`."""
    info = None if rebuild else shipped_teacher(family, preset, seed, log)
    if info is not None:
        return shipped_dir(family, preset, seed), info
    d = os.path.join(cache_dir, f"teacher_{family}_{preset}_s{seed}")
    return d, build_teacher(d, family=family, preset=preset, seed=seed, threads=threads, log=log)
