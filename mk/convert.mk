# convert stage, OME-NGFF geometry, synthetic CellMap fixture (issue 2). See README "convert".
.PHONY: test-convert bench-convert

## test-convert  the convert / ngff tests only (about 40 s on 2 cores)
test-convert: setup
	$(PY) -m pytest -q tests/test_ngff.py tests/test_convert.py tests/test_convert_cli.py

## bench-convert convert vs a naive converter and the I/O floor -> bench/results/convert.json
bench-convert: setup
	$(PY) -m bench.run --only convert --out bench/results
