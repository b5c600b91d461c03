"""Fine-tune an exported model with adapters, through the pretraining loop and DeepSpeed engine.

    python -m tessera.train.finetune --config configs/finetune-lora-demo.yaml [base=RUN_DIR/model] [key=value ...]
    torchrun --nproc_per_node 8 -m tessera.train.finetune --config ... base=RUN_DIR/model

The model comes from `base` (an exported RUN_DIR/model; a recipe may name it, the command line may override it);
`task` is contrastive (the pretraining loss on paired shards) or fewshot (classification of k labelled shots per
class against the class prompts); `adapter.kind=lora` trains LoRA adapters on the
towers in `adapter.lora` (peft), `prompt` trains the prompts in `adapter.prompt` (CoOp context in the class
prompts, VPT tokens in a ViT, peft prompt tuning of a Hugging Face text tower), `full` trains every weight.
A LoRA run leaves OUTPUT_DIR/adapter (peft's adapter_config.json + adapter_model.safetensors) and
OUTPUT_DIR/model (the base with the adapter merged in); a prompt run leaves OUTPUT_DIR/adapter
(prompt_config.json + prompt_model.safetensors); both beside the usual metrics, checkpoints and evaluation.
`--help` lists every key.
"""

from __future__ import annotations

import sys

from .pretrain import run
from .recipes.runs import FinetuneConfig


def main(argv: list[str] | None = None) -> int:
    return run(argv, FinetuneConfig, "python -m tessera.train.finetune", __doc__)


if __name__ == "__main__":
    sys.exit(main())
