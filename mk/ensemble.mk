# ensemble stage, challenge export and the status command (issue 5). See README "ensemble" and "status".
.PHONY: test-ensemble bench-ensemble bench-export bench-predict status evaluate test-evaluate

## test-ensemble the ensemble, export and status tests (incl. three briefly trained builtin bundles)
test-ensemble: setup
	$(PY) -m pytest -q tests/test_ensemble.py tests/test_ensemble_bundles.py tests/test_export.py tests/test_export_real.py \
		tests/test_export_predict.py tests/test_status.py

## bench-export  export peak memory, block-wise vs whole crop, real crop 985 geometry (bench/results/export.json)
bench-export: setup
	$(PY) -m bench.run --out bench/results --only export

## bench-predict  predict peak memory vs the block budget, throughput (bench/results/predict.json)
bench-predict: setup
	$(PY) -m bench.run --out bench/results --only predict

## test-evaluate the challenge metric on hand-computed cases and the evaluate stage (docs/evaluation.md)
test-evaluate: setup
	$(PY) -m pytest -q tests/test_evaluate.py

## evaluate      score a submission: make evaluate TRUTH=<truth.zarr> SUB=<submission.zip|zarr> [OUT=eval_out]
evaluate: setup
	$(PY) -m stages.evaluate --truth $(TRUTH) --submission $(SUB) --out $(or $(OUT),eval_out)

## bench-ensemble peak memory and time of the ensemble, 1 vs 3 members (bench/results/ensemble.json)
bench-ensemble: setup
	$(PY) -m bench.run --out bench/results --only ensemble

## status        the status table of a work dir: make status WORK=demo_work [JSON=1]
status: setup
	$(PY) -m slurm.status --work-dir $(or $(WORK),demo_work) $(if $(JSON),--json,)
