"""One template: a prompt's token ids are identical in generation (``zeda_megatron.generate``), data
preparation (``zeda_megatron.prepare_data``), training (stage-1 documents, stage-2 prompt batches) and
evaluation (``zeda_megatron.evaluate``), for a Qwen3-style tokenizer (word-level test tokenizer, no BOS,
ChatML template) and a GLM-style one (the embedded BPE tokenizer, BOS, ``[gMASK]<sop>`` template), with
the chat template off and on."""

from __future__ import annotations

import json
import os
import types

import pytest

from zeda_megatron.training import data as D
from zeda_megatron.training.templates import encode_prompts, encode_texts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["w1 w2 w3", "w7", "w10 w11 w12 w13 w14 w15", "w3 w3"]
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GLM_TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _qwen3_like(d):
    from bridge_fixtures import write_tokenizer
    from transformers import AutoTokenizer

    write_tokenizer(d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(d)


def _glm_like(d):
    from zeda_megatron.embedded.teacher import train_tokenizer

    texts = [" ".join(f"w{i}" for i in range(j, j + 20)) + " user assistant 12 + 34 = 46" for j in range(60)]
    tok = train_tokenizer(texts * 3, 320)
    tok.add_special_tokens({"additional_special_tokens": ["[gMASK]", "<sop>", "<|user|>", "<|assistant|>"]})
    tok.chat_template = GLM_TEMPLATE
    tok.save_pretrained(d)


FAMILIES = {"qwen3": _qwen3_like, "glm": _glm_like}


@pytest.fixture(scope="module")
def tokdirs(tmp_path_factory):
    out = {}
    for fam, make in FAMILIES.items():
        d = str(tmp_path_factory.mktemp(f"tok_{fam}"))
        make(d)
        out[fam] = d
    prompts = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "response": "w5 w6"}) + "\n" for p in PROMPTS))
    out["prompts"] = str(prompts)
    return out


def _compose(name, overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        return compose(name, overrides=["run_dir=.", *overrides])


def _model_dir(tok_dir, family, vocab, out):
    """A model folder for the training config: the tokenizer files of ``tok_dir`` and the tiny preset's
    config.json (no weights: data preparation and the datasets read only the tokenizer and the config)."""
    import shutil

    from omegaconf import OmegaConf

    shutil.copytree(tok_dir, out)
    hf = OmegaConf.to_container(_compose("config", [f"model=tiny_{family}"]).model.hf_config)
    hf["vocab_size"] = max(int(hf["vocab_size"]), vocab)
    (out / "config.json").write_text(json.dumps(hf))
    return str(out)


def _generate_prompt_ids(monkeypatch, tmp_path, hf_dir, prompts_path, chat):
    """The ids ``zeda_megatron.generate`` hands its sampler (model and sampler stubbed out)."""
    import zeda_megatron.generate as G
    import zeda_megatron.training.rollout as R

    seen = []

    def fake_sample(model, groups, **kw):
        seen.extend(groups[0])
        return types.SimpleNamespace(responses=[[[kw["eos_id"]] for _ in groups[0]]])

    monkeypatch.setattr(G, "build_generator_model", lambda *a, **k: None)
    monkeypatch.setattr(R, "sample", fake_sample)
    cfg = _compose("generate", [f"model.hf_dir={hf_dir}", "model.hf_config=null", f"data.prompts={prompts_path}",
                                f"output={tmp_path / 'gen.jsonl'}", f"data.chat_template={chat}", "batch_size=2",
                                "max_new_tokens=2"])
    G.run(cfg)
    return seen


def _evaluation_prompt_ids(tok_hf, prompts):
    """The ids the evaluation (``zeda_megatron.eval``) feeds the model for its generation (arithmetic) prompts."""
    import torch

    from zeda_megatron.eval import scoring as E

    seen = []

    class Fake:
        def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
            for row, att in zip(input_ids, attention_mask):
                seen.append(row[att.bool()].tolist())
            return torch.cat([input_ids, torch.full((len(input_ids), 1), kw["eos_token_id"])], dim=1)

    E.arith_outputs(Fake(), tok_hf, [{"prompt": p, "answer": "0"} for p in prompts], batch_size=3)
    return seen


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_ids_identical_across_generate_prepare_train_evaluate(tokdirs, family, chat, tmp_path, monkeypatch):
    hf_dir = tokdirs[family]
    tok = D.load_tokenizer({"hf_dir": hf_dir, "hf_config": None})
    ref = encode_prompts(tok, PROMPTS, chat)
    # the rules themselves: template text exactly when on; BOS (if any) + prompt when off
    if chat:
        first = tok.tok.convert_tokens_to_ids("[gMASK]" if family == "glm" else "<|im_start|>")
        assert ref[0][0] == first and ref[0] != encode_prompts(tok, PROMPTS[:1], False)[0]
    else:
        assert ref[0] == ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(PROMPTS[0])
    assert (tok.bos_id is not None) == (family == "glm")

    # prepare_data (the command's code path, the job's config) -> stage-1 documents and stage-2 prompt batches
    from zeda_megatron.prepare_data import prepare_spec
    from zeda_megatron.spec import resolve

    model_dir = _model_dir(hf_dir, family, len(tok.tok), tmp_path / "model")  # the trainer reads a model folder
    common = [f"model=tiny_{family}", f"model.hf_dir={model_dir}", "model.hf_config=null", f"data.path={tokdirs['prompts']}",
              f"data.chat_template={chat}", f"data.cache_dir={tmp_path / 'prep'}", "trainer.seq_length=64",
              "stage.max_new_tokens=8"]
    sft = resolve(_compose("config", common))
    prefix = prepare_spec(sft)[0]["prefix"]
    docs = D.build_dataset(sft, tok)
    assert docs.path == prefix
    for i, want in enumerate(ref):
        ids, mask = docs.document(i)
        first = int(mask.argmax())
        assert ids[:first].tolist() == want, (family, chat, i)
    opd = resolve(_compose("config", common + ["stage=opd", "trainer.micro_batch_size=2"]))
    prepare_spec(opd)
    prompt_ds = D.build_dataset(opd, tok)
    batch = next(D.iterate_batches(prompt_ds, len(PROMPTS), 1, 0, 1, seed=0))[0]
    assert sorted(D.prompts_of(batch)) == sorted(ref)

    # generation
    assert _generate_prompt_ids(monkeypatch, tmp_path, hf_dir, tokdirs["prompts"], chat) == ref

    # evaluation (its prompts are plain: the evaluated embedded/base models are not chat models)
    if not chat:
        assert _evaluation_prompt_ids(tok.tok, PROMPTS) == ref
        from zeda_megatron.eval import data as E

        data = E.eval_data(tok.tok, n_chunks=3, chunk_chars=200, n_arith=2)
        if tok.bos_id is not None:  # its NLL texts: BOS + text, as training's text documents start
            texts = [tok.decode(x[1:]) for x in data.ids]
            assert [x[: len(data.ids[0])] for x in encode_texts(tok, texts[:1], eos=False)] == data.ids[:1]
