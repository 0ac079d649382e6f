# analyze and bundlegen stages (issue 3). See README "analyze" and "bundlegen".
.PHONY: test-analyze bench-analyze

## test-analyze  the analyze and bundlegen tests (set CELLMAP_A3DS_OFFICIAL_TEMPLATES to include the official-template test)
test-analyze: setup
	$(PY) -m pytest -q tests/test_analyze.py tests/test_bundlegen.py tests/test_official_templates.py

## bench-analyze analyze wall time, 1 vs 2 workers and sharded vs unsharded (bench/results/analyze.json)
bench-analyze: setup
	$(PY) -m bench.run --out bench/results --only analyze
