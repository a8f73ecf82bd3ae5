"""The run specification: a composed Hydra config resolved once into typed, frozen values.

``zeda_megatron.spec.resolve(cfg, world)`` builds a :class:`RunSpec`; the trainer, the memory/time plan,
the fake-tensor rehearsal, generation and the Slurm job all read it instead of the raw config. Every
value is final here: ``auto`` settings are decided (bf16 or fp32, distributed optimizer, offload while
sampling), the null-expert count and target share are computed, the layout's derived sizes are filled in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

GB = 10**9


@dataclass(frozen=True)
class NullSpec:
    num: int  # Z
    weight: float  # w of the group balance loss
    mask: bool  # route as if there were no null experts
    target_share: float  # equilibrium share of routed slots on null experts: wZ/(E+wZ)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_dir: str | None  # the original model's HF folder (None: shapes only, or a random-init test model)
    hf_config: dict  # the HF config in force (hf_dir/config.json when given)
    source: str  # "hf_dir" | "random_init" | "shapes" (plan/rehearsal without weights)
    family: str  # qwen3_moe | glm4_moe_lite
    num_experts: int  # E
    topk: int
    null: NullSpec
    group_loss_coeff: float
    init_checkpoint: str | None
    mcore: dict  # model.mcore: TransformerConfig fields, already checked
    chat_template: bool


@dataclass(frozen=True)
class LayoutSpec:
    world: int
    tp: int
    pp: int
    ep: int
    etp: int
    sp: bool
    dp: int  # world / (tp * pp)
    edp: int  # expert data parallel: world / (etp * ep * pp)
    gpu_memory_bytes: int | None  # what the memory check plans against (None: no check)


@dataclass(frozen=True)
class StageSpec:
    name: str  # sft | opd
    nll_weight: float
    kl_weight: float
    kl: str  # exact | sampled
    temperature: float
    max_new_tokens: int
    samples_per_prompt: int
    top_p: float
    offload_while_sampling: bool  # resolved: grads + optimizer state leave the GPU while sampling
    router_replay: bool  # record the routing while sampling and replay it in the training forward (stage 2)
    fused_loss: bool

    @property
    def needs_sampling(self) -> bool:
        return self.name == "opd"


@dataclass(frozen=True)
class TrainerSpec:
    max_steps: int
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    num_microbatches: int  # per step and DP rank
    save_interval: int
    keep_checkpoints: int
    save_dir: str | None  # None outside a Hydra run (plan, rehearsal)
    resume: str  # auto | never | a checkpoint path
    recompute: str | None  # None | full | selective
    precision: str  # resolved: bf16 | fp32
    verify_teacher: bool

    @property
    def param_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def dtype(self):
        import torch

        return torch.float32 if self.precision == "fp32" else torch.bfloat16


@dataclass(frozen=True)
class OptimSpec:
    lr: float
    min_lr: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    clip_grad: float
    schedule: str  # cosine | constant
    warmup_fraction: float
    distributed_optimizer: bool  # resolved (auto: on GPUs)
    grad_reduce_in_fp32: bool
    cpu_offload: bool  # megatron-core's HybridDeviceOptimizer
    offload_fraction: float

    def warmup_steps(self, max_steps: int) -> int:
        return int(round(self.warmup_fraction * max_steps))


@dataclass(frozen=True)
class EngineSpec:
    name: str  # megatron | deepspeed
    zero_stage: int  # 0 under megatron
    offload_optimizer: bool
    offload_param: bool
    config: dict  # merged into DeepSpeed's config last

    @property
    def deepspeed(self) -> bool:
        return self.name == "deepspeed"


@dataclass(frozen=True)
class DataSpec:
    path: str | None
    format: str
    chat_template: bool
    cache_dir: str | None
    packing: bool
    synthetic_samples: int


@dataclass(frozen=True)
class RunSpec:
    model: ModelSpec
    layout: LayoutSpec
    stage: StageSpec
    trainer: TrainerSpec
    optim: OptimSpec
    engine: EngineSpec
    data: DataSpec
    seed: int
    run_dir: str | None
    on_gpu: bool  # the run this spec describes trains on GPUs (the plan and rehearsal describe GPU runs on CPU)
    logging: dict = field(default_factory=dict)
    cluster: dict = field(default_factory=dict)
    notes: tuple = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> RunSpec:
        """A copy with dotted fields changed, e.g. ``spec.with_(**{"trainer.recompute": "full"})``."""
        groups: dict = {}
        top = {}
        for key, value in changes.items():
            group, _, name = key.partition(".")
            if name:
                groups.setdefault(group, {})[name] = value
            else:
                top[group] = value
        for group, fields in groups.items():
            top[group] = replace(getattr(self, group), **fields)
        return replace(self, **top)
