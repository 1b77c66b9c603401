"""Start-up hook of the test venv: lets torchvision's pure-Python parts import under a CPU build of torch.

The registry has no CPU build of torchvision; the wheel that pairs with torch 2.13 links the CUDA torch libraries,
so under torch+cpu its C ops never load and `import torchvision` fails (`operator torchvision::nms does not exist`).
transformers imports torchvision whenever it is installed, and open_clip always does, so without this every process
of the venv that touches either fails. When torchvision is first imported, this module tries to load its C
extension; only if that fails does it declare the two op schemas torchvision registers fake kernels for, which is
all the transforms need. It is installed into the venv by `make install` (a .pth line imports it in every process),
never shipped with the library. A CUDA build of torch, or a torchvision whose C ops load, is left untouched.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import sys

_LIBRARY = None  # kept alive for the life of the process: dropping it would remove the schemas


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is None or spec.origin is None:
            return spec
        import torch

        for extension in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
            try:
                torch.ops.load_library(extension)
                return spec
            except OSError:
                break
        global _LIBRARY
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _LIBRARY.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return spec


if not any(isinstance(finder, _DeclareTorchvisionOps) for finder in sys.meta_path):
    sys.meta_path.insert(0, _DeclareTorchvisionOps())
