"""Fine-tuning a pretrained image tower on smaller hardware: a classifier of the embedded shapes' attributes.

`finetune(FinetuneConfig(source=...))` loads the image tower of a bigmodel checkpoint (as saved, resharded,
consolidated to safetensors, or exported with export-hf) into one process, puts a linear or MLP head on its class
token and trains on accelerate: one process or DDP (`accelerate launch --multi_gpu`), fp32 or bf16, gradient
accumulation. See docs/finetune.md.
"""

from bigmodel.finetune.task import FinetuneConfig, FinetuneResult, finetune
from bigmodel.finetune.weights import load_vision_tower

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "load_vision_tower"]
