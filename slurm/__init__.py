"""SLURM orchestration: site profiles, the chain submitter and a local test cluster.

``python -m slurm.submit`` writes one sbatch script per job under ``<work_dir>/slurm/`` and
records the job ids in ``<work_dir>/slurm/jobs.json``; ``slurm/localcluster.sh`` runs a real
single-node SLURM for the tests.
"""
