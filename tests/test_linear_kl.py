"""Fused output layer + losses (zeda_megatron.linear_kl) against losses.py on materialised logits:
values, gradients to hidden states and output weight, loss masks, chunking, bf16, TP=2 shards."""

import pytest
import torch

from dist_helpers import run_distributed
from zeda_megatron import linear_kl, losses

B, S, H, V = 3, 11, 16, 50  # 33 tokens: chunk sizes 7 and 5 don't divide them


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(dtype=torch.float32, seed=0):
    g = _gen(seed)
    hs = torch.randn(B, S, H, generator=g).to(dtype)
    ws = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    ht = torch.randn(B, S, H, generator=g).to(dtype)
    wt = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones(B, S)
    mask[0, 7:] = 0  # right padding
    mask[2, 4:] = 0
    labels[mask == 0] = -100
    return hs, ws, ht, wt, labels, mask


TERMS = {  # name -> (fused kwargs, reference per-token loss on materialised logits)
    "forward": (dict(forward_kl_weight=1.0), lambda zs, zt, y, T: losses.forward_kl(zs, zt, T)),
    "reverse": (dict(reverse_kl_weight=1.0), lambda zs, zt, y, T: losses.reverse_kl(zs, zt, T)),
    "nll": (dict(nll_weight=1.0), lambda zs, zt, y, T: -losses.token_logprob(zs, y)),
    "sampled": (dict(sampled_kl_weight=1.0), lambda zs, zt, y, T: losses.sampled_reverse_kl(zs, zt, y)[0]),
    "mixed": (dict(nll_weight=0.3, forward_kl_weight=0.5, reverse_kl_weight=0.7, sampled_kl_weight=0.2),
              lambda zs, zt, y, T: -0.3 * losses.token_logprob(zs, y) + 0.5 * losses.forward_kl(zs, zt, T)
              + 0.7 * losses.reverse_kl(zs, zt, T) + 0.2 * losses.sampled_reverse_kl(zs, zt, y)[0]),
}


def _reference(hs, ws, ht, wt, labels, mask, ref_fn, T, scale=1.0):
    """Autograd through materialised logits: (per-token values, loss, grad_h, grad_w)."""
    hs = hs.detach().clone().requires_grad_(True)
    ws = ws.detach().clone().requires_grad_(True)
    zs = (hs @ ws.t()).float() * scale
    zt = (ht @ wt.t()).float() * scale
    y = labels.clamp_min(0)
    per_token = ref_fn(zs, zt, y, T)
    loss = (per_token * mask).sum()
    gh, gw = torch.autograd.grad(loss, (hs, ws))
    vals = {"logprob": losses.token_logprob(zs, y), "forward_kl": losses.forward_kl(zs, zt, T),
            "reverse_kl": losses.reverse_kl(zs, zt, T), "sampled_kl": losses.sampled_reverse_kl(zs, zt, y)[1],
            "token_loss": per_token}
    return {k: v.detach() for k, v in vals.items()}, loss.detach(), gh, gw


def _fused(hs, ws, ht, wt, labels, mask, kw, T, **extra):
    hs = hs.detach().clone().requires_grad_(True)
    ws = ws.detach().clone().requires_grad_(True)
    out = linear_kl.fused_linear_losses(hs, ws, ht, wt, labels, mask, temperature=T, **kw, **extra)
    gh, gw = torch.autograd.grad(out.loss, (hs, ws))
    return out, gh, gw


def _close(a, b, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("term", sorted(TERMS))
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [7, 64])
def test_values_and_gradients_equal_materialised_logits(term, T, chunk):
    hs, ws, ht, wt, labels, mask = _inputs()
    kw, ref_fn = TERMS[term]
    ref, ref_loss, rgh, rgw = _reference(hs, ws, ht, wt, labels, mask, ref_fn, T)
    out, gh, gw = _fused(hs, ws, ht, wt, labels, mask, kw, T, chunk_size=chunk)
    real = mask.bool()
    for name in ("logprob", "forward_kl", "reverse_kl", "sampled_kl", "token_loss"):
        got = getattr(out, name)
        assert got.shape == (B, S)
        _close(got[real], ref[name][real])
        assert (got[~real] == 0).all(), f"{name}: pads must report 0"
    _close(out.loss, ref_loss)
    assert float(ref_loss.abs()) > 1.0
    _close(gh, rgh)
    _close(gw, rgw)
    assert (gh[~real] == 0).all() and gw.abs().sum() > 0


