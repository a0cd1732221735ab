# FashionMNIST Latent Diffusion — `make demo`, `make test`, `make lab`.
# Each target builds .venv on demand (python3 -m venv + pip install -e '.[dev]').

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lab venv data lint clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# The dataset: found locally, else (as root on Debian/Ubuntu) the package dataset-fashion-mnist,
# else torchvision's download (needs internet). See data/README.md.
data: $(STAMP)
	@$(BIN)/python -m nbutils data --no-download >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      echo "installing dataset-fashion-mnist with apt-get"; \
	      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) || true; \
	    fi; }

demo: $(STAMP) data
	@mkdir -p runs/demo
	$(BIN)/python -m nbutils info
	$(BIN)/python -m nbutils data --out runs/demo/real_grid.png
	$(BIN)/python -m nbutils reconstruct --n 100 --out runs/demo/vae_reconstructions.png
	$(BIN)/python -m nbutils sample --n 100 --class all --guidance 3 --sampler dpm --steps 20 --out runs/demo/samples.png
	$(BIN)/jupyter nbconvert --to notebook --execute notebooks/00_fashion_mnist.ipynb \
	  --output-dir runs/demo --ExecutePreprocessor.timeout=1800
	@echo "demo done: runs/demo/samples.png (new clothes, one row per class), runs/demo/real_grid.png,"
	@echo "           runs/demo/vae_reconstructions.png, runs/demo/00_fashion_mnist.ipynb"

# The test command of README.md. Unit tests + every notebook through nbval, smoke preset.
test: $(STAMP)
	$(BIN)/ruff check .
	NBUTILS_PRESET=$${NBUTILS_PRESET:-smoke} $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

lab: $(STAMP) data
	$(BIN)/jupyter lab notebooks/

clean-venv:
	rm -rf $(VENV)
