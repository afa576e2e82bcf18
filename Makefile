# Set-up is automatic: every target creates or reuses .venv and installs from pyproject.toml.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := runs/demo
DEMO_TRAIN_N ?= 160
DEMO_TEST_N ?= 60
DEMO_AASCE_N ?= 20
# bf16 autocast is ~1.7x faster on CPUs with AVX512-BF16 (measured: 17 vs 10 img/s); elsewhere fp32.
DEMO_PRECISION ?= $(shell grep -q avx512_bf16 /proc/cpuinfo 2>/dev/null && echo bf16-mixed || echo 32-true)

AASCE ?= ../shared/data/aasce
.PHONY: demo model pack-aasce test test-all benchmark benchmark-mixed mixed-data clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (set PYTHON=python3.x)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# make demo: fine-tune the shipped model for a few minutes on a small labelled set of 3D phantom films,
# then read films neither model saw (3D phantom films of a new seed, both views, and - where the AASCE
# films are present - fractures simulated on the films of the shipped model's held-out patients) with the
# shipped and the fine-tuned model, evaluate both and show them side by side.
demo: $(STAMP)
	$(PY) -m data.phantom --out $(DEMO)/data/train --n $(DEMO_TRAIN_N) --seed 11 --view both
	$(PY) -m data.phantom --out $(DEMO)/data/test --n $(DEMO_TEST_N) --seed 12 --view both
	@if [ -d "$(AASCE)" ]; then \
	  $(PY) -m data.simulate --aasce $(AASCE) --held-out 0.2 --limit $(DEMO_AASCE_N) --out $(DEMO)/data/aasce --n 1 --seed 7 --size 1024 \
	  && $(PY) -m data.combine $(DEMO)/data/test/manifest.csv $(DEMO)/data/aasce/manifest.csv --out $(DEMO)/data/unseen; \
	else \
	  echo "$(AASCE) not found: the unseen films are phantom films only"; \
	  $(PY) -m data.combine $(DEMO)/data/test/manifest.csv --out $(DEMO)/data/unseen; \
	fi
	$(PY) train.py fit --config configs/demo.yaml --trainer.precision $(DEMO_PRECISION)
	$(PY) -m training.export --checkpoint $(DEMO)/last.ckpt --out $(DEMO)/bundle --name demo-fine-tuned --overwrite
	@# infer.py exits 1 when it turns a film away (no_spine) or one fails; the evaluation counts those films
	$(PY) infer.py --out $(DEMO)/infer_shipped --quiet $(DEMO)/data/unseen/manifest.csv || [ $$? -eq 1 ]
	$(PY) infer.py --model $(DEMO)/bundle --out $(DEMO)/infer --quiet $(DEMO)/data/unseen/manifest.csv || [ $$? -eq 1 ]
	$(PY) evaluate.py --predictions $(DEMO)/infer_shipped/predictions.csv --manifest $(DEMO)/data/unseen/manifest.csv --out $(DEMO)/report_shipped --n-boot 200
	$(PY) evaluate.py --predictions $(DEMO)/infer/predictions.csv --manifest $(DEMO)/data/unseen/manifest.csv --out $(DEMO)/report --n-boot 200
	$(PY) -m evaluation.model_card --model $(DEMO)/bundle --metrics $(DEMO)/report/metrics.json --out $(DEMO)/report/model_card.md
	@echo
	$(PY) -m evaluation.side_by_side shipped=$(DEMO)/report_shipped fine-tuned=$(DEMO)/report --out $(DEMO)/comparison.md
	@echo
	@echo "shipped model: $$($(PY) -c 'from models.registry import default_model; print(default_model())') (models/registry.json)"
	@echo "fine-tuned:    $(DEMO)/bundle/ (metadata.json, *.safetensors, README.md; loads with no pickle)"
	@echo "inference:     $(DEMO)/infer_shipped/ and $(DEMO)/infer/ (predictions.csv, <name>.json, <name>_heatmap.png/.npy)"
	@echo "evaluation:    $(DEMO)/report_shipped/ and $(DEMO)/report/ (report.html, metrics.json, plots); $(DEMO)/comparison.md"
	@echo "notebook:      notebooks/evaluate.ipynb (reads $(DEMO) by default)"
	@echo "Synthetic phantom films and fractures simulated on real films only: these numbers say nothing about clinical performance."