def test_chunk_sizes_agree_and_do_not_divide_the_tokens():
    hs, ws, ht, wt, labels, mask = _inputs(seed=1)
    kw = TERMS["mixed"][0]
    base, bgh, bgw = _fused(hs, ws, ht, wt, labels, mask, kw, 1.5, chunk_size=B * S)
    for chunk in (1, 4, 10, 32, 1000):
        out, gh, gw = _fused(hs, ws, ht, wt, labels, mask, kw, 1.5, chunk_size=chunk)
        _close(out.loss, base.loss, rtol=1e-6, atol=1e-6)
        _close(out.reverse_kl, base.reverse_kl, rtol=1e-6, atol=1e-6)
        _close(gh, bgh, rtol=1e-6, atol=1e-6)
        _close(gw, bgw, rtol=1e-6, atol=1e-6)
    # the default chunk size, and without the zero-weight compaction
    out, gh, gw = _fused(hs, ws, ht, wt, labels, mask, kw, 1.5, skip_zero_weight=False, chunk_size=5)
    _close(out.loss, base.loss, rtol=1e-6, atol=1e-6)
    _close(gw, bgw, rtol=1e-6, atol=1e-6)
    assert (gh[mask == 0] == 0).all()


def test_loss_mask_pads_contribute_nothing():
    hs, ws, ht, wt, labels, mask = _inputs(seed=2)
    kw = TERMS["mixed"][0]
    out, gh, gw = _fused(hs, ws, ht, wt, labels, mask, kw, 1.0, chunk_size=6)
    # changing everything at the pads (hidden states, teacher, labels) changes nothing
    pad = mask == 0
    hs2, ht2, labels2 = hs.clone(), ht.clone(), labels.clone()
    hs2[pad] = torch.randn(int(pad.sum()), H, generator=_gen(9)) * 10
    ht2[pad] = torch.randn(int(pad.sum()), H, generator=_gen(10)) * 10
    labels2[pad] = 3
    out2, gh2, gw2 = _fused(hs2, ws, ht2, wt, labels2, mask, kw, 1.0, chunk_size=6)
    assert torch.equal(out.loss, out2.loss) and torch.equal(gw, gw2) and torch.equal(gh, gh2)
    # fractional per-token weights scale each token's contribution
    w = mask * torch.linspace(0.5, 2.0, S)
    ref, ref_loss, rgh, rgw = _reference(hs, ws, ht, wt, labels, w, TERMS["mixed"][1], 1.0)
    out3, gh3, gw3 = _fused(hs, ws, ht, wt, labels, w, kw, 1.0, chunk_size=6)
    _close(out3.loss, ref_loss)
    _close(gh3, rgh)
    _close(gw3, rgw)
    # no weights = every token counts
    allw = torch.ones(B, S)
    ref, ref_loss, _, rgw = _reference(hs, ws, ht, wt, labels.clamp_min(0), allw, TERMS["reverse"][1], 1.0)
    out4, _, gw4 = _fused(hs, ws, ht, wt, None, None, TERMS["reverse"][0], 1.0, chunk_size=6)
    _close(out4.loss, ref_loss)
    _close(gw4, rgw)
    assert out4.logprob is None and out4.sampled_kl is None


