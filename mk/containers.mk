# Container images (issue 6). See README "Containers" and containers/*.sh.
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
