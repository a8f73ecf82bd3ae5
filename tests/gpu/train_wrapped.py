"""``python tests/gpu/train_wrapped.py <train overrides>``: ``zeda_megatron.train`` (also under torchrun)
with two additions the GPU smoke checks need, switched on by environment variables:

ZEDA_SMOKE_TOKENS=record:PREFIX  every stage-2 micro-batch's prompts and sampled responses are appended
                                 to PREFIX.rank<R>.jsonl (one JSON line per micro-batch)
ZEDA_SMOKE_TOKENS=replay:PREFIX  the sampler picks the recorded responses (all PREFIX.rank*.jsonl files,
                                 matched by the micro-batch's prompts) instead of drawing its own. The
                                 whole rollout still runs (slots, cached decoding, routing records for
                                 replay, log-probs); only each sequence's token choice is forced, so that a stage-2 step of
                                 two runs whose logits differ by rounding (bf16 GPU vs fp32 CPU, one GPU
                                 vs EP=2) trains on the same samples and can be compared.
ZEDA_SMOKE_MEMORY=FILE           rank 0 writes torch.cuda.max_memory_allocated() (and reserved) to FILE
ZEDA_SMOKE_NO_SAVE=1             no checkpoint is written (a memory measurement of mid-size steps need
                                 not spend a minute writing tens of GB)
"""

from __future__ import annotations

import glob
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def install_recorder(prefix: str) -> None:
    from zeda_megatron.training import rollout

    real = rollout.sample

    def sample(model, prompt_batches, **kw):
        r = real(model, prompt_batches, **kw)
        with open(f"{prefix}.rank{_rank()}.jsonl", "a") as f:
            for prompts, responses in zip(prompt_batches, r.responses):
                f.write(json.dumps({"prompts": [list(map(int, p)) for p in prompts], "responses": responses}) + "\n")
        return r

    rollout.sample = sample


def load_records(prefix: str) -> dict[str, list]:
    """{json of a micro-batch's prompts: [responses of each time it was sampled, in order]}."""
    out: dict[str, list] = {}
    files = sorted(glob.glob(f"{prefix}.rank*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no recorded samples at {prefix}.rank*.jsonl")
    for path in files:
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                out.setdefault(json.dumps(rec["prompts"]), []).append(rec["responses"])
    return out


def forced_tokens(wanted: list[list[int]], samples, pad_id: int) -> list[int]:
    """The token each sampled row of a decode step must take to reproduce ``wanted`` (the responses,
    by the sampler's flattened prompt index): ``samples`` are the step plan's (row, slot, sequence)
    and a sequence's next token is its response's ``sequence.sampled``-th. A position past the
    recorded response gets ``pad_id`` (the response check then fails)."""
    out = []
    for _, _, seq in samples:
        r = wanted[seq.index]
        out.append(r[seq.sampled] if seq.sampled < len(r) else pad_id)
    return out


def install_replay(prefix: str) -> None:
    from zeda_megatron.training import rollout
    from zeda_megatron.training.rollout import engine as engine_mod

    records = load_records(prefix)
    real_sample, real_step = rollout.sample, engine_mod.Engine._sample
    state: dict = {}

    def step(self, logits, plan, u_idx, last, uniforms, pending):
        forced = forced_tokens(state["wanted"], plan.samples, self.pad_id)
        real_choose = engine_mod.choose_tokens
        engine_mod.choose_tokens = lambda lg, u, t, p: torch.tensor(forced, dtype=torch.long, device=lg.device)
        try:
            return real_step(self, logits, plan, u_idx, last, uniforms, pending)
        finally:
            engine_mod.choose_tokens = real_choose

    def sample(model, prompt_batches, **kw):
        wanted = []
        for prompts in prompt_batches:
            key = json.dumps([list(map(int, p)) for p in prompts])
            if not records.get(key):
                raise KeyError(f"no recorded samples for the prompts {key[:200]}")
            wanted.append(records[key].pop(0))
        state["wanted"] = [r for mb in wanted for r in mb]
        engine_mod.Engine._sample = step
        try:
            r = real_sample(model, prompt_batches, **kw)
        finally:
            engine_mod.Engine._sample = real_step
        if r.responses != wanted:
            raise RuntimeError("the replayed rollout differs from the recorded samples")
        return r

    rollout.sample = sample


def main() -> None:
    sys.path.insert(0, ROOT)
    tokens = os.environ.get("ZEDA_SMOKE_TOKENS")
    if tokens:
        mode, prefix = tokens.split(":", 1)
        {"record": install_recorder, "replay": install_replay}[mode](prefix)
    if os.environ.get("ZEDA_SMOKE_NO_SAVE") == "1":
        from zeda_megatron.training import checkpoint

        checkpoint.save = lambda *a, **k: None
    import runpy

    try:  # as `python -m zeda_megatron.train` (Hydra finds conf/ relative to the module run as __main__)
        runpy.run_module("zeda_megatron.train", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    memory = os.environ.get("ZEDA_SMOKE_MEMORY")
    if memory and _rank() == 0 and torch.cuda.is_available():
        with open(memory, "w") as f:
            json.dump({"max_memory_allocated": torch.cuda.max_memory_allocated(),
                       "max_memory_reserved": torch.cuda.max_memory_reserved()}, f)


if __name__ == "__main__":
    main()
