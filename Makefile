# cellmap-auto3dseg: see README.md. `make help` lists every target with one line.
# Sections: setup, test, lint, demo, bench, data, containers, cluster. A target's help line is the
# `## name  text` comment above it; `make help` prints them in this order.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
export PYTHONDONTWRITEBYTECODE := 1

.DEFAULT_GOAL := help

## help          this list
.PHONY: help
help:
	@awk '/^# ---- / { sub(/^# ---- /, ""); sub(/ -+$$/, ""); printf "\n%s\n", $$0 } \
	      /^## / { sub(/^## /, "make "); print "  " $$0 }' $(MAKEFILE_LIST)

# ---- setup ------------------------------------------------------------------------------------------
.PHONY: setup clean

## setup         create .venv (VENV=...) and install everything (CPU torch first)
setup: $(STAMP)

# torch==2.13.0 first: any other torch request may pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[all,dev]'
	touch $@

## clean         remove the demo and bench outputs
clean:
	rm -rf demo_work demo_data bench/results bench/work

# ---- test -------------------------------------------------------------------------------------------
.PHONY: test test-fast test-convert test-analyze test-bundlegen test-train test-ensemble test-evaluate

## test          the whole test suite, slow tests included (what CI runs after lint and typecheck)
test: setup
	$(PY) -m pytest -q

## test-fast     the suite without the tests marked slow
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

## test-convert  the convert / ngff / real-geometry tests (the 245-crop tree is marked slow)
test-convert: setup
	$(PY) -m pytest -q tests/test_ngff.py tests/test_convert.py tests/test_convert_cli.py \
		tests/test_convert_pooling.py tests/test_real_geometry.py

## test-analyze  the analyze tests
test-analyze: setup
	$(PY) -m pytest -q tests/test_analyze.py

## test-bundlegen the bundlegen tests (set CELLMAP_A3DS_OFFICIAL_TEMPLATES to include the official-template test)
test-bundlegen: setup
	$(PY) -m pytest -q tests/test_bundlegen.py tests/test_official_templates.py

## test-train    the template, trainer and train-stage tests (set CELLMAP_A3DS_OFFICIAL_TEMPLATES to include the official-template test)
test-train: setup
	$(PY) -m pytest -q tests/test_templates.py tests/test_train.py

## test-ensemble the ensemble and export tests (incl. three briefly trained builtin bundles)
test-ensemble: setup
	$(PY) -m pytest -q tests/test_ensemble.py tests/test_ensemble_bundles.py tests/test_export.py tests/test_export_real.py \
		tests/test_export_predict.py

## test-evaluate the challenge metric on hand-computed cases and the evaluate stage (docs/evaluation.md)
test-evaluate: setup
	$(PY) -m pytest -q tests/test_evaluate.py

# ---- lint -------------------------------------------------------------------------------------------
.PHONY: lint typecheck

## lint          ruff check + ruff format --check (config: pyproject.toml [tool.ruff])
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

## typecheck     mypy on common/, stages/, training/ and slurm/ (config: pyproject.toml [tool.mypy])
typecheck: setup
	$(PY) -m mypy

# ---- demo -------------------------------------------------------------------------------------------
.PHONY: demo evaluate

## demo          run the whole chain on a synthetic CellMap-like dataset, on CPU
demo: setup
	$(PY) -m tools.demo --work-dir demo_work --data-root demo_data

## evaluate      score a submission: make evaluate TRUTH=<truth.zarr> SUB=<submission.zip|zarr> [OUT=eval_out]
evaluate: setup
	$(PY) -m stages.evaluate --truth $(TRUTH) --submission $(SUB) --out $(or $(OUT),eval_out)

# ---- bench ------------------------------------------------------------------------------------------
.PHONY: bench bench-convert bench-analyze bench-train bench-ensemble bench-export bench-predict

## bench         every benchmark; JSON under bench/results/ (one: python -m bench.run --only NAME)
bench: setup
	$(PY) -m bench.run --out bench/results

## bench-convert convert vs a region-reading converter and the I/O floor -> bench/results/convert.json
bench-convert: setup
	$(PY) -m bench.run --only convert --out bench/results

## bench-analyze analyze wall time, 1 vs 2 workers and sharded vs unsharded (bench/results/analyze.json)
bench-analyze: setup
	$(PY) -m bench.run --out bench/results --only analyze

## bench-train   samples/s of segresnet, swinunetr and dints (CPU, or GPU with AMP) -> bench/results/train.json
bench-train: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m bench.run --out bench/results --only train

## bench-ensemble peak memory and time of the ensemble, 1 vs 3 members (bench/results/ensemble.json)
bench-ensemble: setup
	$(PY) -m bench.run --out bench/results --only ensemble

## bench-export  export peak memory, block-wise vs whole crop, real crop 985 geometry (bench/results/export.json)
bench-export: setup
	$(PY) -m bench.run --out bench/results --only export

## bench-predict predict peak memory vs the block budget, throughput (bench/results/predict.json)
bench-predict: setup
	$(PY) -m bench.run --out bench/results --only predict

# ---- data -------------------------------------------------------------------------------------------
.PHONY: plan-convert data-sizes

## plan-convert  what convert would do per crop (WORK=dir, optional DATA=root; writes nothing)
plan-convert: setup
	$(PY) -m stages.convert --work-dir $(WORK) $(if $(DATA),--data-root $(DATA)) --plan

## data-sizes    chunks and bytes convert reads from the real crop tables (python -m tools.data_sizes)
data-sizes: setup
	$(PY) -m tools.data_sizes

# ---- containers -------------------------------------------------------------------------------------
# Container images. See docs/containers.md and containers/*.sh.
.PHONY: images images-base save sif images-lint test-images test-images-cuda gpu-check

## images        build all images (docker or podman), offline from the wheelhouse; prints sizes
images: setup
	PYTHON=$(abspath $(PY)) containers/build.sh $(IMAGES)

## images-base   podman only: debootstrap + import the Debian base the Dockerfiles name (no registry)
images-base:
	containers/make-base.sh

## save          write images/<stage>.tar (docker archives) for clusters without docker
save:
	containers/save.sh $(STAGES)

## sif           images/<stage>.sif with apptainer (from the docker daemon, else from images/*.tar)
sif:
	containers/sif.sh $(STAGES)

## images-lint   hadolint every Dockerfile, shellcheck every shell script
images-lint: setup
	$(PY) -m containers.lint

## test-images   the container tests, including the real podman build of the convert image
test-images: setup
	$(PY) -m pytest -q tests/test_containers.py tests/test_containers_podman.py

## test-images-cuda  the built train/ensemble images proven on CPU (make images IMAGES="train ensemble" first)
test-images-cuda: setup
	$(PY) -m pytest -q tests/test_images_cuda.py

## gpu-check     per-algorithm GPU steps/s, peak memory, busy % -> bench/results/gpu.json (GPU_CHECK_ARGS=--cpu: reduced CPU mode)
gpu-check: setup
	$(PY) -m bench.gpu $(GPU_CHECK_ARGS)

# ---- cluster ----------------------------------------------------------------------------------------
# SLURM orchestration. See docs/cluster.md and slurm/localcluster.sh.
.PHONY: status test-status slurm-up slurm-down slurm-status slurm-health test-slurm

## status        the status table of a work dir: make status WORK=demo_work [JSON=1]
status: setup
	$(PY) -m slurm.status --work-dir $(or $(WORK),demo_work) $(if $(JSON),--json,)

## test-status   the status command tests
test-status: setup
	$(PY) -m pytest -q tests/test_status.py

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
