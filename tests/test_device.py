"""Device placement: every tensor the trainer hands to the student and the teacher — stage 1's step,
stage 2's sampling (training/rollout/: prefill, KV-cached decode steps, routing recorded while
sampling) and its step with that routing replayed, the metrics — is on the model's device.

On a CPU-only machine the model's device and the host are the same memory, so the host is
emulated: :class:`HostTensor` marks host memory (what the data code builds batches in, what the
trainer's own code creates without ``device=`` while :class:`HostDefaultDevice` is active, and what
``.cpu()`` returns). The only way off the host is ``.to(device)`` / ``.cuda()``; an op that mixes a
host tensor with a device tensor fails as it does on CUDA; a forward pre-hook on both models asserts
that no argument is on the host. Negative controls prove the checks bite: with the step's move
disabled, or the sampler handing the model its step's ids from the host, the same run fails."""

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dist_helpers import run_distributed

TRAINER = "zeda_megatron.training"


def _tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif hasattr(x, "__dataclass_fields__") or type(x).__name__ == "PackedSeqParams":
        yield from _tensors(vars(x))


class DeviceMismatch(RuntimeError):
    pass


class HostTensor(torch.Tensor):
    """A tensor in host memory while the model is on an accelerator."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda) and _moves(func, args, kwargs):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)  # the copy lands on the device
        ts = list(_tensors((args, kwargs)))
        host = [t for t in ts if isinstance(t, HostTensor)]
        device = [t for t in ts if not isinstance(t, HostTensor)]
        if device and any(t.dim() > 0 for t in host):  # host scalars may meet device tensors, as on CUDA
            raise DeviceMismatch(f"{getattr(func, '__name__', func)}: expected all tensors on the same device, "
                                 "found host and device tensors")
        return super().__torch_function__(func, types, args, kwargs)


def _moves(func, args, kwargs):
    if func is torch.Tensor.cuda or kwargs.get("device") is not None:
        return True
    for a in args[1:]:
        if isinstance(a, (torch.device, str, int)) or (torch.is_tensor(a) and not isinstance(a, HostTensor)):
            return True
    return False


FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.tensor, torch.rand, torch.randn,
             torch.randint, torch.eye, torch.linspace, torch.as_tensor}


def _called_from_trainer() -> bool:
    f = sys._getframe(2)
    while f is not None and "/torch/" in f.f_code.co_filename:
        f = f.f_back
    return f is not None and str(f.f_globals.get("__name__", "")).startswith(TRAINER)


class HostDefaultDevice(TorchFunctionMode):
    """Tensors the trainer creates without ``device=`` land on the host (as torch's default device
    does on a GPU machine)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.cpu and torch.is_tensor(out):  # a copy to the host (sampled ids, records)
            return out.as_subclass(HostTensor)
        if func in FACTORIES and kwargs.get("device") is None and torch.is_tensor(out) and _called_from_trainer():
            out = out.as_subclass(HostTensor)
        return out


def _on_host(batch):
    return {k: v.as_subclass(HostTensor) if torch.is_tensor(v) else v for k, v in batch.items()}


def _install_checks(engine):
    calls = {"student": 0, "teacher": 0}

    def check(name):
        def hook(module, args, kwargs):
            device = next(module.parameters()).device
            for t in _tensors((args, kwargs)):
                assert not isinstance(t, HostTensor) and t.device == device, \
                    f"{name} got a tensor not on the model's device ({tuple(t.shape)}, {t.dtype})"
            calls[name] += 1
        return hook

    engine.student.register_forward_pre_hook(check("student"), with_kwargs=True)
    engine.teacher.register_forward_pre_hook(check("teacher"), with_kwargs=True)
    return calls


