# FashionMNIST Latent Diffusion — `make demo`, `make test`, `make test-all`, `make train`, `make reproduce`, `make lab`.
# Each target builds .venv on demand (python3 -m venv + pip install -c constraints.txt -e '.[dev,notebooks]').

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all train reproduce lab venv data lint clean-venv

venv: $(STAMP)

# constraints.txt pins the versions (the demo picture is reproducible); pyproject.toml keeps the ranges.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,notebooks]'
	@touch $(STAMP)

# The dataset: found locally, else (as root on Debian/Ubuntu) the package dataset-fashion-mnist,
# else torchvision's download (needs internet). See data/README.md.
data: $(STAMP)
	@$(BIN)/python -m nbutils data --no-download >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      echo "installing dataset-fashion-mnist with apt-get"; \
	      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) || true; \
	    fi; }

# The main job: new clothes from the shipped model, one row per class, with the recipe stored beside its weights
# (docs/sampling.md). --checkpoint checkpoints: the shipped weights even when runs/ holds your own
# (sample/reconstruct default to your latest run).
demo: $(STAMP) data
	@mkdir -p runs/demo
	$(BIN)/python -m nbutils sample --checkpoint checkpoints --n 100 --class all --seed 0 \
	  --out runs/demo/samples.png
	$(BIN)/python -m nbutils reconstruct --checkpoint checkpoints --n 100 --out runs/demo/vae_reconstructions.png
	@echo "demo done: runs/demo/samples.png (10 new garments per class, one row per class)"
	@echo "           runs/demo/vae_reconstructions.png (test images and their VAE reconstructions)"

# The whole `cpu`-preset pipeline into runs/cpu: VAE, UNet, 100 samples, 1,000 samples scored by `evaluate`.
train: $(STAMP) data
	$(BIN)/python -m nbutils train-vae --preset cpu --run-dir runs/cpu
	$(BIN)/python -m nbutils train-unet --preset cpu --run-dir runs/cpu
	$(BIN)/python -m nbutils sample --checkpoint runs/cpu --n 100 --class all --out runs/cpu/samples.png
	$(BIN)/python -m nbutils sample --checkpoint runs/cpu --n 1000 --class all --out runs/cpu/samples_1000.npz
	$(BIN)/python -m nbutils evaluate runs/cpu/samples_1000.npz > runs/cpu/evaluation.json
	@echo "train done: runs/cpu/samples.png, runs/cpu/evaluation.json"

# Retrain the shipped models from scratch (the `shipped` preset: every phase), then measure them like the release.
# Hours on a 2-core CPU; interrupt and re-run with RESUME=--resume to continue.
reproduce: $(STAMP) data
	$(BIN)/python -m nbutils train-vae --preset shipped --run-dir runs/shipped $(RESUME)
	$(BIN)/python -m nbutils train-unet --preset shipped --run-dir runs/shipped $(RESUME)
	$(BIN)/python -m nbutils sample --checkpoint runs/shipped --recipe shipped --n 10000 --class all --seed 0 \
	  --out runs/shipped/samples_10000.npz
	$(BIN)/python -m nbutils evaluate runs/shipped/samples_10000.npz > runs/shipped/evaluation.json
	@echo "reproduce done: runs/shipped/ (compare runs/shipped/evaluation.json with docs/results.md)"

# The test command of README.md: ruff, the fast unit tests and every notebook through nbval (smoke preset).
test: $(STAMP)
	$(BIN)/ruff check .
	NBUTILS_PRESET=$${NBUTILS_PRESET:-smoke} $(BIN)/python -m pytest -m "not slow"

# Everything, the slow tests too (real training runs, several processes, full feature extraction): what CI runs.
test-all: $(STAMP)
	$(BIN)/ruff check .
	NBUTILS_PRESET=$${NBUTILS_PRESET:-smoke} $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

lab: $(STAMP) data
	$(BIN)/jupyter lab notebooks/

clean-venv:
	rm -rf $(VENV)
