"""The adaptation recipe of the embedded default: the trainer overrides of ZEDA's two stages, of the
null-expert model trained without a teacher, and of the teacher-saturation control (the teacher,
no null experts, fine-tuned on its own corpus for the stage-1 budget). One place for the demo
(``python -m zeda_megatron.demo``) and ``tools/bench_quality.py``."""

from __future__ import annotations

SEED_BASE = 1234                 # the trainer's seed for adaptation seed 0 (null-row init, data order, sampling)
STAGE1_BATCH = 16                # global batch of stage 1, the no-teacher model and the control
STAGE1_LR = 3e-4
STAGE2_LR = 1e-4
STAGE2_BATCH = 8


def common(family: str, teacher_dir: str, seed: int, weight: float, nproc: int) -> list[str]:
    """Overrides every run shares: the model and its teacher, the group loss weight w (its equilibrium
    null share wZ/(E+wZ); :func:`zeda_megatron.routing.zero_weight_for_share`), the seed, lengths."""
    out = [f"model=embedded_{family}", f"model.hf_dir={teacher_dir}", "trainer.verify_teacher=true",
           f"model.null_experts.weight={weight:g}", f"seed={SEED_BASE + seed}", "trainer.seq_length=128",
           "trainer.micro_batch_size=4"]
    return out + ([f"parallel.ep={nproc}"] if nproc > 1 else [])


def stage1(data_path: str) -> list[str]:
    """Stage 1 distils with the exact full-vocabulary forward KL to the co-located teacher on its own
    greedy responses (no NLL on them, which drifts the student away from the teacher's distribution)."""
    return [f"data.path={data_path}", "stage.kl_weight=1.0", "stage.nll_weight=0.0", f"optim.lr={STAGE1_LR:g}",
            f"trainer.global_batch_size={STAGE1_BATCH}"]


def stage2(prompts_path: str, stage1_checkpoints: str) -> list[str]:
    """Stage 2: on-policy distillation from stage 1's checkpoint."""
    return [f"data.path={prompts_path}", f"model.init_checkpoint={stage1_checkpoints}", f"optim.lr={STAGE2_LR:g}",
            f"trainer.global_batch_size={STAGE2_BATCH}", "stage.max_new_tokens=32"]


def no_teacher(text_path: str) -> list[str]:
    """Null experts trained without a teacher: plain NLL (+ the group loss) on the teacher's corpus."""
    return [f"data.path={text_path}", "stage.kl_weight=0.0", "stage.nll_weight=1.0", f"optim.lr={STAGE1_LR:g}",
            f"trainer.global_batch_size={STAGE1_BATCH}"]


def control(text_path: str) -> list[str]:
    """The teacher itself fine-tuned like :func:`no_teacher`: if this moves its held-out NLL or
    arithmetic, the teacher was not finished. Its null experts are masked (the original routing, bit
    for bit; the group loss is then a constant: no gradient), which is the teacher's own layer."""
    return no_teacher(text_path) + ["model.null_experts.mask=true"]


def corpus_rows(steps: int) -> int:
    """Rows of corpus text for ``steps`` steps of the no-teacher model / the control: one batch row
    per step and sequence, so that no row is seen twice (no repetition the teacher never had)."""
    return steps * STAGE1_BATCH
