"""Trainer infrastructure: Hydra config tree, data, batches, metrics/W&B, signals, config validation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from zeda_megatron.training import data as D
from zeda_megatron.training import metrics as M
from zeda_megatron.training import signals as S
from zeda_megatron.training.validate import ConfigError, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")
MODELS = ("tiny_qwen3", "tiny_glm", "qwen3_30b_a3b", "glm47_flash")
STAGES = ("sft", "opd")


def compose(*overrides, run_dir="/tmp/zeda-test-run"):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base=None):
        return hcompose("config", overrides=[f"run_dir={run_dir}", *overrides])


def write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            r = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
            f.write(r + b"\n")
    return str(path)


def fake_hf_dir(tmp_path, cfg, name="hf"):
    """A folder with the model config's config.json (no weights: validation only reads the config)."""
    from omegaconf import OmegaConf

    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(OmegaConf.to_container(cfg.model.hf_config, resolve=True)))
    return str(d)


# ---- Hydra config tree ------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stage", STAGES)
def test_compose_every_model_and_stage(model, stage, tmp_path):
    from omegaconf import OmegaConf

    cfg = compose(f"model={model}", f"stage={stage}")
    resolved = OmegaConf.to_container(cfg, resolve=False)
    assert set(resolved) >= {"model", "parallel", "stage", "data", "optim", "logging", "cluster", "trainer", "seed"}
    assert cfg.stage.name == stage and cfg.model.name == model
    assert cfg.trainer.save_dir == "/tmp/zeda-test-run/checkpoints"
    assert cfg.model.null_experts.ratio == 0.5 and cfg.model.null_experts.weight == 2.0
    assert cfg.model.group_loss_coeff == 0.1
    # the optimiser follows the stage: sft cosine with warmup, opd constant with the model's lr
    if stage == "sft":
        assert (cfg.optim.schedule, cfg.optim.warmup_fraction) == ("cosine", 0.1)
        assert cfg.stage.nll_weight == 1.0 and cfg.stage.kl_weight == 0.0
    else:
        assert cfg.optim.schedule == "constant" and cfg.optim.min_lr == cfg.optim.lr
        assert (cfg.stage.kl, cfg.stage.temperature, cfg.stage.max_new_tokens) == ("exact", 1.0, 32)
        assert cfg.stage.samples_per_prompt == 2 and cfg.stage.router_replay is True
    assert (cfg.optim.weight_decay, cfg.optim.adam_beta1, cfg.optim.adam_beta2) == (0.1, 0.9, 0.98)
    if model in ("qwen3_30b_a3b", "glm47_flash"):
        assert OmegaConf.is_missing(cfg.model, "hf_dir")
        expected = {("qwen3_30b_a3b", "sft"): 2e-5, ("qwen3_30b_a3b", "opd"): 5e-6,
                    ("glm47_flash", "sft"): 2e-5, ("glm47_flash", "opd"): 1e-6}[(model, stage)]
        assert cfg.optim.lr == pytest.approx(expected)
        with pytest.raises(ConfigError, match=r"model\.hf_dir is not set"):
            validate_config(cfg, 1)
        # with a checkpoint folder (config only here) and data, the released sizes validate on the
        # reference 8-GPU layout (TP4+SP, EP8, ETP1): Z = E/2 and a 50% null target
        data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
        cfg = compose(f"model={model}", f"stage={stage}", "parallel=reference_8gpu", f"data.path={data}",
                      f"model.hf_dir={fake_hf_dir(tmp_path, cfg)}", "trainer.global_batch_size=8",
                      "trainer.micro_batch_size=2")
        plan = validate_config(cfg, 8)
        assert plan.model.null.num == plan.model.num_experts // 2 and plan.model.null.target_share == pytest.approx(0.5)
        assert (plan.layout.dp, plan.trainer.num_microbatches, plan.model.source) == (2, 2, "hf_dir")
    else:
        plan = validate_config(cfg, 1)
        assert (plan.model.num_experts, plan.model.null.num, plan.model.null.target_share) == (8, 4, pytest.approx(0.5))
        assert plan.model.source == "random_init" and plan.trainer.num_microbatches == 2
        for preset, world in (("ep2", 2), ("pp2", 2)):
            p = validate_config(compose(f"model={model}", f"stage={stage}", f"parallel={preset}"), world)
            assert (p.layout.ep, p.layout.pp) == ((2, 1) if preset == "ep2" else (1, 2))


