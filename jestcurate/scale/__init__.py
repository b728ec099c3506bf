"""Running at scale: per-shard claims, Slurm array scripts, status of a run."""
