"""Per-slot KV cache and the attention that reads it, on megatron-core's own attention modules.

While sampling, each decoder layer's ``self_attention`` is swapped (and put back after) for a
module that keeps the layer's projections, norms and RoPE but reads/writes a per-slot cache:

* GQA (Qwen3): K and V of this TP rank's KV heads, ``[slots + 1, length, kv_heads / TP, head_dim]``.
* MLA (GLM), ``mla_cache="latent"`` (default): the compressed KV latent after its norm and the
  rope key, ``[slots + 1, length, kv_lora_rank + qk_rope_head_dim]`` - the same on every TP rank
  (the down projection is TP-replicated). A one-token query is *absorbed*: ``q_nope @ W_uk`` scores
  against the latent directly and the attention output is up-projected by ``W_uv`` after it (the
  latent is never expanded); a prompt chunk up-projects its slot's cached latents and attends as in
  training. ``mla_cache="full"`` caches the up-projected K and V per head instead (the reference).

The step's tokens arrive flattened as ``[T, 1, hidden]``; :class:`StepInfo` says which slot and
position each belongs to. Slot ``slots`` (the last) is scratch: a rank with nothing to decode feeds
one filler token there, so that every rank steps. Attention is torch's
``scaled_dot_product_attention`` with explicit masks, on CPU and GPU alike.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule


@dataclass
class StepInfo:
    """Device-side layout of one step (built once per step, shared by all layers).

    slot, pos: [T] long. singles: [n1] step indices of one-token slots; single_slot/single_len
    their slots and key lengths (position + 1); single_max: the longest key length (host int);
    single_contiguous: the singles are slots 0..n1-1 in order (the cache is sliced, not gathered).
    chunks: (start, end, slot, first position) host tuples of multi-token slots.
    """

    slot: torch.Tensor
    pos: torch.Tensor
    singles: torch.Tensor
    single_slot: torch.Tensor
    single_len: torch.Tensor
    single_max: int
    single_contiguous: bool
    chunks: list


class SlotCache:
    """The cache tensors of this pipeline stage's layers (allocated at the first write)."""

    def __init__(self, slots: int, length: int):
        self.slots, self.length = slots, length
        self.tensors: dict = {}
        self.step: StepInfo | None = None

    def get(self, layer: int, name: str, width: tuple, like: torch.Tensor) -> torch.Tensor:
        key = (layer, name)
        if key not in self.tensors:
            self.tensors[key] = torch.zeros((self.slots + 1, self.length, *width), dtype=like.dtype, device=like.device)
        return self.tensors[key]

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def keys_for_singles(self, cache: torch.Tensor) -> torch.Tensor:
        """[n1, single_max, ...] cache rows of the one-token slots."""
        st = self.step
        if st.single_contiguous:
            return cache[: st.singles.numel(), : st.single_max]
        return cache[st.single_slot, : st.single_max]

    def single_mask(self) -> torch.Tensor:
        """[n1, single_max] True where a one-token slot's query may look (its own positions)."""
        st = self.step
        keys = torch.arange(st.single_max, device=st.single_len.device)
        return keys.unsqueeze(0) < st.single_len.unsqueeze(1)


def chunk_mask(n: int, p0: int, device) -> torch.Tensor | None:
    """[n, p0 + n] causal mask of a chunk whose first query sits at position ``p0``."""
    q = torch.arange(n, device=device).unsqueeze(1) + p0
    return torch.arange(p0 + n, device=device).unsqueeze(0) <= q