def test_every_value_overridable():
    cfg = compose("model=tiny_glm", "stage=opd", "optim=sft", "parallel=ep2", "cluster=slurm",
                  "cluster.partition=gpu", "trainer.seq_length=128", "trainer.max_steps=7", "seed=3",
                  "model.null_experts.ratio=null", "model.null_experts.num=8", "model.hf_config.hidden_size=32",
                  "stage.kl=sampled", "stage.temperature=0.7", "optim.lr=1e-4", "logging.wandb.mode=offline",
                  "logging.wandb.group=g", "data.format=prompt", "parallel.etp=1", "trainer.precision=fp32")
    assert cfg.optim.schedule == "cosine" and cfg.optim.lr == 1e-4 and cfg.stage.kl == "sampled"
    assert cfg.model.null_experts.num == 8 and cfg.model.hf_config.hidden_size == 32
    assert cfg.cluster.ntasks_per_node == 8 and cfg.cluster.job_name == "zeda-tiny_glm-opd"
    assert cfg.logging.wandb.dir == "/tmp/zeda-test-run" and cfg.seed == 3
    plan = validate_config(compose("model=tiny_glm", "model.null_experts.ratio=null", "model.null_experts.num=8"), 1)
    assert plan.model.null.num == 8 and plan.model.null.target_share == pytest.approx(2 / 3)


def test_hydra_app_run_dir(tmp_path):
    """Under a real Hydra app, run_dir is Hydra's output folder (ZEDA_RUN_DIR pins it for requeues)."""
    app = tmp_path / "app.py"
    app.write_text(
        "import hydra\nfrom omegaconf import OmegaConf\n"
        f"@hydra.main(config_path={CONF!r}, config_name='config', version_base=None)\n"
        "def main(cfg):\n    print('RUN_DIR=' + cfg.run_dir + ' SAVE=' + cfg.trainer.save_dir)\n"
        "main()\n")
    env = dict(os.environ, ZEDA_RUN_DIR=str(tmp_path / "run"))
    out = subprocess.run([sys.executable, str(app), "stage=opd"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"RUN_DIR={tmp_path / 'run'} SAVE={tmp_path / 'run'}/checkpoints" in out.stdout
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()


# ---- tokenizer and datasets --------------------------------------------------------------------------
def test_byte_tokenizer_and_hf_tokenizer(tmp_path):
    tok = D.load_tokenizer(compose().model)
    assert isinstance(tok, D.ByteTokenizer) and tok.vocab_size == 512
    assert tok.decode(tok.encode("héllo") + [tok.eos_id, tok.pad_id]) == "héllo"
    assert max(tok.pad_id, tok.bos_id, tok.eos_id) < 260
    with pytest.raises(ValueError, match="vocab_size >= 260"):
        D.load_tokenizer({"hf_dir": None, "hf_config": {"vocab_size": 128}})
    from bridge_fixtures import VOCAB, write_tokenizer

    write_tokenizer(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": VOCAB}))
    hf = D.load_tokenizer({"hf_dir": str(tmp_path), "hf_config": None})
    assert isinstance(hf, D.HFTokenizer) and hf.eos_id == VOCAB - 1 and hf.pad_id == VOCAB - 1
    assert hf.encode("w3 w5") == [3, 5] and hf.decode([3, 5]) == "w3 w5"
    path = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "w1 w2", "response": "w7"}, {"text": "x", "prompt": "w4",
                                                                                       "response": "w5 w6"}])
    ds = D.JsonlDataset(path, hf, seq_length=6)  # no BOS with HF tokenizers; EOS closes the response
    assert ds[0]["tokens"].tolist() == [1, 2, 7, VOCAB - 1, VOCAB - 1, VOCAB - 1]
    assert ds[0]["labels"].tolist() == [-100, 7, VOCAB - 1, -100, -100, -100]
    assert ds[1]["labels"].tolist() == [5, 6, VOCAB - 1, -100, -100, -100]


