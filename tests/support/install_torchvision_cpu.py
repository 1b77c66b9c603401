"""Install tests/support/torchvision_cpu.py as a start-up hook of the running venv (called by `make install`).

Writes `_bigmodel_torchvision_cpu.py` and a `.pth` line importing it into this interpreter's site-packages, so that
every process of the test venv, subprocesses included, can import torchvision (and so transformers and open_clip)
under a CPU build of torch. Idempotent; does nothing outside a virtual environment.
"""

import shutil
import sys
import sysconfig
from pathlib import Path

if sys.prefix == sys.base_prefix:
    sys.exit("not in a virtual environment; refusing to install the torchvision start-up hook system-wide")
site = Path(sysconfig.get_paths()["purelib"])
shutil.copyfile(Path(__file__).with_name("torchvision_cpu.py"), site / "_bigmodel_torchvision_cpu.py")
(site / "_bigmodel_torchvision_cpu.pth").write_text("import _bigmodel_torchvision_cpu\n", encoding="utf-8")
