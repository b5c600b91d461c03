"""What spreads a run over processes: the process groups torchrun (or Slurm) starts (`groups`), DeepSpeed imported the
way Tessera runs it (`deepspeed_setup`), and the DeepSpeed engine: optimizer groups, schedule, precision, ZeRO,
clipping and accumulation (`engine`)."""
