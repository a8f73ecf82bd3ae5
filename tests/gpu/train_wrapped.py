"""``python tests/gpu/train_wrapped.py <train overrides>``: ``zeda_megatron.train`` (also under torchrun)
with two additions the GPU smoke checks need, switched on by environment variables:

ZEDA_SMOKE_TOKENS=record:PREFIX  every stage-2 micro-batch's prompts and sampled responses are appended
                                 to PREFIX.rank<R>.jsonl (one JSON line per micro-batch)
ZEDA_SMOKE_TOKENS=replay:PREFIX  the sampler picks the recorded responses (all PREFIX.rank*.jsonl files,
                                 matched by the micro-batch's prompts) instead of drawing its own. The
                                 whole rollout still runs (cached decoding, routing records for replay,
                                 log-probs); only the token choice is forced, so that a stage-2 step of
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


def forced_schedule(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """The sampler's token choices, one [b] tensor per decode step, that reproduce ``responses``:
    decoding starts at the shortest prompt and row i's response occupies positions len(prompt_i) ...;
    entries for positions a row does not sample (its prompt, or after its last token) are ignored by
    the sampler."""
    plen = [len(p) for p in prompts]
    start, end = min(plen), max(n + len(r) for n, r in zip(plen, responses))
    steps = []
    for t in range(start, end):
        row = [r[t - n] if 0 <= t - n < len(r) else pad_id for n, r in zip(plen, responses)]
        steps.append(torch.tensor(row, dtype=torch.long))
    return steps


def install_replay(prefix: str) -> None:
    from zeda_megatron.training import rollout

    records = load_records(prefix)
    real_sample, real_choose = rollout.sample, rollout.choose_tokens
    queue: list[torch.Tensor] = []

    def choose_tokens(logits, u, temperature, top_p):
        if not queue:
            raise RuntimeError("replayed samples ran out: the run decodes differently from the recorded one")
        return queue.pop(0).to(logits.device)

    def sample(model, prompt_batches, **kw):
        wanted = []
        for prompts in prompt_batches:
            key = json.dumps([list(map(int, p)) for p in prompts])
            if not records.get(key):
                raise KeyError(f"no recorded samples for the prompts {key[:200]}")
            responses = records[key].pop(0)
            wanted.append(responses)
            queue.extend(forced_schedule(prompts, responses, kw.get("pad_id", 0)))
        rollout.choose_tokens = choose_tokens
        try:
            r = real_sample(model, prompt_batches, **kw)
        finally:
            rollout.choose_tokens = real_choose
        if queue or r.responses != wanted:
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