def test_wrappers_grad_output_scaling_and_single_backward():
    hs, ws, ht, wt, labels, mask = _inputs(seed=3)
    ref, _, rgh, rgw = _reference(hs, ws, ht, wt, labels, mask, TERMS["forward"][1], 1.0)
    h = hs.clone().requires_grad_(True)
    w = ws.clone().requires_grad_(True)
    out = linear_kl.forward_kl(h, w, ht, wt, mask, chunk_size=8)
    (out.loss * 3.0).backward()
    _close(h.grad, 3 * rgh)
    _close(w.grad, 3 * rgw)
    _close(out.forward_kl[mask.bool()], ref["forward_kl"][mask.bool()])
    with pytest.raises(RuntimeError):
        out.loss.backward()  # the saved gradients were used up
    rev = linear_kl.reverse_kl(hs, ws, ht, wt, mask, temperature=2.0)
    _close(rev.reverse_kl[mask.bool()], losses.reverse_kl(hs @ ws.t(), ht @ wt.t(), 2.0)[mask.bool()])
    nll = linear_kl.token_nll(hs, ws, labels, mask)
    _close(nll.nll[mask.bool()], -losses.token_logprob(hs @ ws.t(), labels.clamp_min(0))[mask.bool()])
    smp = linear_kl.sampled_reverse_kl(hs, ws, ht, wt, labels, mask)
    _close(smp.sampled_kl[mask.bool()], ref["sampled_kl"][mask.bool()])
    with pytest.raises(ValueError, match="teacher"):
        linear_kl.reverse_kl(hs, ws, None, None)
    # no gradient wanted: values only
    with torch.no_grad():
        out = linear_kl.fused_linear_losses(hs, ws, ht, wt, labels, mask, nll_weight=1.0)
    assert not out.loss.requires_grad


def test_tied_output_weight_and_logit_scale():
    """The output weight is the embedding table: its gradient sums both uses."""
    hs, ws, ht, wt, labels, mask = _inputs(seed=4)
    tokens = torch.randint(0, V, (B, S), generator=_gen(5))
    kw, ref_fn = TERMS["mixed"]

    def run(fused):
        emb = torch.nn.Embedding(V, H)
        with torch.no_grad():
            emb.weight.copy_(ws)
        x = emb(tokens) + hs  # a toy "model": hidden = embedding + something
        if fused:
            loss = linear_kl.fused_linear_losses(x, emb.weight, ht, wt, labels, mask, chunk_size=5,
                                                 logit_scale=0.7, **kw).loss
        else:
            zs, zt = (x @ emb.weight.t()) * 0.7, (ht @ wt.t()) * 0.7
            loss = (ref_fn(zs, zt, labels.clamp_min(0), 1.0) * mask).sum()
        loss.backward()
        return loss.detach(), emb.weight.grad

    (l1, g1), (l2, g2) = run(True), run(False)
    _close(l1, l2)
    _close(g1, g2)


def test_bf16_inputs_match_the_materialised_bf16_path():
    hs, ws, ht, wt, labels, mask = _inputs(torch.bfloat16, seed=6)
    kw, ref_fn = TERMS["mixed"]
    ref, ref_loss, rgh, rgw = _reference(hs, ws, ht, wt, labels, mask, ref_fn, 1.0)
    out, gh, gw = _fused(hs, ws, ht, wt, labels, mask, kw, 1.0, chunk_size=7)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    real = mask.bool()
    _close(out.reverse_kl[real], ref["reverse_kl"][real], rtol=1e-4, atol=1e-4)  # fp32 after the bf16 matmul
    _close(out.loss, ref_loss, rtol=1e-4, atol=1e-4)
    _close(gh, rgh, rtol=2e-2, atol=2e-2)  # the gradients' bf16 rounding
    _close(gw, rgw, rtol=2e-2, atol=2e-2)
    # and near the fp32 computation
    f32 = _reference(hs.float(), ws.float(), ht.float(), wt.float(), labels, mask, ref_fn, 1.0)[1]
    _close(out.loss, f32, rtol=2e-2, atol=1e-2)