def test_prompt_response_masking(tmp_path):
    tok = D.ByteTokenizer(512)
    path = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "ab", "response": "xyz", "extra": 1}, ""])
    ds = D.JsonlDataset(path, tok, seq_length=12)
    assert ds.format == "prompt_response" and len(ds) == 1
    s = ds[0]
    ids = [tok.bos_id, 97, 98, 120, 121, 122, tok.eos_id]
    assert s["tokens"].tolist() == ids + [tok.pad_id] * 5
    # labels[i] is the token after position i, only where a response token (or the EOS) is predicted
    assert s["labels"].tolist() == [-100, -100, 120, 121, 122, tok.eos_id] + [-100] * 6
    assert s["loss_mask"].tolist() == [0, 0, 1, 1, 1, 1] + [0] * 6
    assert int(s["prompt_length"]) == 3 and s["position_ids"].tolist() == list(range(12))
    # truncation keeps the prompt and cuts the response; a sample with no response token left is dropped
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "ab", "response": "x" * 50}, {"prompt": "p" * 20, "response": "y"}])
    ds = D.JsonlDataset(path, tok, seq_length=8)
    assert len(ds) == 1 and ds.dropped == 1
    assert ds[0]["loss_mask"].sum() == 6 and ds[0]["labels"][-1] == 120


def test_text_format_and_forced_format(tmp_path):
    tok = D.ByteTokenizer(512)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}, {"text": "hi", "prompt": "ignored"}])
    ds = D.JsonlDataset(path, tok, seq_length=10)
    assert ds.format == "text"
    s = ds[0]
    assert s["labels"].tolist()[:6] == [104, 101, 108, 108, 111, tok.eos_id] and s["loss_mask"].sum() == 6
    assert int(s["prompt_length"]) == 0
    both = write_jsonl(tmp_path / "both.jsonl", [{"text": "hello", "prompt": "p", "response": "r"}])
    assert D.JsonlDataset(both, tok, 10).format == "prompt_response"
    assert D.JsonlDataset(both, tok, 10, fmt="text").format == "text"


def test_prompt_dataset(tmp_path):
    tok = D.ByteTokenizer(512)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "abc"}, {"prompt": "q" * 30 + "END", "response": "unused"}])
    ds = D.PromptDataset(path, tok, seq_length=16, max_new_tokens=6)
    s = ds[0]
    assert s["tokens"][:4].tolist() == [tok.bos_id, 97, 98, 99] and int(s["prompt_length"]) == 4
    assert (s["labels"] == -100).all() and s["loss_mask"].sum() == 0
    long = ds[1]  # cut to seq_length - max_new_tokens = 10 tokens, keeping the end
    assert int(long["prompt_length"]) == 10 and tok.decode(long["tokens"][:10]).endswith("END")
    batch = next(D.iterate_batches(ds, 2, 1, 0, 1, seed=0))[0]
    assert sorted(map(tuple, D.prompts_of(batch))) == sorted([tuple(s["tokens"][:4].tolist()),
                                                               tuple(long["tokens"][:10].tolist())])
    assert len(D.prompts_of(batch, repeat=2)) == 4
    with pytest.raises(ValueError, match="max_new_tokens"):
        D.PromptDataset(path, tok, seq_length=16, max_new_tokens=16)
    # prompt/response files serve as prompt files; text files do not
    with pytest.raises(ValueError, match="format=text"):
        D.PromptDataset(path, tok, 16, 6, fmt="text")


