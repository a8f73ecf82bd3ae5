"""Evaluate an adapted model against its teacher: expert FLOPs removed, quality, the compute dial.

    python -m zeda_megatron.evaluate model=embedded_glm model.hf_dir=TEACHER evaluate.student=STUDENT
    python -m zeda_megatron.evaluate ... evaluate.baselines=true +evaluate.trained.no_teacher=DIR

``STUDENT`` is an exported Hugging Face directory (``config.json``; PlusPlus remote code) or a
megatron-core checkpoint (``tools/convert_hf.py`` / the trainer's ``checkpoints``), exported to
``<run_dir>/student_hf`` first through the bridge. The teacher is ``evaluate.teacher`` (default
``model.hf_dir``). Writes ``eval.json`` and ``eval.md`` in the run folder:

* routed slots sent to null experts (overall, per MoE layer, per token class) and expert FLOPs
  removed: routed-expert FLOPs (= the null-slot share) and all expert FLOPs counting the
  always-on shared experts (share * K * F / (K * F + F_shared));
* held-out NLL (stdlib files neither model trained on), KL(teacher || student) and KL(student ||
  teacher) per token over the full vocabulary;
* arithmetic exact match (greedy, ``evaluate.arith_problems`` >= 500 held-out problems);
* the compute dial: a bias added to the null experts' router logits (``zce_logit_bias`` of the
  export) swept over ``evaluate.dial``; each point's FLOPs removed, NLL, KL, arithmetic;
* with ``evaluate.baselines=true`` the table at matched expert FLOPs (:mod:`zeda_megatron.eval.baselines`).

A model without null experts (the teacher, a Z = 0 export) reports 0 removed. The library behind it
is :mod:`zeda_megatron.eval`.
"""

from __future__ import annotations

import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cfg) -> dict:
    from omegaconf import OmegaConf

    from zeda_megatron.eval.data import eval_data
    from zeda_megatron.eval.models import as_hf_dir, load
    from zeda_megatron.eval.report import write_markdown
    from zeda_megatron.eval.scoring import evaluate_model, teacher_reference

    ev = cfg.evaluate
    out_dir = os.path.abspath(ev.out_dir or cfg.run_dir)
    os.makedirs(out_dir, exist_ok=True)
    if ev.threads:
        torch.set_num_threads(int(ev.threads))
    teacher = ev.teacher or OmegaConf.select(cfg, "model.hf_dir")
    if not teacher:
        raise SystemExit("evaluate.teacher (or model.hf_dir) must name the teacher's HF directory")
    student = as_hf_dir(ev.student, os.path.join(out_dir, "student_hf"))
    t_model, t_tok = load(teacher)
    s_model, s_tok = load(student)
    data = eval_data(t_tok, ev.seed, ev.heldout_chunks, ev.chunk_chars, ev.max_len, ev.arith_problems)
    ref = teacher_reference(t_model, t_tok, data)
    summary = evaluate_model((s_model, s_tok), (t_model, t_tok), dial=list(ev.dial or []), data=data, ref=ref)
    summary["student"], summary["teacher"] = os.path.abspath(student), os.path.abspath(teacher)
    if ev.baselines:
        from zeda_megatron.eval.baselines import baseline_table

        trained = {k: as_hf_dir(v, os.path.join(out_dir, f"{k}_hf")) for k, v in dict(ev.trained or {}).items()}
        summary["baselines"] = baseline_table(teacher, student, trained=trained, data=data, ref=ref,
                                              teacher_model=(t_model, t_tok), work_dir=out_dir)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(summary, f, indent=1)
    md = write_markdown(summary, os.path.join(out_dir, "eval.md"))
    print(f"[eval] wrote {os.path.join(out_dir, 'eval.json')} and {md}", flush=True)
    return summary


def main() -> None:
    import hydra

    hydra.main(config_path=os.path.join(ROOT, "conf"), config_name="evaluate", version_base="1.3")(run)()


if __name__ == "__main__":
    main()