def attend_singles(q, k, v, mask, scale):
    """One query per slot: q [n, H, d], k [n, Hk, L, d], v [n, Hk, L, dv] (Hk divides H; query
    heads of a KV group are adjacent, as megatron lays them out), mask [n, L] -> [n, H, dv]. The
    query heads of a group become that group's query rows: no K/V copy per head."""
    n, H, d = q.shape
    hk = k.shape[1]
    out = F.scaled_dot_product_attention(q.view(n, hk, H // hk, d), k, v, attn_mask=mask.view(n, 1, 1, -1),
                                         scale=scale)
    return out.reshape(n, H, -1)


def attend_chunk(q, k, v, p0, scale):
    """A slot's prompt chunk: q [s, H, d] at positions p0.., k [p0 + s, Hk, d], v [p0 + s, Hk, dv]
    -> [s, H, dv] (causal)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=chunk_mask(q.shape[0], p0, q.device), scale=scale)
    return out.transpose(0, 1)


def attend_cached_kv(cache: SlotCache, layer: int, q, k, v, scale):
    """Full K/V caching: write the step's k [T, Hk, d] and v [T, Hk, dv] of ``layer`` at their slots and
    positions, then attend q [T, H, d] over each slot's cached rows -> [T, H, dv]."""
    st = cache.step
    ck = cache.get(layer, "k", tuple(k.shape[1:]), k)
    cv = cache.get(layer, "v", tuple(v.shape[1:]), v)
    ck[st.slot, st.pos] = k
    cv[st.slot, st.pos] = v
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    if st.singles.numel():
        keys = cache.keys_for_singles(ck).transpose(1, 2)  # [n1, Hk, L, d]
        vals = cache.keys_for_singles(cv).transpose(1, 2)
        out[st.singles] = attend_singles(q[st.singles], keys, vals, cache.single_mask(), scale)
    for a, b, slot, p0 in st.chunks:
        end = p0 + b - a
        out[a:b] = attend_chunk(q[a:b], ck[slot, :end], cv[slot, :end], p0, scale)
    return out


class CachedSelfAttention(MegatronModule):
    """A GQA ``SelfAttention`` reading/writing the slot cache (its own projections, norms, RoPE)."""

    def __init__(self, attn, cache: SlotCache, index: int, rotary):
        super().__init__(config=attn.config)
        self.__dict__["attn"] = attn  # not a submodule: the layer's parameters stay where they are
        self.cache, self.index, self.rotary = cache, index, rotary
        kv = attn.config.kv_channels
        self.scale = attn.config.softmax_scale or 1.0 / math.sqrt(kv)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        attn, st = self.attn, self.cache.step
        q, k, v = attn.get_query_key_value_tensors(hidden_states, None)  # [T, 1, heads, d]
        if self.rotary is not None:
            freqs = self.rotary[st.pos]  # [T, 1, 1, d]: each token at its own position
            mscale = getattr(attn, "_yarn_concentration_factor", None)
            extra = {} if mscale is None else {"mscale": mscale}
            q = apply_rotary_pos_emb(q, freqs, config=attn.config, cp_group=attn.pg_collection.cp, **extra)
            k = apply_rotary_pos_emb(k, freqs, config=attn.config, cp_group=attn.pg_collection.cp, **extra)
        out = attend_cached_kv(self.cache, self.index, q[:, 0], k[:, 0], v[:, 0], self.scale)
        return attn.linear_proj(out.reshape(out.shape[0], 1, -1))


class CachedMLA(MegatronModule):
    """An ``MLASelfAttention`` reading/writing the slot cache: latent (absorbed decode) or full K/V."""

    def __init__(self, attn, cache: SlotCache, index: int, mode: str, rot=None):
        super().__init__(config=attn.config)
        if mode not in ("latent", "full"):
            raise ValueError(f"mla_cache={mode!r}: latent | full")
        self.__dict__["attn"] = attn
        self.cache, self.index, self.mode = cache, index, mode
        cfg = attn.config
        self.heads = attn.num_attention_heads_per_partition
        self.nope, self.rope, self.vdim, self.lora = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.scale = attn.softmax_scale
        if getattr(attn.linear_kv_up_proj, "bias", None) is not None and attn.linear_kv_up_proj.bias.numel():
            raise ValueError("the MLA latent cache assumes linear_kv_up_proj without bias (add_bias_linear=False)")
        if rot is None:  # the RoPE table of the cache's positions (every layer's is the same: pass it in)
            rot = attn.rotary_pos_emb(cache.length)
        self.freqs, self.mscale = (rot, 1.0) if cfg.rope_type == "rope" else rot

    # -- the layer's own projections -------------------------------------------------------------
    def _project(self, hidden):
        """q_nope [T, H, nope], q_pe [T, H, rope] (roped), latent [T, lora] (pre-norm), k_pe [T, rope]."""
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        attn, cfg, st = self.attn, self.attn.config, self.cache.step
        q_c, kv = attn._qkv_down_projection(hidden)
        if cfg.q_lora_rank is not None and q_c.size(-1) != cfg.q_lora_rank:
            q_c = gather_from_tensor_model_parallel_region(q_c)
        if kv.size(-1) != self.lora + self.rope:
            kv = gather_from_tensor_model_parallel_region(kv)
        latent, k_pe = torch.split(kv, [self.lora, self.rope], dim=-1)
        if cfg.q_lora_rank is not None:
            q, _ = attn.linear_q_up_proj(attn.q_layernorm(q_c))
        else:
            q, _ = attn.linear_q_proj(q_c)
        q = q.view(q.shape[0], 1, self.heads, self.nope + self.rope)
        q_nope, q_pe = torch.split(q, [self.nope, self.rope], dim=-1)
        freqs = self.freqs[st.pos]
        kw = dict(config=cfg, mscale=self.mscale, cp_group=attn.pg_collection.cp, mla_rotary_interleaved=True)
        q_pe = apply_rotary_pos_emb(q_pe, freqs, **kw)
        k_pe = apply_rotary_pos_emb(k_pe.unsqueeze(-2), freqs, **kw)
        return q_nope[:, 0], q_pe[:, 0], latent, k_pe[:, 0, 0]

    def _latent_norm(self, latent):
        """The latent after ``kv_layernorm`` (fused into linear_kv_up_proj on the TE spec)."""
        from megatron.core.transformer.identity_op import IdentityOp

        attn = self.attn
        if not isinstance(attn.kv_layernorm, IdentityOp):
            return attn.kv_layernorm(latent)
        up, cfg = attn.linear_kv_up_proj, attn.config
        w = up.layer_norm_weight
        if getattr(up, "zero_centered_gamma", False) or cfg.layernorm_zero_centered_gamma:
            w = w + 1
        if cfg.normalization == "RMSNorm":
            return F.rms_norm(latent, (latent.shape[-1],), w.to(latent.dtype), cfg.layernorm_epsilon)
        return F.layer_norm(latent, (latent.shape[-1],), w.to(latent.dtype), up.layer_norm_bias, cfg.layernorm_epsilon)

    def _up_weight(self):
        """[H, nope + v, lora] of this TP rank's heads."""
        return self.attn.linear_kv_up_proj.weight.view(self.heads, self.nope + self.vdim, self.lora)

    def _expand(self, latent_rows, pe_rows):
        """Up-project cached latents [L, lora] -> K [L, H, nope + rope], V [L, H, v]."""
        kv = F.linear(latent_rows, self.attn.linear_kv_up_proj.weight).view(-1, self.heads, self.nope + self.vdim)
        k_nope, v = torch.split(kv, [self.nope, self.vdim], dim=-1)
        k = torch.cat([k_nope, pe_rows.unsqueeze(1).expand(-1, self.heads, -1)], dim=-1)
        return k, v

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        st = self.cache.step
        q_nope, q_pe, latent, k_pe = self._project(hidden_states)
        q = torch.cat([q_nope, q_pe], dim=-1)  # [T, H, nope + rope]
        T = q.shape[0]
        if self.mode == "latent":
            out = q.new_empty(T, self.heads, self.vdim)
            c = self._latent_norm(latent[:, 0])
            cache = self.cache.get(self.index, "latent", (self.lora + self.rope,), c)
            cache[st.slot, st.pos] = torch.cat([c, k_pe], dim=-1)
            w = self._up_weight()
            if st.singles.numel():  # absorbed: score against the latent, up-project the output
                q_lat = torch.einsum("thd,hdc->thc", q_nope[st.singles], w[:, : self.nope])
                qs = torch.cat([q_lat, q_pe[st.singles]], dim=-1)  # [n1, H, lora + rope]
                keys = self.cache.keys_for_singles(cache).unsqueeze(1)  # [n1, 1, L, lora + rope]: one KV head
                o = attend_singles(qs, keys, keys[..., : self.lora], self.cache.single_mask(), self.scale)
                out[st.singles] = torch.einsum("thc,hdc->thd", o, w[:, self.nope:])
            for a, b, slot, p0 in st.chunks:
                rows = cache[slot, : p0 + b - a]
                k, v = self._expand(rows[:, : self.lora], rows[:, self.lora:])
                out[a:b] = attend_chunk(q[a:b], k, v, p0, self.scale)
        else:
            kv, _ = self.attn.linear_kv_up_proj(self.attn.kv_layernorm(latent))
            kv = kv.view(T, self.heads, self.nope + self.vdim)
            k_nope, v = torch.split(kv, [self.nope, self.vdim], dim=-1)
            k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.heads, -1)], dim=-1)
            out = attend_cached_kv(self.cache, self.index, q, k, v, self.scale)
        return self.attn.linear_proj(out.reshape(T, 1, -1))


