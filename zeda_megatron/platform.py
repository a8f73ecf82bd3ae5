"""CPU platform layer: lets stock megatron-core 0.19.2 run on CPU with the gloo backend.

This is the only module in zeda-megatron that patches megatron-core, and it does nothing when CUDA
is available: on a GPU, megatron-core's own paths (Transformer Engine specs, grouped GEMM, NCCL,
CUDA RNG tracker) are used untouched. Call :func:`setup_platform` once per process, before building
models; it is idempotent.

Each CUDA assumption bridged here, with where megatron-core makes it:

=====================================================  ==========================================
megatron-core site                                      bridge
=====================================================  ==========================================
``torch.cuda.current_device()`` used as a device:       ``current_device`` returns the CPU device
router weights/buffers (moe/router.py), TP/EP
gather/reduce-scatter/a2a outputs
(tensor_parallel/mappings.py), RoPE ``inv_freq``,
global memory buffer (utils.py)
AlltoAll dispatcher ``torch.cuda.Stream()``,            inert stream/event objects; ``stream()`` is
``current_stream``, ``stream``, ``record_event``        a null context
(moe/token_dispatcher.py), ``synchronize``
``maybe_move_tensor_to_cpu(as_numpy=True)`` keeps       returns ``.numpy()`` for CPU tensors too,
CPU split sizes as tensors (moe/moe_utils.py), which    as it does for CUDA ones
``all_to_all_single`` rejects
CUDA RNG tracker ``fork()`` even at dropout 0           :class:`CPURNGStatesTracker`, same API,
(tensor_parallel/random.py)                             forks the CPU generator
activation recompute saves/restores the CUDA RNG        there is no CUDA generator: get returns an
state (tensor_parallel/random.py                        empty state, set does nothing (the CPU
``_get/_set_cuda_rng_state``)                           state is saved by the same code already)
``device="cuda"`` tensor factories: token counters in   inside those modules only, ``torch``'s
pipeline_parallel/schedules.py, loss-scale/found-inf    tensor factories map ``device="cuda"`` to
tensors in optimizer/optimizer.py, norms in             the CPU
optimizer/clip_grads.py and utils.py (multi-tensor
l2 norm fallback), DDP buffer warm-up in
distributed/param_and_grad_buffer.py
``clip_grad_by_total_norm_fp32`` asserts grads are      the same scaling without the type assert
``torch.cuda.FloatTensor`` (optimizer/clip_grads.py)    (optimizer/optimizer.py's reference)
``WrappedTorchNorm`` asserts ``not sequence_parallel``   built with SP off, its weights marked
(transformer/torch_norm.py; the local spec's norms)     ``sequence_parallel = True`` (as TE's norms
                                                        are) so ``finalize_model_grads`` sums their
                                                        grads over TP (each rank saw s/TP tokens)
uneven ``all_gather`` of a tensor list in               pad each split to the largest, one
``_gather_along_first_dim(output_split_sizes=...)``     ``all_gather_into_tensor``, trim: gloo's
(tensor_parallel/mappings.py), used by the AlltoAll     list all_gather needs equal sizes (uneven
dispatcher over expert-TP and by the backward of its    reduce_scatter and all_to_all_single work)
reduce-scatter
MLA accepts a duplicated (TP-replicated) ``Linear``     :class:`DuplicatedLinear` is supplied as
for ``linear_q/kv_down_proj`` only when Transformer      ``multi_latent_attention.Linear``; the local
Engine imports (transformer/multi_latent_attention.py   spec uses it for the q/kv down projections
``Linear = None`` otherwise)                            at TP > 1 (ColumnParallelLinear + gather
                                                        there never sums the rope-key gradient over
                                                        TP: silently wrong grads)
=====================================================  ==========================================

Settings that must stay off on CPU (validated by :func:`check_cpu_config`): fused kernels
(``moe_permute_fusion``, ``moe_router_fusion``, ``gradient_accumulation_fusion``, ...),
``moe_grouped_gemm`` (Transformer Engine), the ``flex`` dispatcher, and overlap options that
use CUDA side streams.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import types

import torch

log = logging.getLogger(__name__)

_INSTALLED = False
CPU = torch.device("cpu")
_CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",  # local_multi_tensor_l2_norm (grad norm without apex/TE)
)


def _cpu_factories_torch():
    """A stand-in for the ``torch`` module whose tensor factories send device="cuda" to the CPU."""

    def wrap(factory):
        def make(*args, device=None, **kwargs):
            if device is not None and str(device).startswith("cuda"):
                device = CPU
            return factory(*args, device=device, **kwargs)

        return make

    names = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like")
    return types.SimpleNamespace(**{**vars(torch), **{n: wrap(getattr(torch, n)) for n in names}})


def on_cpu() -> bool:
    """True when this process has no usable CUDA device (the CPU platform applies)."""
    return os.environ.get("ZEDA_FORCE_CPU", "0") == "1" or not torch.cuda.is_available()


class _InertStream:
    """Stands in for torch.cuda.Stream/Event on CPU: every operation is synchronous already."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _InertStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _InertStream)

    def __hash__(self):
        return 0


