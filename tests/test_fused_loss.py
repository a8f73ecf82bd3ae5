"""The trainer's fused output layer + loss path (``LossSpec.fused``: zeda_megatron.linear_kl through
GPTModel's output_processor, no full-vocabulary logits) gives the same losses and gradient norms as
the materialised logits: stage 1 (NLL + forward KL, both families), stage 2 (exact reverse KL and
the sampled estimator), at TP=1 and TP=2 + sequence parallelism (2 gloo ranks)."""

import pytest
import torch

from dist_helpers import run_distributed

KEYS = ("loss", "nll", "kl", "grad_norm", "group_loss", "null_share")


def _batch():
    from trainer_fixtures import batch_of

    gen = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (13, 8)]
    return batch_of(seqs, length=12, prompt_lens=[3, 2])


def _pair(engine, batch):
    """(materialised, fused) step metrics on the same weights (lr=0)."""
    from trainer_fixtures import step_metrics

    out = []
    for fused in (False, True):
        engine.loss_spec.fused = fused
        out.append(step_metrics(engine, [dict(batch)]))
    return out


def _worker(rank, world, hf_qwen, hf_glm):
    from trainer_fixtures import make_engine

    from zeda_megatron.distributed import init_parallel

    results = {}
    for tp in (1, 2):
        init_parallel(tp=tp)
        sp = tp > 1
        for family, hf in (("qwen3", hf_qwen), ("glm", hf_glm)):
            engine = make_engine(hf, stage="sft", kl_weight=0.5, lr=0.0, sequence_parallel=sp, router_replay=False)
            results[(tp, family, "sft")] = _pair(engine, _batch())
            del engine
        engine = make_engine(hf_qwen, stage="opd", kl_weight=1.0, nll_weight=0.0, lr=0.0, sequence_parallel=sp,
                             router_replay=False)
        results[(tp, "qwen3", "opd-exact")] = _pair(engine, _batch())
        engine.loss_spec.kl = "sampled"
        results[(tp, "qwen3", "opd-sampled")] = _pair(engine, _batch())
        del engine
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from bridge_fixtures import make_tiny_hf

    root = tmp_path_factory.mktemp("fused")
    return run_distributed(_worker, 2, make_tiny_hf("qwen3_moe", str(root / "q"), seed=0),
                           make_tiny_hf("glm4_moe_lite", str(root / "g"), seed=0))[0]


@pytest.mark.parametrize("case", [("qwen3", "sft"), ("glm", "sft"), ("qwen3", "opd-exact"), ("qwen3", "opd-sampled")],
                         ids=lambda c: "-".join(c))
@pytest.mark.parametrize("tp", [1, 2])
def test_fused_loss_equals_materialised_logits(results, tp, case):
    plain, fused = results[(tp, *case)]
    assert plain["kl"] != 0 and plain["grad_norm"] > 0
    assert plain["tokens"] == fused["tokens"]
    for key in KEYS:
        assert fused[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), (tp, case, key, plain[key], fused[key])