def _run(engine_sft, engine_opd):
    """Both stages' steps under host emulation; returns the models' call counts."""
    from trainer_fixtures import batch_of

    from zeda_megatron.training.moe_metrics import group_loss, null_metrics
    from zeda_megatron.training.rollout import sample
    from zeda_megatron.training.step import train_step

    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (12, 7)]
    host_batch = _on_host(batch_of(seqs, length=13))
    with HostDefaultDevice():
        assert isinstance(torch.arange(3), torch.Tensor)  # (the mode only marks the trainer's tensors)
        out = train_step(engine_sft, [host_batch])
        null_metrics(engine_sft), group_loss(engine_sft, 1)
        r = sample(engine_opd.student, [[[5, 9, 11], [7, 20, 21, 22]]], max_new_tokens=3, temperature=1.0,
                   eos_id=-1, pad_id=0, generator=torch.Generator().manual_seed(0))
        assert r.replay is not None and r.forwards >= 3  # prefill + decode steps
        assert all(isinstance(t, HostTensor) for t in r.batches[0].values())  # batches come back on the host
        train_step(engine_opd, r.batches, replay=r.replay)
        null_metrics(engine_opd), group_loss(engine_opd, 1)
    return dict(out, forwards=r.forwards)


def _expect_failure(fn):
    try:
        fn()
    except (AssertionError, DeviceMismatch) as e:
        return str(e)
    return None


def _worker(rank, world, hf_dir):
    from trainer_fixtures import make_engine

    import inspect
    import textwrap

    import zeda_megatron.training.step as step
    from zeda_megatron.distributed import init_parallel

    init_parallel()
    sft = make_engine(hf_dir, stage="sft", kl_weight=0.5, lr=1e-3)
    opd_engine = make_engine(hf_dir, stage="opd", kl_weight=1.0, nll_weight=0.0, lr=1e-3)
    calls_sft, calls_opd = _install_checks(sft), _install_checks(opd_engine)
    out = _run(sft, opd_engine)
    result = {"loss": out["loss"], "forwards": out["forwards"], "calls_sft": dict(calls_sft),
              "calls_opd": dict(calls_opd)}
    # negative control 1: the step does not move the batch
    good = step.to_device
    step.to_device = lambda batch, device: dict(batch)
    try:
        result["no_move"] = _expect_failure(lambda: _run(sft, opd_engine))
    finally:
        step.to_device = good
    # negative control 2: the sampler hands the model the step's token and position ids without moving
    # them off the host
    from zeda_megatron.training.rollout import engine as rollout_engine

    good = rollout_engine.Engine._upload
    src = textwrap.dedent(inspect.getsource(good))
    line = "return host.to(self.device, non_blocking=True)"
    assert line in src, "the sampler's upload changed: update this negative control"
    ns = dict(vars(rollout_engine))  # the sampler's own globals (and module name)
    exec(src.replace(line, "return host"), ns)
    rollout_engine.Engine._upload = ns["_upload"]
    try:
        result["no_device"] = _expect_failure(lambda: _run(sft, opd_engine))
    finally:
        rollout_engine.Engine._upload = good
    return result


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from bridge_fixtures import make_tiny_hf

    hf = make_tiny_hf("qwen3_moe", str(tmp_path_factory.mktemp("dev") / "hf"), seed=0)
    return run_distributed(_worker, 1, hf)[0]


def test_every_tensor_handed_to_the_models_is_on_their_device(result):
    assert torch.isfinite(torch.tensor(result["loss"]))
    # stage 1 (forward KL: the teacher runs) and stage 2 (sampling passes, routing record, step)
    assert result["calls_sft"]["student"] >= 1 and result["calls_sft"]["teacher"] >= 1
    # stage 2: every sampling forward (prefill, decode steps) went through the check, then the step
    assert result["forwards"] >= 3 and result["calls_opd"]["student"] == result["forwards"] + 1
    assert result["calls_opd"]["teacher"] >= 1


def test_the_device_check_fails_when_a_batch_is_not_moved(result):
    assert result["no_move"] is not None and "not on the model's device" in result["no_move"]


def test_the_device_check_fails_for_a_tensor_made_on_the_host(result):
    assert result["no_device"] is not None
