"""Starting jobs the way clusters do: torchrun, deepspeed, mpirun and srun command lines (`commands`) and Slurm job
scripts (`slurm`). `commands` imports no torch, so a command can be built where no GPU stack is installed."""