# ---- TP = 2 over gloo: vocabulary shards that together are the full vocabulary ---------------------
def _tp_worker(rank, world, T):
    import torch.distributed as dist

    from zeda_megatron.distributed import init_parallel

    init_parallel(tp=world)
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    assert dist.get_world_size(group) == world
    hs, ws, ht, wt, labels, mask = _inputs(seed=7)
    shard = V // world
    lo, hi = rank * shard, (rank + 1) * shard
    res = {}
    for term, (kw, _) in TERMS.items():
        h = hs.clone().requires_grad_(True)
        w = ws[lo:hi].clone().requires_grad_(True)
        out = linear_kl.fused_linear_losses(h, w, ht, wt[lo:hi], labels, mask, temperature=T, group=group,
                                            vocab_start=lo, chunk_size=5, **kw)
        out.loss.backward()
        res[term] = {"loss": out.loss.detach(), "gh": h.grad, "gw": w.grad, "logprob": out.logprob,
                     "forward_kl": out.forward_kl, "reverse_kl": out.reverse_kl, "sampled_kl": out.sampled_kl}

    # sequence parallel: each rank holds half the sequence of [s, b, h]; the output processor gathers it
    from types import SimpleNamespace

    sbh = hs.transpose(0, 1).contiguous()  # [S, B, H]; S padded to a multiple of tp
    sbh = torch.cat([sbh, torch.zeros(1, B, H)])
    lab_sb = torch.cat([labels.t(), torch.full((1, B), -100)]).t()  # [B, S + 1]
    mask_sb = torch.cat([mask.t(), torch.zeros(1, B)]).t()
    half = sbh.shape[0] // world
    local = sbh[rank * half:(rank + 1) * half].clone().requires_grad_(True)
    w = ws[lo:hi].clone().requires_grad_(True)
    layer = SimpleNamespace(weight=w, bias=None, tp_group=group, sequence_parallel=True)
    t_layer = SimpleNamespace(weight=wt[lo:hi], bias=None, tp_group=group, sequence_parallel=True)
    st = linear_kl.output_processor(hidden_states=local, output_layer=layer, output_weight=None, config=None)
    with torch.no_grad():
        th = torch.cat([ht.transpose(0, 1), torch.zeros(1, B, H)])[rank * half:(rank + 1) * half]
        tt = linear_kl.output_processor(hidden_states=th, output_layer=t_layer, output_weight=None)
    assert st.hidden_states.shape == (S + 1, B, H) and st.vocab_start == lo and st.group is group
    out = linear_kl.fused_losses_from_outputs(st, tt, lab_sb, mask_sb, temperature=T, chunk_size=4,
                                              **TERMS["mixed"][0])
    out.loss.backward()
    res["sp"] = {"loss": out.loss.detach(), "gh_local": local.grad, "gw": w.grad, "rkl": out.reverse_kl,
                 "half": half}
    return res | {"lo": lo, "hi": hi}


@pytest.fixture(scope="module")
def tp_results():
    return run_distributed(_tp_worker, 2, 1.5)


def test_tp2_vocab_shards_equal_full_vocabulary(tp_results):
    hs, ws, ht, wt, labels, mask = _inputs(seed=7)
    real = mask.bool()
    for term, (kw, ref_fn) in TERMS.items():
        ref, ref_loss, rgh, rgw = _reference(hs, ws, ht, wt, labels, mask, ref_fn, 1.5)
        for r in tp_results:
            got = r[term]
            _close(got["loss"], ref_loss)
            _close(got["gh"], rgh)  # the full hidden-state gradient on every rank
            _close(got["gw"], rgw[r["lo"]:r["hi"]])  # exactly this rank's shard of the weight gradient
            for name in ("logprob", "forward_kl", "reverse_kl", "sampled_kl"):
                _close(got[name][real], ref[name][real])
    assert tp_results[0]["hi"] == tp_results[1]["lo"] and tp_results[1]["hi"] == V


def test_tp2_sequence_parallel_output_processor(tp_results):
    hs, ws, ht, wt, labels, mask = _inputs(seed=7)
    ref, ref_loss, rgh, rgw = _reference(hs, ws, ht, wt, labels, mask, TERMS["mixed"][1], 1.5)
    full_gh = torch.cat([rgh.transpose(0, 1), torch.zeros(1, B, H)])  # [S + 1, B, H]
    for rank, r in enumerate(tp_results):
        sp = r["sp"]
        _close(sp["loss"], ref_loss)
        assert sp["rkl"].shape == (B, S + 1) and (sp["rkl"][:, S] == 0).all()
        _close(sp["rkl"][:, :S][mask.bool()], ref["reverse_kl"][mask.bool()])
        _close(sp["gw"], rgw[r["lo"]:r["hi"]])
        _close(sp["gh_local"], full_gh[rank * sp["half"]:(rank + 1) * sp["half"]])  # this rank's slice


