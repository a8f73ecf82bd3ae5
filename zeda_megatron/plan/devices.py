"""What the time plan assumes about the hardware and the software's per-operation host cost.

GPU figures are the vendors' datasheet numbers (dense, i.e. without 2:4 sparsity):

* H100 SXM5 80 GB: BF16 Tensor Core 989 TFLOP/s (the datasheet's 1,979 is with sparsity), HBM3
  3.35 TB/s, NVLink 4 900 GB/s per GPU (both directions: 450 GB/s each way).
  https://www.nvidia.com/en-us/data-center/h100/ (datasheet table "H100 SXM").
* H200 SXM 141 GB: BF16 989 TFLOP/s dense (1,979 with sparsity), HBM3e 4.8 TB/s, NVLink 900 GB/s.
  https://www.nvidia.com/en-us/data-center/h200/ (datasheet table "H200 SXM").
* A100 SXM4 80 GB: BF16 312 TFLOP/s dense (624 with sparsity), HBM2e 2,039 GB/s, NVLink 3 600 GB/s
  (300 GB/s each way). https://www.nvidia.com/en-us/data-center/a100/ (datasheet table "A100 80GB SXM").
* Between nodes, one InfiniBand port per GPU as in NVIDIA's DGX systems: NDR 400 Gb/s (50 GB/s each
  way, ConnectX-7) with H100/H200 (DGX H100/H200 user guide: 8 x ConnectX-7 400 Gb/s for 8 GPUs), HDR
  200 Gb/s (25 GB/s, ConnectX-6) with A100 (DGX A100 user guide: 8 x ConnectX-6 200 Gb/s).
* Host link (the CPU-offloaded optimizer): PCIe Gen5 x16 (64 GB/s each way) for H100/H200, Gen4 x16
  (32 GB/s) for A100 (same datasheets).

Assumed, not measured (stated so that they can be changed): the fraction of peak a real kernel mix
reaches (matmul 50 %, HBM 80 %, NVLink/IB 70 %, PCIe 40 % with 8 GPUs sharing the host), a collective's
latency (25 us inside a node), the CPU Adam's share of host memory bandwidth per GPU (15 GB/s), and
8 us of host time per eager aten operation on a GPU node (Python + megatron-core module code + the
CUDA launch; this machine's CPU measures 12-15 us per operation through megatron-core).

Operation counts (aten ops per layer, per forward of a decode step and per training micro-batch with
full recompute and the optimizer step) were counted on the tiny models with a TorchDispatchMode in
zeda_megatron's own code paths (docs/time_plan.md has the command); they do not depend on the widths.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    matmul_flops: float  # peak dense FLOP/s of the training dtype (bf16 on GPUs; measured fp32 on the CPU)
    memory_bytes_s: float  # HBM (or host memory) bandwidth
    memory_gb: float
    link_bytes_s: float = 0.0  # inside a node, per GPU and direction (NVLink)
    network_bytes_s: float = 0.0  # between nodes, per GPU and direction (InfiniBand)
    host_link_bytes_s: float = 0.0  # PCIe, per GPU and direction
    host_adam_bytes_s: float = 15e9  # host memory bandwidth the CPU Adam of one GPU's shard gets
    host_op_s: float = 8e-6  # host time per eager aten operation (a forward)
    host_train_op_s: float = 8e-6  # the same in a training step (forward + autograd backward)
    async_host: bool = True  # device work overlaps the host's dispatch (GPUs); False: one thread does both
    matmul_efficiency: float = 0.5
    memory_efficiency: float = 0.8
    link_efficiency: float = 0.7
    host_link_efficiency: float = 0.4
    collective_latency_s: float = 25e-6
    gpus_per_node: int = 8
    source: str = ""

    def with_(self, **changes) -> "DeviceSpec":
        return replace(self, **changes)


GPUS = {
    "h100": DeviceSpec("NVIDIA H100 SXM5 80GB", 989e12, 3.35e12, 80, link_bytes_s=450e9, network_bytes_s=50e9,
                       host_link_bytes_s=64e9, source="nvidia.com/en-us/data-center/h100 (datasheet)"),
    "h200": DeviceSpec("NVIDIA H200 SXM 141GB", 989e12, 4.8e12, 141, link_bytes_s=450e9, network_bytes_s=50e9,
                       host_link_bytes_s=64e9, source="nvidia.com/en-us/data-center/h200 (datasheet)"),
    "a100": DeviceSpec("NVIDIA A100 SXM4 80GB", 312e12, 2.039e12, 80, link_bytes_s=300e9, network_bytes_s=25e9,
                       host_link_bytes_s=32e9, source="nvidia.com/en-us/data-center/a100 (datasheet)"),
}

# aten operations per layer: {family: {"moe" | "dense": per layer, "base": embedding, output, sampling}}
DECODE_OPS = {"glm4_moe_lite": {"moe": 344, "dense": 171, "base": 19},
              "qwen3_moe": {"moe": 262, "dense": 109, "base": 19}}
TRAIN_OPS = {"glm4_moe_lite": {"moe": 1599, "dense": 645, "base": 199},
             "qwen3_moe": {"moe": 1291, "dense": 463, "base": 189}}


def device(name: str) -> DeviceSpec:
    key = str(name).lower()
    if key not in GPUS:
        raise ValueError(f"gpu={name!r} is unknown; use one of {sorted(GPUS)}")
    return GPUS[key]


def ops_of(table: dict, family: str, moe_layers) -> int:
    """Operations of one pass over the given layers (1 = MoE, 0 = dense) of ``family``."""
    ops = table[family.replace("_plus_plus", "")]
    return ops["base"] + sum(ops["moe"] if m else ops["dense"] for m in moe_layers)
