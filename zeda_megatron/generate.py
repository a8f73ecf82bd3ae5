"""Generation: ``python -m zeda_megatron.generate model.hf_dir=TEACHER data.prompts=P.jsonl output=OUT.jsonl``.

Runs the teacher (the original HF model, through the bridge) or any megatron checkpoint
(``checkpoint=...``: a tools/convert_hf.py output or a training save_dir) with stage 2's sampler
(:func:`zeda_megatron.training.rollout.sample`: KV cache, continuous batching) under the training
layout: ``parallel`` (TP / EP / PP) as in training; the remaining ranks are data parallel and each
takes every DP-th remaining prompt and keeps ``batch_size`` of them in flight (a slot freed by EOS
or ``max_new_tokens`` takes the next prompt at once); rank 0 writes the answers in prompt order.
bf16 on GPU (``precision``), fp32 on CPU. Prompts are encoded with the same template function as
training and evaluation (:mod:`zeda_megatron.training.templates`, ``chat_template``).

Resumable: every ``flush_every`` decode steps the finished answers are gathered and the ones that
complete the prompt-order prefix are appended with one write and fsync'ed; a restart reads the
output, drops a torn last line if the kill hit mid-write, checks that its lines are the answers to
the first prompts, and continues with the next prompt (no line lost or duplicated; sequences in
flight at the kill are sampled again). Greedy (``temperature=0``) or sampled (each prompt's draws
from its own stream keyed by its index: a resumed run samples what the uninterrupted run would have).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist

log = logging.getLogger("zeda_megatron.generate")


# ---- the output file ----------------------------------------------------------------------------------
def completed_lines(path: str, prompts: list[str]) -> int:
    """Number of prompts already answered in ``path`` (rank 0; before any new write). A torn last
    line (no newline: killed mid-write) is cut off; every complete line must answer the prompt of
    the same index."""
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    lines = data[:end].decode("utf-8").splitlines()
    for i, line in enumerate(lines):
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}: line {i + 1} is not a {{'prompt', 'response'}} JSON object; "
                             "not an output of this command (use another output path)") from None
        if i >= len(prompts) or prompt != prompts[i]:
            raise ValueError(f"{path}: line {i + 1} answers another prompt than line {i + 1} of the prompts "
                             "file: it belongs to other prompts (use another output path)")
    return len(lines)


def append_lines(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    with open(path, "ab") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


# ---- model ---------------------------------------------------------------------------------------------
def _dtype(precision: str):
    from zeda_megatron.platform import on_cpu

    if precision == "fp32" or (precision == "auto" and on_cpu()):
        return torch.float32
    if precision in ("bf16", "auto"):
        return torch.bfloat16
    raise ValueError(f"precision={precision!r}: auto | bf16 | fp32")


def build_generator_model(hf_dir: str | None, checkpoint: str | None, dtype):
    """This rank's GPTModel: the HF model at ``hf_dir`` (no null experts: the teacher) or the megatron
    ``checkpoint`` (its own null-expert settings), in ``dtype``, eval mode."""
    from zeda_megatron.bridge.builders import build_model

    if checkpoint:
        from megatron.core import dist_checkpointing

        from zeda_megatron.bridge import checkpoint as ckpt
        from zeda_megatron.bridge.hf_config import model_info
        from zeda_megatron.mcore.config import NullExpertSettings

        meta = ckpt.read_meta(checkpoint)
        null = NullExpertSettings(int(meta["num_null_experts"]), float(meta["null_weight"]),
                                  bool(meta["mask_null_experts"]))
        model, _, _ = build_model(model_info(meta["hf_config"]), null, params_dtype=dtype)
        mdir = os.path.join(checkpoint, ckpt.MCORE)
        if os.path.isdir(mdir):
            state = dist_checkpointing.load(model.sharded_state_dict(), mdir)
        else:  # a training run's save_dir
            from zeda_megatron.training.checkpoint import latest

            path = latest(checkpoint)
            if path is None:
                raise FileNotFoundError(f"checkpoint={checkpoint!r} has neither mcore/ nor a 'latest' marker")
            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)["model"]
        model.load_state_dict(state, strict=True)
    else:
        from zeda_megatron.bridge.import_hf import load_hf_weights

        if not hf_dir:
            raise ValueError("set model.hf_dir (the teacher's HF directory) or checkpoint=<megatron checkpoint>")
        model, _, _ = build_model(str(hf_dir), None, params_dtype=dtype)
        load_hf_weights(model, str(hf_dir))
    return model.eval()


def _tokenizer(cfg):
    from zeda_megatron.training.tokenizers import load_tokenizer

    if cfg.checkpoint and not cfg.model.hf_dir:
        from zeda_megatron.bridge.checkpoint import assets_dir, read_meta

        assets = assets_dir(str(cfg.checkpoint)) or read_meta(str(cfg.checkpoint)).get("hf_dir")
        if not assets:
            raise ValueError(f"checkpoint={cfg.checkpoint!r} carries no tokenizer files: set model.hf_dir")
        return load_tokenizer({"hf_dir": assets})
    return load_tokenizer(cfg.model)


def prompt_ids(tokenizer, prompts: list[str], chat_template: bool) -> list[list[int]]:
    """The token ids generation feeds for ``prompts``: the shared template function (training and
    evaluation use the same one)."""
    from zeda_megatron.training.templates import encode_prompts

    return encode_prompts(tokenizer, prompts, chat_template) if prompts else []


AUTO_SLOTS_CPU = 16  # batch_size=auto without a GPU to plan against


def auto_slots(cfg, longest_prompt: int) -> int:
    """batch_size=auto: the largest decode batch whose slots (the longest prompt of any rank +
    max_new_tokens positions) fit next to this rank's weights on its GPU (the memory plan's
    inference_decode_batch; every rank gets the same number)."""
    from zeda_megatron.distributed import comm_device
    from zeda_megatron.platform import on_cpu

    n = torch.tensor([longest_prompt], device=comm_device())
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    if on_cpu():
        return AUTO_SLOTS_CPU
    from zeda_megatron.plan.memory import inference_decode_batch
    from zeda_megatron.plan.shapes import shapes_of

    if cfg.checkpoint:
        from zeda_megatron.bridge.checkpoint import read_meta

        hf = read_meta(str(cfg.checkpoint))["hf_config"]
    else:
        with open(os.path.join(str(cfg.model.hf_dir), "config.json")) as f:
            hf = json.load(f)
    par, seq = cfg.parallel, int(n.item()) + int(cfg.max_new_tokens)
    slots = inference_decode_batch(shapes_of(hf), tp=int(par.tp), pp=int(par.pp), ep=int(par.ep),
                                   etp=int(par.get("etp") or par.tp), seq_length=seq,
                                   param_bytes=_dtype(str(cfg.precision)).itemsize,
                                   gpu_bytes=torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    if slots < 1:
        raise ValueError(f"batch_size=auto: not one sequence of {seq} tokens fits next to the weights; lower "
                         "max_new_tokens or use a larger parallel layout")
    return slots


# ---- the job -------------------------------------------------------------------------------------------
class OrderedWriter:
    """Rank 0 appends answers in prompt order as they complete (collective: every rank calls
    :meth:`deliver` at the same points). Out-of-order answers wait until the ones before them are in."""

    def __init__(self, path: str, prompts: list[str], tokenizer, start: int):
        self.path, self.prompts, self.tok = path, prompts, tokenizer
        self.next = start
        self.pending: dict = {}
        self.rank0 = dist.get_rank() == 0
        self.written, self.t0 = 0, time.time()

    def deliver(self, answers: list) -> None:
        """``answers``: (prompt index, sampled token ids) pairs finished on this rank."""
        gathered = [None] * dist.get_world_size() if self.rank0 else None
        dist.gather_object(answers, gathered, dst=0)
        if not self.rank0:
            return
        for part in gathered:  # every rank of a model replica reports the same answers: keep one
            for i, ids in part:
                self.pending.setdefault(i, ids)
        rows = []
        while self.next in self.pending:
            ids = [x for x in self.pending.pop(self.next) if x != self.tok.eos_id]
            rows.append({"prompt": self.prompts[self.next], "response": self.tok.decode(ids)})
            self.next += 1
        if rows:
            append_lines(self.path, rows)
            self.written += len(rows)
            rate = self.written / max(time.time() - self.t0, 1e-9)
            print(f"[generate] {self.next}/{len(self.prompts)} ({rate:.2f} prompts/s)", flush=True)


def run(cfg) -> dict:
    from megatron.core import parallel_state as ps

    from zeda_megatron.distributed import comm_device, destroy_parallel, init_parallel
    from zeda_megatron.training.jsonl import read_jsonl
    from zeda_megatron.training.rollout import sample
    rows, _ = read_jsonl(str(cfg.data.prompts), "auto", need="prompt")  # errors name file, line, key
    prompts = [r["prompt"] for r in rows]
    if cfg.limit:
        prompts = prompts[: int(cfg.limit)]
    slots = str(cfg.batch_size)
    if slots != "auto" and (not slots.isdigit() or int(slots) < 1):
        raise ValueError(f"batch_size={slots}: auto or the decode slots per data-parallel rank (an integer >= 1)")
    tok = _tokenizer(cfg)
    out = str(cfg.output)
    par = cfg.parallel
    init_parallel(tp=int(par.tp), pp=int(par.pp), ep=int(par.ep), etp=par.get("etp"), seed=int(cfg.seed))
    rank0 = dist.get_rank() == 0
    done = torch.zeros(1, dtype=torch.long)
    if rank0:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        done[0] = completed_lines(out, prompts)
    done = done.to(comm_device())
    dist.broadcast(done, src=0)
    start = int(done.item())
    if rank0:
        print(f"[generate] {len(prompts)} prompts, {start} already in {out}, {len(prompts) - start} to go",
              flush=True)
    if start >= len(prompts):
        destroy_parallel()
        return {"written": 0, "total": len(prompts)}
    model = build_generator_model(cfg.model.hf_dir, cfg.checkpoint, _dtype(str(cfg.precision)))
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    # each data-parallel rank keeps its share of the remaining prompts in flight (continuous batching);
    # a prompt's random stream is keyed by its index: a resumed run samples what an uninterrupted one would
    mine = list(range(start, len(prompts)))[dp_rank::dp]
    ids = prompt_ids(tok, [prompts[i] for i in mine], bool(cfg.chat_template))
    slots = int(slots) if slots != "auto" else auto_slots(cfg, max(map(len, ids), default=1))
    writer = OrderedWriter(out, prompts, tok, start)

    def finished(seqs):
        writer.deliver([(mine[s.index], s.tokens[len(s.prompt):]) for s in seqs])

    r = sample(model, [ids], max_new_tokens=int(cfg.max_new_tokens), eos_id=tok.eos_id, pad_id=tok.pad_id,
               temperature=float(cfg.temperature), top_p=float(cfg.top_p), seed=int(cfg.seed), prompt_keys=mine,
               slots=slots, record_routing=False, tp_multiple=1, on_finished=finished,
               flush_every=int(cfg.get("flush_every", 64)))
    writer.deliver([(i, a) for i, a in zip(mine, r.responses[0]) if a is not None])  # anything not streamed
    destroy_parallel()
    return {"written": writer.written, "total": len(prompts)}


def main() -> None:
    import hydra

    from zeda_megatron.distributed import hydra_argv

    sys.argv = hydra_argv(sys.argv)

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")

    @hydra.main(config_path=conf, config_name="generate", version_base=None)  # absolute: also when imported
    def _main(cfg):
        try:
            run(cfg)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    _main()


if __name__ == "__main__":
    main()
