# convert stage, OME-NGFF geometry, synthetic and real-geometry CellMap fixtures (issues 2, 15).
# See README "convert" and docs/geometry.md.
.PHONY: test-convert bench-convert plan-convert

## test-convert  the convert / ngff / real-geometry tests (the 245-crop tree is marked slow)
test-convert: setup
	$(PY) -m pytest -q tests/test_ngff.py tests/test_convert.py tests/test_convert_cli.py \
		tests/test_convert_pooling.py tests/test_real_geometry.py

## plan-convert  what convert would do per crop (WORK=dir, optional DATA=root; writes nothing)
plan-convert: setup
	$(PY) -m stages.convert --work-dir $(WORK) $(if $(DATA),--data-root $(DATA)) --plan

## bench-convert convert vs a region-reading converter and the I/O floor -> bench/results/convert.json
bench-convert: setup
	$(PY) -m bench.run --only convert --out bench/results
