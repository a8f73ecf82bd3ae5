"""The student weights of an ``engine=deepspeed`` iteration folder, for megatron models (export,
``model.init_checkpoint``): ``iter_#######/student_ep###.pt`` holds one expert-parallel rank's
student state dict (dense weights + that rank's experts), written beside DeepSpeed's own checkpoint
(``iter_#######/ds/``)."""

from __future__ import annotations

import json
import os

import torch

DS_TAG = "ds"  # DeepSpeed's checkpoint tag inside an iteration folder (iter_0000020/ds/)
WEIGHTS = "student_ep{ep:03d}.pt"  # this expert-parallel rank's student weights (dense + its experts)


def is_deepspeed_checkpoint(path: str) -> bool:
    """An iteration folder written by engine=deepspeed."""
    return os.path.isdir(os.path.join(path, DS_TAG))


def load_student_weights(student, path: str) -> None:
    """Load the student weights of a deepspeed iteration folder into a megatron model of the same
    expert-parallel size (this rank's ``student_ep###.pt``)."""
    from megatron.core import parallel_state as ps

    layout_file = os.path.join(path, "ds_layout.json")
    if os.path.isfile(layout_file):
        with open(layout_file) as f:
            saved_ep = int(json.load(f)["ep"])
        ep = ps.get_expert_model_parallel_world_size()
        if saved_ep != ep:
            raise ValueError(f"{path!r} was written by engine=deepspeed at parallel.ep={saved_ep}; load it with "
                             f"parallel.ep={saved_ep} (export: tools/export_hf.py --ep {saved_ep}), not ep={ep}")
    file = os.path.join(path, WEIGHTS.format(ep=ps.get_expert_model_parallel_rank()))
    state = torch.load(file, map_location="cpu", weights_only=True)
    own = student.state_dict()
    with torch.no_grad():
        missing = [k for k in own if torch.is_tensor(own[k]) and k not in state and not k.endswith("_extra_state")]
        if missing:
            raise KeyError(f"{file}: missing {missing[:5]}")
        student.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