_THE_STREAM = _InertStream()


def _make_cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mp_random

    class CPURNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """megatron-core's RNG tracker API over the CPU generator (dropout, init under fork())."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CPURNGStatesTracker


def install_cpu_rng_tracker() -> None:
    """Install the CPU RNG tracker as megatron-core's global tracker (keeps any states it had)."""
    from megatron.core.tensor_parallel import random as mp_random

    cls = _make_cpu_rng_tracker_class()
    if isinstance(mp_random._CUDA_RNG_STATE_TRACKER, cls.__mro__[1]) and type(
        mp_random._CUDA_RNG_STATE_TRACKER
    ).__name__ == cls.__name__:
        return
    mp_random._CUDA_RNG_STATE_TRACKER = cls()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _in_dtype(module, dtype):
    for param in module.parameters():
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    return module


def _install_sequence_parallel_torch_norm() -> None:
    """WrappedTorchNorm under sequence parallelism: build it with SP off, then mark its parameters
    ``sequence_parallel = True`` so finalize_model_grads sums their gradients over TP (each TP rank
    normalised only its s/TP tokens), exactly what Transformer Engine's norms declare. Its weights take
    the model's parameter dtype, as TE's norms do (torch's norms are built in fp32 whatever
    ``params_dtype`` says; an fp32 weight in a bf16 model breaks the distributed optimizer)."""
    from megatron.core.transformer import torch_norm

    cls = torch_norm.WrappedTorchNorm
    orig = cls.__new__
    if getattr(orig, "_zeda_bridge", False):
        return

    def __new__(cls_, config, hidden_size, eps=1e-5, **kwargs):
        if not config.sequence_parallel:
            return _in_dtype(orig(cls_, config, hidden_size, eps, **kwargs), config.params_dtype)
        local = copy.copy(config)  # shallow: no __post_init__ re-validation
        local.sequence_parallel = False
        norm = _in_dtype(orig(cls_, local, hidden_size, eps, **kwargs), config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    __new__._zeda_bridge = True
    cls.__new__ = staticmethod(__new__)


def _install_uneven_first_dim_gather() -> None:
    """Gloo's list all_gather needs equal tensor sizes; megatron-core gathers uneven per-rank row
    counts (``output_split_sizes``) over expert-TP in the AlltoAll dispatcher. Pad each rank's rows
    to the largest count, gather with ``all_gather_into_tensor``, drop the padding."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    orig = mappings._gather_along_first_dim
    if getattr(orig, "_zeda_bridge", False):
        return

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group is None or group.size() == 1:
            return orig(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        rank = dist.get_rank(group)
        if input_.shape[0] != sizes[rank]:
            raise RuntimeError(
                f"uneven gather: rank {rank} holds {input_.shape[0]} rows, split sizes say {sizes[rank]}"
            )
        width = max(sizes)
        rest = tuple(input_.shape[1:])
        padded = input_.new_zeros((width, *rest))
        padded[: sizes[rank]] = input_
        out = input_.new_empty((width * len(sizes), *rest))
        dist.all_gather_into_tensor(out, padded, group=group)
        return torch.cat([out[i * width: i * width + n] for i, n in enumerate(sizes)], dim=0)

    _gather_along_first_dim._zeda_bridge = True
    mappings._gather_along_first_dim = _gather_along_first_dim


_DUPLICATED_LINEAR = None


def _duplicated_linear_class():
    """megatron-core's local ``Linear`` (post_training/modelopt/layers.py) in TE's
    ``parallel_mode='duplicated'``: every TP rank holds the whole weight; under sequence parallelism
    each rank's gradient covers its s/TP tokens and finalize_model_grads sums them over TP."""
    global _DUPLICATED_LINEAR
    if _DUPLICATED_LINEAR is not None:
        return _DUPLICATED_LINEAR
    from megatron.core import parallel_state as ps
    from megatron.core.post_training.modelopt.layers import Linear
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    class DuplicatedLinear(Linear):
        def __init__(self, input_size, output_size, *, config, init_method, bias=True, gather_output=False,
                     parallel_mode=None, tp_group=None, **kwargs):
            super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                             parallel_mode="duplicated", tp_group=None, **kwargs)
            if config.perform_initialization:  # as Router: same seed on every TP rank, same weight
                with torch.no_grad():
                    init_method(self.weight)
                    if self.bias is not None:
                        self.bias.zero_()
            # Same state-dict keys as ColumnParallelLinear (an empty _extra_state).
            self._register_load_state_dict_pre_hook(
                lambda state_dict, prefix, *args, **kw: state_dict.setdefault(f"{prefix}_extra_state")
            )

        def set_extra_state(self, state):
            """Extra state is ignored."""

        def get_extra_state(self):
            return None

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            """Replicated over TP (one main replica per TP group) and DP."""
            dp = (metadata or {}).get("dp_cp_group") or ps.get_data_parallel_group(with_context_parallel=True)
            return make_sharded_tensors_for_checkpoint(
                self.state_dict(prefix="", keep_vars=True), prefix, {}, sharded_offsets,
                tp_group=ps.get_tensor_model_parallel_group(), dp_cp_group=dp,
            )

    _DUPLICATED_LINEAR = DuplicatedLinear
    return DuplicatedLinear


