"""The full-size job rehearsed on a CPU before the first GPU hour: every rank role of the layout built by
the trainer's own code on data-free tensors, one step of the stage measured, compared with the memory
plan (docs/rehearsal.md).

    from zeda_megatron.rehearse import rehearse
    report = rehearse(spec)          # spec: zeda_megatron.spec.resolve(compose(overrides), inputs=False, on_gpu=True)
    report["fits"], report["ranks"]  # per rank: planned/measured bytes by part, peaks, fits, failures

Each rank role runs in a process of its own (:mod:`.rank`: a fake process group of the layout's
world, ``FakeTensorMode`` on the CPU device, the allocation tracker of :mod:`.tracker`); data-dependent
values come from :mod:`zeda_megatron.assumptions` (worst case by default: no null slot, tokens spread
evenly over the experts).
"""

from __future__ import annotations

import time

from zeda_megatron.rehearse.rank import DECODE_STEPS

PARTS = ("student_params", "student_grads", "optimizer_states", "teacher_params", "activations", "loss_logits",
         "rollout_kv_cache")
PART_BOUND = 0.10  # |measured / planned - 1| per part
PEAK_BOUND = 0.05  # ... and per rank's peak
SMALL_PART = 256 * 2**20  # parts below this (planned and measured) are not held to the ratio


def rank_roles(spec) -> list[int]:
    """The ranks whose memory differs: the first rank of the first and the last pipeline stage and of
    the stage the plan finds heaviest (megatron-core's rank order puts the pipeline stage outermost;
    within a stage the TP / EP / DP ranks hold the same shapes)."""
    from zeda_megatron.plan.memory import memory_plan

    lay = spec.layout
    per_stage = lay.world // lay.pp
    worst = memory_plan(spec)["settings"]["worst_pipeline_stage"]
    return sorted({0, (lay.pp - 1) * per_stage, worst * per_stage})


def compare(plan: dict, measured: dict, gpu_bytes: int | None) -> dict:
    """One rank's row of the report: planned and measured bytes by part, the peaks (without the plan's
    reserve, which no tracker sees), the ratios, whether it fits and which parts are out of bounds."""
    planned = {k: int(plan["per_gpu_bytes"].get(k, 0)) for k in PARTS}
    got = {k: int(measured["measured_bytes"].get(k, 0)) for k in PARTS}
    reserve = int(plan["per_gpu_bytes"]["reserve"])
    planned_peak, measured_peak = int(plan["gpu_bytes"]) - reserve, int(measured["measured_peak"])
    ratios = {k: (got[k] / planned[k] if planned[k] else (1.0 if not got[k] else float("inf"))) for k in PARTS}
    out_of_bounds = [k for k in PARTS if max(planned[k], got[k]) >= SMALL_PART and abs(ratios[k] - 1) > PART_BOUND]
    peak_ratio = measured_peak / planned_peak if planned_peak else float("inf")
    if abs(peak_ratio - 1) > PEAK_BOUND:
        out_of_bounds.append("peak")
    fits = None if gpu_bytes is None else measured_peak + reserve <= gpu_bytes
    return {"rank": measured["rank"], "planned_bytes": planned, "measured_bytes": got, "ratios": ratios,
            "planned_peak": planned_peak, "measured_peak": measured_peak, "peak_ratio": peak_ratio,
            "reserve": reserve, "fits": fits, "out_of_bounds": out_of_bounds,
            "host_bytes": measured.get("host_bytes"), "wall_s": measured.get("wall_s")}


def _child(spec, rank, kwargs, queue) -> None:
    import traceback

    from zeda_megatron.rehearse.rank import measure_rank

    try:
        queue.put(measure_rank(spec, rank, **kwargs))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, naming the rank
        queue.put({"rank": rank, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


def measure_in_process(spec, rank: int, **kwargs) -> dict:
    """:func:`.rank.measure_rank` in a fresh process (a fake world and its patches stay there)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(spec, rank, kwargs, queue))
    proc.start()
    try:
        result = queue.get()
    except Exception as e:  # noqa: BLE001
        result = {"rank": rank, "error": f"no result: {e}"}
    proc.join()
    if proc.exitcode not in (0, None) and "error" not in result:
        result = {"rank": rank, "error": f"exit code {proc.exitcode}"}
    return result


def rehearse(spec, ranks: list[int] | None = None, *, null_share: float = 0.0,
             decode_steps: int = DECODE_STEPS, sampler_steps: int | None = None) -> dict:
    """Rehearse ``spec`` (a shapes-only RunSpec of the GPU run) on its rank roles (or ``ranks``), each in
    its own process. ``null_share``: the assumed share of routed slots on null experts (0: the worst
    case; ``spec.model.null.target_share``: the configured target). ``sampler_steps``: stage 2's sampler
    stops after that many forwards (default: every slot's prefill, then ``decode_steps``). Returns ``{"ranks": [...], "fits",
    "within_bounds", "failures": ["rank R: part ..."], "wall_s", "plan_fits"}``."""
    from zeda_megatron.assumptions import Assumption
    from zeda_megatron.plan.fixes import plan_with_fixes

    from zeda_megatron.plan.memory import memory_plan

    t0 = time.time()
    plan = plan_with_fixes(spec)
    gpu = spec.layout.gpu_memory_bytes
    per_stage = spec.layout.world // spec.layout.pp
    rows, failures = [], []
    for rank in ranks if ranks is not None else rank_roles(spec):
        measured = measure_in_process(spec, rank, assumption=Assumption(null_share=null_share),
                                      decode_steps=decode_steps, sampler_steps=sampler_steps)
        if "error" in measured:
            rows.append(measured)
            failures.append(f"rank {rank}: failed: {measured['error']}")
            continue
        row = compare(memory_plan(spec, pipeline_stage=rank // per_stage), measured, gpu)  # this rank's stage
        rows.append(row)
        if row["fits"] is False:
            worst = max(PARTS, key=lambda k: row["measured_bytes"][k])
            failures.append(f"rank {rank}: does not fit: peak {row['measured_peak'] / 2**30:.1f} GiB + reserve "
                            f"{row['reserve'] / 2**30:.1f} GiB > {gpu / 2**30:.1f} GiB (largest part: {worst})")
    ok = [r for r in rows if "error" not in r]
    return {"ranks": rows, "fits": bool(ok) and len(ok) == len(rows) and all(r["fits"] is not False for r in ok),
            "within_bounds": all(not r["out_of_bounds"] for r in ok) and len(ok) == len(rows),
            "plan_fits": plan["fits"], "failures": failures, "null_share": null_share, "wall_s": time.time() - t0}


__all__ = ["PARTS", "compare", "rank_roles", "rehearse"]
