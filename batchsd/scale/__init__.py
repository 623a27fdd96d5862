"""Running one job on many processes: who-am-I launchers (--shard, SLURM, torchrun, Kubernetes) and the Ray engine."""
