"""A faster transport for ZeRO and FSDP2 collectives on the gloo backend (CPU clusters and tests); off unless
enabled. NCCL runs torch's collectives as they are."""