def is_mla(attn) -> bool:
    from megatron.core.transformer.multi_latent_attention import MultiLatentAttention

    return isinstance(attn, MultiLatentAttention)


@contextlib.contextmanager
def cached_attention(gpt, cache: SlotCache, mla_cache: str = "latent"):
    """Swap every decoder layer's self-attention of this stage for its cached version (restored on exit)."""
    layers = list(gpt.decoder.layers)
    rotary = None
    if any(not is_mla(layer.self_attention) for layer in layers) and getattr(gpt, "rotary_pos_emb", None) is not None:
        rotary = gpt.rotary_pos_emb(cache.length)  # [length, 1, 1, d]
    originals = []
    mla_rot = None  # one RoPE table for all MLA layers (36,864 positions x 47 layers would be 0.4 GB)
    try:
        for i, layer in enumerate(layers):
            attn = layer.self_attention
            originals.append(attn)
            if is_mla(attn):
                if mla_rot is None:
                    mla_rot = attn.rotary_pos_emb(cache.length)
                layer.self_attention = CachedMLA(attn, cache, i, mla_cache, mla_rot)
            else:
                layer.self_attention = CachedSelfAttention(attn, cache, i, rotary)
        yield cache
    finally:
        for layer, attn in zip(layers, originals):
            layer.self_attention = attn
