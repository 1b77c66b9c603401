"""Starting jobs the way clusters do: torchrun, deepspeed, mpirun and srun command lines, and Slurm job scripts.

Imports no torch: building a command must work on a login node without a GPU stack.
"""
