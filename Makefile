# Two commands do all set-up: `make demo` and `make test`.
# Both install exactly requirements.lock (every package pinned, with hashes) with uv, which `make`
# bootstraps into .uv/ from nothing but python3. `make lock` regenerates the lock from pyproject.toml;
# `make test-latest` runs the suite against the newest versions pyproject.toml's ranges allow.
# Packages are compiled to bytecode when installed: where PYTHONDONTWRITEBYTECODE is set (as on this
# project's machines) every process would otherwise compile torch, diffusers and transformers from source
# when it imports them (measured: importing the pipeline 27 s -> 11 s on the 2-core machine).
VENV        ?= .venv
LATEST_VENV ?= .venv-latest
PYTHON      ?= python3
UV_VERSION  := 0.13.9
UV_HOME     := .uv
UV          := $(UV_HOME)/bin/uv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
LOCK        := requirements.lock
# The CPU build of torch (torch==2.13.0+cpu): a local folder of wheels where the machine has one,
# PyTorch's CPU index otherwise. Override with `make TORCH_WHEELS=DIR_OR_URL ...`.
TORCH_WHEELS ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl),/opt/wheels,https://download.pytorch.org/whl/cpu/torch/)
export UV_PYTHON_DOWNLOADS := never
TORCH_PIN   := $(shell sed -n 's/^\(torch==[^ ]*\).*/\1/p' $(LOCK))

.PHONY: demo test browser lock test-latest clean

$(UV):
	$(PYTHON) -m venv $(UV_HOME)
	$(UV_HOME)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): $(LOCK) pyproject.toml | $(UV)
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip sync --quiet --python $(PY) --require-hashes --compile-bytecode --find-links $(TORCH_WHEELS) $(LOCK)
	$(UV) pip install --quiet --python $(PY) --no-deps --no-build-isolation -e .
	$(UV) pip check --python $(PY)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/omnitransfer generate --ref camera=samples/camera_ref1.mp4 --image samples/camera_ref1.jpg \
		--prompt "the camera pans across a city street" --output outputs/demo.mp4
	$(VENV)/bin/omnitransfer demo --output outputs/demo --photo samples/camera_ref1.jpg --photo samples/effect_ref2.jpg --photo samples/motion_ref3.jpg

test: $(STAMP)
	$(PY) -m pytest

# Debian's Chromium and its driver, for the web page's test in a real browser (tests/test_web_browser.py,
# which says it was skipped without them). Installs as root; does nothing where both are present.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then echo "chromium: present"; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; fi

lock: | $(UV)
	$(PYTHON) scripts/lock.py --uv $(UV) --find-links $(TORCH_WHEELS)

# Not part of CI: finds upstream drift before it reaches the lock. torch stays at the lock's CPU build
# (a newer torch from PyPI is a CUDA build of several GB).
test-latest: | $(UV)
	$(UV) venv --quiet --clear --python $(PYTHON) $(LATEST_VENV)
	echo "$(TORCH_PIN)" > $(LATEST_VENV)/torch-constraint.txt
	$(UV) pip install --quiet --refresh --compile-bytecode --python $(LATEST_VENV)/bin/python --find-links $(TORCH_WHEELS) \
		--constraint $(LATEST_VENV)/torch-constraint.txt -e ".[test]"
	$(UV) pip check --python $(LATEST_VENV)/bin/python
	@echo "newer than $(LOCK):"
	@$(UV) pip freeze --python $(LATEST_VENV)/bin/python --exclude-editable > $(LATEST_VENV)/freeze.txt.raw
	@tr 'A-Z_' 'a-z-' < $(LATEST_VENV)/freeze.txt.raw | sort > $(LATEST_VENV)/freeze.txt
	@sed -n 's/^\([A-Za-z0-9_.-]*==[^ ]*\).*/\1/p' $(LOCK) | sort | comm -13 - $(LATEST_VENV)/freeze.txt | sed 's/^/  /'
	$(LATEST_VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(UV_HOME) outputs
