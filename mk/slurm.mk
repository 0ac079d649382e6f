# SLURM orchestration (issue 7). See README "SLURM" and slurm/localcluster.sh.
.PHONY: slurm-up slurm-down slurm-status slurm-health test-slurm

## slurm-up      start the local single-node SLURM (batch + gpu partitions); `slurm/localcluster.sh env` prints its SLURM_CONF
slurm-up:
	slurm/localcluster.sh start

## slurm-down    scancel every job and stop the local SLURM
slurm-down:
	slurm/localcluster.sh stop

## slurm-status  daemons, partitions and jobs of the local SLURM
slurm-status:
	slurm/localcluster.sh status

## slurm-health  run one tiny job per partition of the local SLURM
slurm-health:
	slurm/localcluster.sh health

## test-slurm    the SLURM tests (starts and stops its own local cluster)
test-slurm: setup
	$(PY) -m pytest -q tests/test_slurm_submit.py tests/test_slurm_cluster.py
