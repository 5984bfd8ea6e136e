# GenServe: `make serve` runs the whole service on tiny demo models; `make test` runs the suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODELS ?= var/models
export HF_HUB_OFFLINE ?= 1

.PHONY: install models serve test test-fast fuzz bench clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $@

install: $(VENV)/.installed

$(MODELS)/.built: $(VENV)/.installed gpu_node/tiny.py
	$(VENV)/bin/genservectl models build-tiny $(MODELS)
	touch $@

models: $(MODELS)/.built

serve: install models
	mkdir -p var/log
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH \
	GENSERVE_MODELS_DIR=$${GENSERVE_MODELS_DIR:-$(CURDIR)/$(MODELS)} \
	LORA_BASE_PATH=$${LORA_BASE_PATH:-$(CURDIR)/$(MODELS)/loras} \
	GENSERVE_DEVICE=$${GENSERVE_DEVICE:-cpu} GENSERVE_NUM_NODES=$${GENSERVE_NUM_NODES:-1} \
	GENSERVE_PRELOAD=$${GENSERVE_PRELOAD:-flux1-dev} \
	$(VENV)/bin/supervisord -n -c supervisord.conf

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not e2e and not slow"

# A longer fuzz of the HTTP API than `make test` runs: a new seed each time unless GENSERVE_FUZZ_SEED is set.
fuzz: install
	GENSERVE_FUZZ_EXAMPLES=$${GENSERVE_FUZZ_EXAMPLES:-500} GENSERVE_FUZZ_SEED=$${GENSERVE_FUZZ_SEED:-} \
	$(PY) -m pytest tests/test_fuzz.py

bench: install
	$(PY) bench/overhead.py

clean:
	rm -rf var $(VENV)