def _install_mla_duplicated_linear() -> None:
    from megatron.core.transformer import multi_latent_attention as mla

    if mla.Linear is None:
        mla.Linear = _duplicated_linear_class()


def setup_platform() -> bool:
    """Install the CPU bridges if CUDA is absent. Returns True when running on the CPU platform."""
    global _INSTALLED
    if not on_cpu():
        return False
    if _INSTALLED:
        return True

    # torch.cuda.* entry points megatron-core calls unconditionally.
    torch.cuda.current_device = lambda: CPU
    torch.cuda.Stream = _InertStream
    torch.cuda.Event = _InertStream
    torch.cuda.current_stream = lambda *a, **k: _THE_STREAM
    torch.cuda.default_stream = lambda *a, **k: _THE_STREAM
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.set_device = lambda *a, **k: None

    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    _orig_move = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return _orig_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    # Modules that allocate with device="cuda" get a torch whose tensor factories map "cuda" to
    # the CPU; the global torch is left untouched.
    import importlib

    cpu_torch = _cpu_factories_torch()
    for name in _CUDA_FACTORY_MODULES:
        importlib.import_module(name).torch = cpu_torch

    from megatron.core.optimizer import clip_grads, optimizer as mc_optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if isinstance(clip_coeff, torch.Tensor):
            clip_coeff = clip_coeff.clamp_max(1.0)
        elif clip_coeff >= 1.0:
            return
        for g in grads:
            g.mul_(clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    mc_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mp_random._set_cuda_rng_state = lambda *a, **k: None
    install_cpu_rng_tracker()
    _install_sequence_parallel_torch_norm()
    _install_uneven_first_dim_gather()
    _install_mla_duplicated_linear()
    _INSTALLED = True
    log.info("zeda_megatron: CPU platform layer installed (gloo, no CUDA)")
    return True


# Config fields that select CUDA-only kernels or side streams; all must be off on CPU.
_CPU_OFF = (
    "moe_permute_fusion",
    "moe_router_fusion",
    "moe_grouped_gemm",
    "gradient_accumulation_fusion",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "apply_rope_fusion",
    "persist_layer_norm",
    "moe_shared_expert_overlap",
    "overlap_dispatch_backward_with_experts_wgrad",
)


def cpu_config_overrides() -> dict:
    """TransformerConfig keyword overrides needed on the CPU platform (empty on GPU)."""
    if not on_cpu():
        return {}
    return {name: False for name in _CPU_OFF} | {"use_cpu_initialization": True}


def check_cpu_config(config) -> None:
    """Raise a clear error for a TransformerConfig that selects a CUDA-only path on CPU."""
    if not on_cpu():
        return
    bad = [name for name in _CPU_OFF if getattr(config, name, False)]
    if bad:
        raise ValueError(
            f"TransformerConfig has {', '.join(f'{b}=True' for b in bad)}, which need CUDA/"
            "Transformer Engine; set them to False on CPU (zeda_megatron.platform."
            "cpu_config_overrides() gives the full set)."
        )
    if getattr(config, "moe_token_dispatcher_type", "alltoall") == "flex":
        raise ValueError(
            "moe_token_dispatcher_type='flex' (DeepEP/HybridEP) needs CUDA; use 'alltoall' or "
            "'allgather' on CPU."
        )
