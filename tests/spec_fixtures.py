"""Run specs for tests that build engines by hand: the same compose + resolve the trainer uses, for a
tiny HF checkpoint folder and the process layout already initialised (or given)."""

from __future__ import annotations


def run_spec(hf_dir: str | None = None, *overrides: str, world: int | None = None, tp: int | None = None,
             pp: int | None = None, ep: int | None = None):
    """The RunSpec of ``overrides`` on top of the default config, with ``model.hf_dir=hf_dir`` (its
    config.json in force), the layout of megatron's initialised parallel state (or ``tp``/``pp``/``ep``/
    ``world``), one sequence per micro-batch and one micro-batch per DP rank."""
    import torch.distributed as dist

    from zeda_megatron.spec import compose, resolve

    if world is None:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            tp = tp or ps.get_tensor_model_parallel_world_size()
            pp = pp or ps.get_pipeline_model_parallel_world_size()
            ep = ep or ps.get_expert_model_parallel_world_size()
        world = dist.get_world_size() if dist.is_initialized() else 1
    tp, pp, ep = tp or 1, pp or 1, ep or 1
    dp = world // (tp * pp)
    base = ["run_dir=/tmp/zeda-test-run", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}",
            "trainer.micro_batch_size=1", f"trainer.global_batch_size={dp}", "parallel.gpu_memory_gb=null"]
    if hf_dir:
        base += [f"model.hf_dir={hf_dir}", "model.hf_config=null"]
    return resolve(compose([*base, *overrides]), world, inputs=False)
