# make run   — set up .venv and start the server (real model if weights are given, else `tiny`)
# make test  — set up .venv (+ Chromium for the browser test, GStreamer for the webrtcbin WHIP/WHEP
#              test) and run the test suite on the CPU
# make bench — GPU benchmarks (see docs/BENCHMARKS.md)
# make weights ARGS="wan-1.3b --to DIR" — download a model's weights into the --weights layout (README "Weights")
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS ?=

# GStreamer's webrtcbin as a WHIP/WHEP client (tests/test_gstreamer_whip.py), driven from the system python3
GST_PACKAGES := gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-nice gstreamer1.0-libav \
	python3-gst-1.0 gir1.2-gst-plugins-bad-1.0

.PHONY: install run test bench weights browser gstreamer docker clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel of torch 2.13 where the machine has it; any torch >= 2.4 otherwise
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.4"
	$(BIN)/pip install -q -e ".[dev,parity]"
	# the reference implementation, only for parity tests and side-by-side benchmarks
	$(BIN)/pip install -q --no-deps "streamdiffusionv2==0.1.1"
	rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

gstreamer:
	@/usr/bin/python3 tests/gst_whip_client.py --check >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(GST_PACKAGES) >/dev/null)

run: install
	$(BIN)/python -m server $(ARGS)

test: install browser gstreamer
	$(BIN)/python -m pytest -q $(ARGS)

bench: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python -m bench $(ARGS)

weights: install
	$(BIN)/python -m engine fetch $(ARGS)

docker:
	docker build -f docker/Dockerfile -t streamgen:latest .

clean:
	rm -rf $(VENV) .pytest_cache
