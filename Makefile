# Two commands for a new user: `make test` and `make demo`. Both set up .venv first.
PY := .venv/bin/python
# Detectron2's convention: datasets live under $DETECTRON2_DATASETS (default ./datasets).
export DETECTRON2_DATASETS ?= $(CURDIR)/datasets
UCMERCED := $(DETECTRON2_DATASETS)/UCMerced_LandUse
# Documented fallback: the location CI provides. Without it, prepare_ucmerced.py downloads the zip.
UCMERCED_FALLBACK := $(CURDIR)/../shared/datasets/UCMerced_LandUse
DEMO_CONFIG := configs/fal_p2p3_R18_cpu.yaml
DEMO_OUTPUT := output/demo

.PHONY: env data test demo clean

env:
	@bash tools/bootstrap_env.sh

data: env
	@if [ ! -d "$(UCMERCED)/Images" ]; then \
	  if [ -d "$(UCMERCED_FALLBACK)/Images" ]; then \
	    $(PY) datasets/prepare_ucmerced.py --source "$(UCMERCED_FALLBACK)" --verify "$(UCMERCED_FALLBACK)/MANIFEST.tsv"; \
	  else \
	    $(PY) datasets/prepare_ucmerced.py; \
	  fi; \
	fi

test: env
	@bash tools/install_browser.sh
	$(PY) -m pytest -q tests

demo: data
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUTPUT)

clean:
	rm -rf output .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
