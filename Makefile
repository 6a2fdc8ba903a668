# pyfz-gateway: every dependency is installed from here (apt packages too).
# `make test` is what CI runs (.ci/run); `make demo` runs the gateway against the
# development portal in network namespaces.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
APT_PACKAGES := python3 python3-venv python3-dev gcc coturn wireguard-go wireguard-tools \
                iproute2 nftables iperf3 curl ca-certificates procps
STAMP := $(VENV)/.installed

.PHONY: deps apt venv test lint typecheck demo bench clean

# apt packages are installed with --no-install-recommends: wireguard-tools would otherwise
# pull a kernel image, udev and a systemd upgrade.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

deps: apt venv

lint: deps
	$(VENV)/bin/ruff check gateway actors tests bench devportal devclient devstack
	$(VENV)/bin/mypy

test: deps
	$(VENV)/bin/ruff check gateway actors tests bench devportal devclient devstack
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -rfEs $(PYTEST_ARGS)

demo: deps
	$(PY) -m devstack.demo

bench: deps
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