def test_bench_kl_small_chunked_peak_is_a_quarter_with_equal_values_and_gradients():
    """tools/bench_kl.py at CI size (the full-size figures at b=1, s=4096, h=2048, V/TP=38720 are in
    docs/benchmarks.md): fused chunked peak <= 1/4 of the materialised one, values rel 1e-5, same gradients."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(repo, "tools", "bench_kl.py"), "--small"],
                         capture_output=True, text=True, timeout=300, cwd=repo)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["exact_peak"], "peak RSS could not be reset (/proc/self/clear_refs)"
    assert out["unchunked_peak_bytes"] > 4 * 1024 * 8192 * 4  # several materialised fp32 logits
    assert out["chunked_peak_bytes"] <= out["unchunked_peak_bytes"] / 4
    assert out["max_rel_diff"] <= 1e-5
    assert out["max_grad_diff"] <= 1e-5


# ---- megatron's GPTModel.forward(output_processor=...) at TP=2: tied + SP, untied without SP ----------
def _gpt_worker(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from zeda_megatron.distributed import init_parallel
    from zeda_megatron.mcore.specs import gpt_block_spec
    from zeda_megatron.platform import cpu_config_overrides

    init_parallel(tp=world)
    group = ps.get_tensor_model_parallel_group()
    tokens = torch.randint(0, 64, (2, 8), generator=_gen(0))
    pos = torch.arange(8).unsqueeze(0).expand(2, -1)
    labels, mask = torch.roll(tokens, -1, 1), torch.ones(2, 8)
    mask[1, 5:] = 0
    labels[1, 5:] = -100
    res = {}
    for tied, sp in ((True, True), (False, False)):
        cfg = TransformerConfig(num_layers=2, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2,
                                tensor_model_parallel_size=world, sequence_parallel=sp, add_bias_linear=False,
                                hidden_dropout=0.0, attention_dropout=0.0, **cpu_config_overrides())

        def build(seed):
            model_parallel_cuda_manual_seed(seed)
            torch.manual_seed(seed)
            return GPTModel(cfg, gpt_block_spec(cfg), vocab_size=64, max_sequence_length=16,
                            share_embeddings_and_output_weights=tied)

        student, teacher = build(1), build(2)
        # materialised logits [b, s, V/TP] through losses.py (the current path)
        zs = student(tokens, pos, attention_mask=None).float()
        with torch.no_grad():
            zt = teacher(tokens, pos, attention_mask=None).float()
        lo = ps.get_tensor_model_parallel_rank() * zs.shape[-1]
        y = labels.clamp_min(0)
        ref = ((-losses.token_logprob(zs, y, group, lo) + losses.reverse_kl(zs, zt, 1.5, group)) * mask).sum()
        ref.backward()
        ref_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
        for p in student.parameters():
            p.grad = None
        # fused: hidden states + output weight from the output_processor hook
        so = student(tokens, pos, attention_mask=None, output_processor=linear_kl.output_processor)
        with torch.no_grad():
            to = teacher(tokens, pos, attention_mask=None, output_processor=linear_kl.output_processor)
        assert so.hidden_states.shape == (8, 2, 16) and so.vocab_start == lo
        assert (so.weight is student.embedding.word_embeddings.weight) == tied
        out = linear_kl.fused_losses_from_outputs(so, to, labels, mask, nll_weight=1.0, reverse_kl_weight=1.0,
                                                  temperature=1.5, chunk_size=3)
        out.loss.backward()
        res[(tied, sp)] = {
            "loss": (float(ref), float(out.loss.detach())),
            "grads": {n: (ref_grads[n], p.grad) for n, p in student.named_parameters()},
        }
    return res


def test_gpt_model_output_processor_tp2_tied_sp_and_untied():
    for r in run_distributed(_gpt_worker, 2):
        for case, got in r.items():
            ref_loss, loss = got["loss"]
            assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), case
            assert len(got["grads"]) > 5
            for name, (ref_g, g) in got["grads"].items():
                assert g is not None, (case, name)
                _close(g, ref_g, rtol=1e-4, atol=1e-6)
