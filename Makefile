# Two commands do all set-up: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/omnitransfer generate --ref camera=samples/camera_ref1.mp4 --image samples/camera_ref1.jpg \
		--prompt "the camera pans across a city street" --output outputs/demo.mp4
	$(VENV)/bin/omnitransfer demo --output outputs/demo --photo samples/camera_ref1.jpg --photo samples/effect_ref2.jpg --photo samples/motion_ref3.jpg

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) outputs
