"""The multimodal encoder, in plain single-device PyTorch (no torch.distributed in this package)."""

from bigmodel.models.encoder import DEFAULT_OBJECTIVES, OBJECTIVES, MultimodalEncoder
from bigmodel.models.init import build_model, init_weights

__all__ = ["DEFAULT_OBJECTIVES", "OBJECTIVES", "MultimodalEncoder", "build_model", "init_weights"]
