"""The student weights of an ``engine=deepspeed`` iteration folder, for megatron models (export,
``model.init_checkpoint``): ``iter_#######/student_ep###.pt`` holds one expert-parallel rank's
student state dict (dense weights + that rank's experts), written beside DeepSpeed's own checkpoint
(``iter_#######/ds/``)."""

from __future__ import annotations

import json
import os
import re

import torch

DS_TAG = "ds"  # DeepSpeed's checkpoint tag inside an iteration folder (iter_0000020/ds/)
WEIGHTS = "student_ep{ep:03d}.pt"  # this expert-parallel rank's student weights (dense + its experts)
DS_LAYOUT = "ds_layout.json"  # the expert-parallel size and ZeRO stage the folder was written at


def is_deepspeed_checkpoint(path: str) -> bool:
    """An iteration folder written by engine=deepspeed."""
    return os.path.isdir(os.path.join(path, DS_TAG))


_EXPERT_KEYS = (re.compile(r"^(.*\.experts\.local_experts\.)(\d+)(\..*)$"),  # SequentialMLP
                re.compile(r"^(.*\.experts\.linear_fc[12]\.(?:weight|bias))(\d+)()$"))  # TEGroupedMLP


def _expert_key(key: str):
    """(prefix, local expert index, suffix) of a megatron expert parameter key, else None."""
    for pat in _EXPERT_KEYS:
        m = pat.match(key)
        if m:
            return m.group(1), int(m.group(2)), m.group(3)
    return None


def _local_experts(keys) -> int:
    idx = [e[1] for e in map(_expert_key, keys) if e is not None]
    return max(idx) + 1 if idx else 0


def saved_ep(path: str) -> int:
    """The expert-parallel size a deepspeed iteration folder was written at."""
    layout_file = os.path.join(path, DS_LAYOUT)
    if not os.path.isfile(layout_file):
        return 1
    with open(layout_file) as f:
        return int(json.load(f)["ep"])


def load_student_weights(student, path: str) -> None:
    """Load the student weights of a deepspeed iteration folder (``student_ep###.pt`` per
    expert-parallel rank) into a megatron model of any expert-parallel size (tensor parallelism 1,
    as engine=deepspeed trains): this rank's experts are picked from the files that hold them."""
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() > 1:
        raise ValueError(f"{path!r} was written by engine=deepspeed (tensor parallelism 1): load it with "
                         "parallel.tp=1 (export: tools/export_hf.py --tp 1)")
    src_ep = saved_ep(path)
    ep, rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    own = student.state_dict()
    if src_ep == ep:
        state = torch.load(os.path.join(path, WEIGHTS.format(ep=rank)), map_location="cpu", weights_only=True)
    else:  # re-map experts: global index = rank * local experts + local index
        n_tgt = _local_experts(own)
        files = {}

        def source(r):
            if r not in files:
                files[r] = torch.load(os.path.join(path, WEIGHTS.format(ep=r)), map_location="cpu", weights_only=True)
            return files[r]

        n_src = _local_experts(source(0))
        state = {}
        for k in own:
            e = _expert_key(k)
            if e is None:
                if k in source(0):
                    state[k] = source(0)[k]
                continue
            prefix, j, suffix = e
            g = rank * n_tgt + j
            key = f"{prefix}{g % n_src}{suffix}"
            if key in source(g // n_src):
                state[k] = source(g // n_src)[key]
    with torch.no_grad():
        missing = [k for k in own if torch.is_tensor(own[k]) and k not in state and not k.endswith("_extra_state")]
        if missing:
            raise KeyError(f"{path}: no weights for {missing[:5]} (written at parallel.ep={src_ep})")
        student.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
