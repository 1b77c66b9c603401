"""bigmodel: pretraining multimodal (image + text) encoders across many GPUs and nodes."""

__version__ = "0.1.0"