@pytest.mark.parametrize("lines,match", [
    (None, "does not exist"),
    ([], "empty"),
    ([{"prompt": "a", "response": "b"}, "{not json"], r"line 2 is not valid JSON"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "c"}], r"line 2 has no 'response' key"),
    ([{"text": "a"}, {"txt": "b"}], r"line 2 has no 'text' key"),
    ([{"prompt": "a"}], r"line 1 has neither .*missing key 'response'"),
    ([{"question": "a"}], r"line 1 has neither .*missing key 'text'"),
    ([{"prompt": "a", "response": 3}], r"line 1: 'response' must be a string"),
    (["[1, 2]"], r"line 1 is a JSON list"),
    ([{"text": "a"}, b"\xff\xfe"], r"line 2 is not valid UTF-8"),
])
def test_dataset_errors_name_file_line_key(tmp_path, lines, match):
    path = str(tmp_path / "bad.jsonl")
    if lines is not None:
        write_jsonl(path, lines)
    with pytest.raises(ValueError, match=match) as e:
        D.JsonlDataset(path, D.ByteTokenizer(512), 16)
    assert "bad.jsonl" in str(e.value)


def test_prompt_file_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"response": "b"}])
    with pytest.raises(ValueError, match=r"p\.jsonl: line 2 has no 'prompt' key"):
        D.PromptDataset(path, D.ByteTokenizer(512), 16, 4)
    with pytest.raises(ValueError, match="format=prompt gives no tokens"):
        D.JsonlDataset(path, D.ByteTokenizer(512), 16, fmt="prompt")


def test_synthetic_dataset_and_build_dataset(tmp_path):
    cfg = compose("data.synthetic_samples=32")
    tok = D.load_tokenizer(cfg.model)
    ds = D.build_dataset(cfg, tok)
    assert isinstance(ds, D.SyntheticDataset) and len(ds) == 32
    assert all(s["loss_mask"].sum() > 0 for s in ds.samples)
    again = D.build_dataset(cfg, tok)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(ds.samples, again.samples))
    opd = D.build_dataset(compose("stage=opd", "data.synthetic_samples=8"), tok)
    assert all(s["loss_mask"].sum() == 0 and s["prompt_length"] <= 64 - 32 for s in opd.samples)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "response": "y"}] * 3)
    assert isinstance(D.build_dataset(compose("stage=opd", f"data.path={path}"), tok), D.PromptDataset)
    assert isinstance(D.build_dataset(compose(f"data.path={path}"), tok), D.PreparedDataset)  # JSONL prepared once


