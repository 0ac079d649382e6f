# builtin algorithm templates, shared trainer and the train stage (issue 4). See README "train".
.PHONY: test-train bench-train

## test-train    the template, trainer and train-stage tests (set CELLMAP_A3DS_OFFICIAL_TEMPLATES to include the official-template test)
test-train: setup
	$(PY) -m pytest -q tests/test_templates.py tests/test_train.py

## bench-train   samples/s of segresnet, swinunetr and dints (CPU, or GPU with AMP) -> bench/results/train.json
bench-train: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m bench.run --out bench/results --only train
