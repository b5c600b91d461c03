"""Peak memory of one training step of a small CLIP (4 layers of width 128 per tower), in a process of its own.

    python tests/peak_memory_step.py B CHUNK

prints, as JSON, how far the resident set's peak rises over one step of batch B in chunks of CHUNK (the two-pass
step), or in one graph (CHUNK 0). The batch is made before the measurement starts. It sets glibc's mmap threshold
to 64 KiB first (as MALLOC_MMAP_THRESHOLD_=65536 would at process start), so that freed activations go back to the
system and the peak measures live memory, not what the C heap keeps cached.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import torch

from tessera.config import from_dict
from tessera.models import ModelConfig, build_model
from tessera.train.components.objectives import ContrastiveObjective
from tessera.train.components.steps import OneGraphStep, TwoPassStep
from tessera.train.recipes.config import LossConfig

WIDE = {"width": 128, "layers": 4}
TOWERS = {
    "image": {
        "encoder": "open_clip_image",
        "model": "ViT-B-32",
        "overrides": {"image_size": 32, "patch_size": 4, "head_width": 32, **WIDE},
    },
    "text": {"encoder": "open_clip_text", "model": "ViT-B-32", "overrides": {"context_length": 16, "heads": 2, **WIDE}},
}


def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class Engine:
    """What a step uses of DeepSpeed's engine, over the plain model."""

    def __init__(self, model):
        self.model = model
        self.device = torch.device("cpu")

    def __call__(self, batch):
        return self.model(batch)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it also turns off the threshold's dynamic growth


def main(batch_size: int, chunk: int) -> dict:
    if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 65536):
        raise OSError("mallopt(M_MMAP_THRESHOLD) failed")
    torch.set_num_threads(1)
    model = build_model(from_dict(ModelConfig, {"embed_dim": 64, "towers": TOWERS}, "model")).train()
    g = torch.Generator().manual_seed(0)
    batch = {
        "__key__": [str(i) for i in range(batch_size)],
        "image": torch.randn(batch_size, 3, 32, 32, generator=g),
        "text": torch.randint(1, 400, (batch_size, 16), generator=g),
    }
    objective = ContrastiveObjective(model.pairs, LossConfig(tile_size=256))
    step = TwoPassStep(objective, model, chunk, 1) if chunk else OneGraphStep(objective)
    step(Engine(model), {k: v[:8] for k, v in batch.items()})  # the gradients' and allocator's first allocations
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the resident set now
    before = status_bytes("VmRSS")
    step(Engine(model), batch)
    return {"batch": batch_size, "chunk": chunk, "peak_rise_bytes": status_bytes("VmHWM") - before}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