# ---- deterministic resumable batches --------------------------------------------------------------------
class _Ids:
    """A dataset whose sample i is just its index (so batches show which samples were used)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"tokens": torch.tensor([i, i]), "labels": torch.tensor([i, -100])}


def _take(it, k):
    return [[mb["tokens"][:, 0].tolist() for mb in next(it)] for _ in range(k)]


def test_iterator_deterministic_and_resumable():
    ds = _Ids(10)
    full = _take(D.iterate_batches(ds, 2, 3, 0, 1, seed=7), 8)  # 6 samples/step over epochs of 10
    assert full == _take(D.iterate_batches(ds, 2, 3, 0, 1, seed=7), 8)
    assert full != _take(D.iterate_batches(ds, 2, 3, 0, 1, seed=8), 8)
    for k in (1, 3, 5):  # resume at step k == the uninterrupted run from step k on
        assert _take(D.iterate_batches(ds, 2, 3, 0, 1, seed=7, start_step=k), 8 - k) == full[k:]
    flat = [i for step in full for mb in step for i in mb]
    for e in range(4):  # every epoch is a permutation of the dataset
        assert sorted(flat[e * 10:(e + 1) * 10]) == list(range(10))
    assert len(list(D.iterate_batches(ds, 2, 3, 0, 1, seed=7, start_step=2, max_steps=5))) == 3
    batch = next(D.iterate_batches(ds, 2, 3, 0, 1, seed=7))[0]
    assert batch["tokens"].shape == (2, 2) and batch["labels"].dtype == torch.long


def test_iterator_data_parallel_splits_the_same_global_batch():
    ds = _Ids(37)
    one = _take(D.iterate_batches(ds, 2, 4, 0, 1, seed=1), 5)
    ranks = [_take(D.iterate_batches(ds, 2, 2, r, 2, seed=1), 5) for r in range(2)]
    for step in range(5):
        global_one = [i for mb in one[step] for i in mb]
        global_dp = [i for r in range(2) for mb in ranks[r][step] for i in mb]
        assert global_dp == global_one
        assert not set(sum(ranks[0][step], [])) & set(sum(ranks[1][step], []))
    with pytest.raises(ValueError, match="dp_rank"):
        next(D.iterate_batches(ds, 2, 2, 2, 2, seed=1))


# ---- metrics, W&B, progress --------------------------------------------------------------------------------
def test_metrics_jsonl_and_resume_truncation(tmp_path):
    with M.MetricsWriter(str(tmp_path), rank0=True) as w:
        for step in range(1, 6):
            w.write(step, {"loss": torch.tensor(1.0 / step), "kl": 0.1, "null_share_per_layer": torch.tensor([0.25, 0.5])})
    recs = M.read_metrics(str(tmp_path))
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5] and recs[1]["loss"] == 0.5
    assert recs[0]["null_share_per_layer"] == [0.25, 0.5]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # a line cut short by a kill
    with M.MetricsWriter(str(tmp_path), rank0=True, resume_step=3) as w:  # resumed from the step-3 checkpoint
        for step in range(4, 7):
            w.write(step, {"loss": 10.0 + step})
    recs = M.read_metrics(str(tmp_path))
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6] and recs[3]["loss"] == 14.0
    M.MetricsWriter(str(tmp_path), rank0=True, resume_step=0).close()  # a fresh run in the same folder
    assert M.read_metrics(str(tmp_path)) == []
    other = tmp_path / "other"
    M.MetricsWriter(str(other), rank0=False).write(1, {"loss": 1.0})  # non-zero ranks write nothing
    assert not other.exists()


def test_progress_line_and_flatten():
    line = M.format_progress(3, 20, {"loss": torch.tensor(4.12346, dtype=torch.float64), "kl": 0.0123, "null_share": 0.3412,
                                     "tokens_per_s": 1234.0, "lr": 2e-5, "grad_norm": 1.5}, eta_s=83)
    assert line == ("step 3/20 | loss 4.1235 | kl 0.0123 | null 0.341 | 1.2k tok/s | gnorm 1.500 | "
                    "lr 2.00e-05 | eta 0:01:23")
    import io

    buf = io.StringIO()
    p = M.ProgressPrinter(10, rank0=True, stream=buf)
    p.update(1, {"loss": 1.0})
    p.update(2, {"loss": 0.9})
    lines = buf.getvalue().splitlines()
    assert lines[0] == "step 1/10 | loss 1.0000" and lines[1].startswith("step 2/10 | loss 0.9000 | eta ")
    assert M.ProgressPrinter(10, rank0=False, stream=buf).update(1, {"loss": 1.0}) is None
    flat = M.flatten({"loss": 1.0, "null_share_per_layer": [0.1, 0.2], "g": {"a": torch.tensor(2.0)}})
    assert flat == {"loss": 1.0, "null_share_per_layer/0": 0.1, "null_share_per_layer/1": 0.2, "g/a": 2.0}


def test_wandb_offline_fallback_writes_into_run_dir(tmp_path, monkeypatch, caplog):
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    cfg = compose("logging.wandb.mode=online", run_dir=str(run_dir))
    assert not M.wandb_api_key_present()
    with caplog.at_level("WARNING"):
        wb = M.WandbLogger(cfg, rank0=True)
    assert wb.mode == "offline" and "logging offline instead" in caplog.text
    wb.log({"loss": 1.5, "null_share_per_layer": [0.3, 0.4]}, step=1)
    wb.log({"loss": 1.2}, step=2)
    run_id = (run_dir / "wandb_run_id").read_text()
    wb.finish()
    runs = [p for p in (run_dir / "wandb").iterdir() if p.name.startswith("offline-run-")]
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    assert list(runs[0].glob("*.wandb"))
    M.WandbLogger(compose(), rank0=True).finish()  # disabled: nothing happens
    assert M.WandbLogger(cfg, rank0=False).run is None


def test_save_resolved_config(tmp_path):
    cfg = compose(run_dir=str(tmp_path))
    path = M.save_resolved_config(cfg, str(tmp_path))
    text = open(path).read()
    assert "${" not in text and f"save_dir: {tmp_path}/checkpoints" in text


# ---- signals ---------------------------------------------------------------------------------------------
def test_signals_set_the_stop_flag():
    S.reset()
    S.install_signal_handlers()
    try:
        assert not S.stop_requested() and not S.stop_requested_all()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert S.stop_requested() and S.received_signal() == signal.SIGUSR1 and S.stop_requested_all()
        S.reset()
        os.kill(os.getpid(), signal.SIGTERM)
        assert S.received_signal() == signal.SIGTERM
    finally:
        S.restore_signal_handlers()
        S.reset()
    assert signal.getsignal(signal.SIGTERM) is not S._handler


# ---- config validation -------------------------------------------------------------------------------------
BAD = [
    (["stage.name=rl"], 1, r"stage\.name='rl' is unknown"),
    (["stage.kl=topk"], 1, r"stage\.kl='topk' is unknown"),
    (["stage=sft", "stage.kl=sampled", "stage.kl_weight=1"], 1, r"stage\.kl=sampled .*\(stage=opd\)"),
    (["stage.nll_weight=0"], 1, r"stage\.nll_weight and stage\.kl_weight are both 0"),
    (["stage=opd", "stage.kl_weight=0", "stage.nll_weight=1"], 1, r"stage\.kl_weight=0 with stage=opd"),
    (["parallel.tp=2"], 3, r"parallel\.tp\*parallel\.pp = 2\*1 = 2 does not divide the world size 3"),
    (["parallel.ep=3"], 3, r"parallel\.ep=3 does not divide the number of experts E=8"),
    (["parallel.ep=4"], 2, r"parallel\.ep=4 does not fit the world"),
    (["parallel.pp=2", "model.hf_config.num_hidden_layers=3", "model.hf_config.mlp_only_layers=[]"], 2,
     r"parallel\.pp=2 does not divide model\.hf_config\.num_hidden_layers=3"),
    (["parallel.tp=2"], 2, r"parallel\.sequence_parallel=true"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "model.hf_config.num_key_value_heads=1"], 2,
     r"parallel\.tp=2 does not divide model\.hf_config\.num_key_value_heads=1"),
    (["trainer.global_batch_size=6"], 2, r"trainer\.global_batch_size=6 is not divisible by micro_batch_size\*dp = 2\*2"),
    (["model.null_experts.num=4"], 1, r"model\.null_experts: set exactly one of num"),
    (["model.null_experts.ratio=null"], 1, r"model\.null_experts: set exactly one of num"),
    (["model.null_experts.ratio=0.3"], 1, r"model\.null_experts\.ratio=0\.3: .*not a whole number"),
    (["model.null_experts.weight=0"], 1, r"model\.null_experts\.weight=0"),
    (["stage=opd", "model.hf_config=null"], 1, r"model\.hf_dir and model\.hf_config are both null: stage=opd needs a teacher"),
    (["model=qwen3_30b_a3b"], 8, r"model\.hf_dir is not set \(\?\?\?\)"),
    (["model.hf_dir=/nonexistent/ckpt"], 1, r"model\.hf_dir='/nonexistent/ckpt' has no config\.json"),
    (["stage=opd", "stage.max_new_tokens=64"], 1, r"stage\.max_new_tokens=64 must be < trainer\.seq_length=64"),
    (["stage=opd", "stage.samples_per_prompt=4"], 1, r"stage\.samples_per_prompt=4 must divide trainer\.micro_batch_size=2"),
    (["data.path=/nonexistent.jsonl"], 1, r"data\.path='/nonexistent\.jsonl' does not exist"),
    (["data.format=csv"], 1, r"data\.format='csv' is unknown"),
    (["trainer.precision=fp8"], 1, r"trainer\.precision='fp8' is unknown"),
    (["trainer.resume=/no/such/ckpt"], 1, r"trainer\.resume='/no/such/ckpt'"),
    (["trainer.seq_length=512"], 1, r"trainer\.seq_length=512 exceeds .*max_position_embeddings=256"),
    (["model.init_checkpoint=/no/ckpt"], 1, r"model\.init_checkpoint='/no/ckpt' does not exist"),
    (["optim.schedule=linear"], 1, r"optim\.schedule='linear' is unknown"),
    (["stage=opd", "parallel=pp2", "trainer.recompute=full"], 2,
     r"trainer\.recompute=full with stage\.router_replay=true and parallel\.pp>1"),
    (["stage=opd", "stage.top_p=0"], 1, r"stage\.top_p=0 must be a number in \(0, 1\]"),
    (["stage=opd", "stage.offload_while_sampling=maybe"], 1, r"stage\.offload_while_sampling='maybe'"),
    (["optim.min_lr=1"], 1, r"optim\.min_lr=1\.0 is above optim\.lr"),
    (["optim.warmup_fraction=1"], 1, r"optim\.warmup_fraction=1"),
    (["logging.wandb.mode=cloud"], 1, r"logging\.wandb\.mode='cloud' is unknown"),
    (["model.hf_config.vocab_size=200"], 1, r"model\.hf_config\.vocab_size=200 is too small"),
    (["model.hf_config.model_type=llama"], 1, r"model\.hf_config\.model_type='llama' is not supported"),
    (["cluster=slurm", "cluster.partition=p"], 4, r"cluster\.nodes\*cluster\.gpus_per_node = 1\*8 = 8 but the job has 4"),
    (["model=tiny_glm", "model.hf_config.n_group=4", "model.null_experts.ratio=0.25"], 1,
     r"E\+Z=8\+2 is not divisible by the router's n_group=4"),
]


@pytest.mark.parametrize("overrides,world,match", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_validate_config_errors_name_the_key(overrides, world, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(compose(*overrides), world)


def test_validate_config_data_and_real_model(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    with pytest.raises(ConfigError, match=r"data\.path: .*bad\.jsonl: line 2 has no 'response' key"):
        validate_config(compose(f"data.path={bad}"), 1)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    validate_config(compose("stage=opd", f"data.path={prompts}"), 1)
    with pytest.raises(ConfigError, match=r"data\.path: .*line 1 has neither"):
        validate_config(compose("stage=sft", f"data.path={prompts}"), 1)
    # a real model (hf_dir) needs data, and its config must match the model config's
    hf = fake_hf_dir(tmp_path, compose("model=qwen3_30b_a3b", "model.hf_dir=null"))
    with pytest.raises(ConfigError, match=r"data\.path is not set: stage=opd of a real model"):
        validate_config(compose("model=qwen3_30b_a3b", f"model.hf_dir={hf}", "stage=opd"), 1)
    with pytest.raises(ConfigError, match=r"model\.hf_config\.num_experts=64 but .*config\.json says 128"):
        validate_config(compose("model=qwen3_30b_a3b", f"model.hf_dir={hf}", "model.hf_config.num_experts=64"), 1)
    plan = validate_config(compose("model=qwen3_30b_a3b", f"model.hf_dir={hf}", "model.hf_config=null",
                                   f"data.path={prompts}", "stage=opd"), 1)
    assert plan.model.hf_config["num_experts"] == 128 and plan.model.null.num == 64
    assert any("init_checkpoint" in n for n in plan.notes)