# make model: train the shipped model (configs/shipped.yaml; the time on 2 CPU cores and on one GPU is in
# benchmarks/RESULTS.md). Stage 1 trains on the 3D phantom alone (the 3D arm of benchmarks/transfer.py),
# stage 2 goes on from its weights on the 3D phantom plus the real AASCE films with simulated fractures,
# holding out 20 % of the AASCE patients. Then calibration on the validation films, export (int8 weights:
# 10 MB for 10 M parameters; fp16 would need 20.4 MB) and the card. MODEL_EPOCHS / MODEL_STEPS set the budget of the two stages.
# On a GPU machine that receives only the repository: the same steps by benchmarks/gpu_model.sh, with the
# AASCE films carried re-encoded (make pack-aasce) and the packages it lacks as wheels (its header says how).
MODEL := runs/model
MODEL_NAME ?= spine-vcf-default
# the exported version; calibration derives the next minor one (2.1.0), the one that ships
MODEL_VERSION ?= 2.0.0
MODEL_EPOCHS ?= 10
MODEL_STEPS ?= 300
MODEL_STORAGE ?= int8
model: $(STAMP)
	$(PY) -m benchmarks.transfer --arms 3d --epochs $(MODEL_EPOCHS) --stages data,train --out $(MODEL)/stage1
	test -f $(MODEL)/simulated/manifest.csv || $(PY) -m data.simulate --aasce $(AASCE) --out $(MODEL)/simulated --n 2 --seed 0 --size 1024
	$(PY) -m data.combine $(MODEL)/stage1/3d/data/manifest.csv $(MODEL)/simulated/manifest.csv --out $(MODEL) \
		--test-fraction-of $(MODEL)/simulated/manifest.csv=0.2
	$(PY) train.py fit --config configs/shipped.yaml --trainer.max_steps $(MODEL_STEPS) --trainer.precision $(DEMO_PRECISION) \
		$$(test -f $(MODEL)/last.ckpt && echo --ckpt_path $(MODEL)/last.ckpt)
	$(PY) -m training.export --checkpoint $(MODEL)/last.ckpt --out $(MODEL)/bundle-raw --name $(MODEL_NAME) --version $(MODEL_VERSION) --storage $(MODEL_STORAGE) --overwrite
	$(PY) -m calibration --model $(MODEL)/bundle-raw --manifest $(MODEL)/manifest.csv --split val --out $(MODEL)/bundle
	@echo "shipped-model candidate: $(MODEL)/bundle (benchmark it with python -m benchmarks.shipped_model, then copy it to models/bundles/)"

# The AASCE films re-encoded (at most 1024 px on the longer side, JPEG; about 16 MB) for a run that must
# carry them, such as the GPU run of make model (benchmarks/gpu_model.sh).
pack-aasce: $(STAMP)
	$(PY) -m data.pack_aasce --aasce $(AASCE) --out runs/carry/aasce

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q --runslow

benchmark: $(STAMP)
	$(PY) -m benchmarks.phantom_benchmark --epochs 16 --extra '--trainer.precision bf16-mixed'

# Evaluate the phantom + simulated-real model (runs/mix/best.ckpt; see mixed-data below) on its held-out
# simulated-real films, the real held-out AASCE films and phantom films of seed 1000.
benchmark-mixed: $(STAMP)
	$(PY) -m benchmarks.mixed_benchmark --aasce $(AASCE)

# Phantom films + fractures simulated on the real AASCE films (not part of this repository),
# with 20 % of the AASCE patients held out as split = test. Train: configs/phantom_plus_simulated.yaml
# (CPU) or configs/phantom_plus_simulated_tall.yaml (GPU)
mixed-data: $(STAMP)
	$(PY) -m data.phantom --out runs/mix/phantom --n 2000 --seed 1
	$(PY) -m data.simulate --aasce $(AASCE) --out runs/mix/simulated --n 2 --seed 0 --size 1024
	$(PY) -m data.combine runs/mix/phantom/manifest.csv runs/mix/simulated/manifest.csv --out runs/mix \
		--test-fraction-of runs/mix/simulated/manifest.csv=0.2

clean:
	rm -rf runs/debug runs/demo .pytest_cache
