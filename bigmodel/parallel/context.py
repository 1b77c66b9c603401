"""The parallel context of one process: where it sits in the job, the layout and the meshes it uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bigmodel.config.schema import Config
from bigmodel.config.validate import resolve_dp_shard
from bigmodel.parallel.dims import Meshes, ParallelDims
from bigmodel.parallel.env import DistEnv, default_device, init_distributed, read_dist_env


@dataclass(frozen=True)
class ParallelContext:
    """This process's view of the job. `meshes` is None in a single-process run."""

    env: DistEnv
    dims: ParallelDims
    device: torch.device
    meshes: Meshes | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, prints and writes shared files."""
        return self.env.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.meshes.dp.get_local_rank() if self.meshes is not None else 0

    @property
    def dp_group(self) -> torch.distributed.ProcessGroup | None:
        """The data-parallel process group, or None when there is a single data-parallel rank."""
        return self.meshes.dp.get_group() if self.meshes is not None and self.dims.dp > 1 else None


def setup_parallel(cfg: Config) -> ParallelContext:
    """Validate the layout against the launcher's world size, join the process group and build the meshes.

    Resolves parallel.dp_shard=-1 in `cfg` (in place: the run directory's config.yaml then records the value).
    Raises ConfigError (one line) before any process-group work if the layout cannot run here.
    """
    env = read_dist_env()
    resolve_dp_shard(cfg, env.world_size)
    dims = ParallelDims.from_config(cfg)
    dims.validate(env.world_size, cfg)
    device = default_device(env.local_rank)
    if not env.distributed:
        return ParallelContext(env, dims, device)
    init_distributed(env)
    return ParallelContext(env, dims, device, dims.build_meshes(device.type))
