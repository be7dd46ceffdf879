# radnode: the two set-up commands of the README.
#   make run   - create .venv on first use, install, start the node with embedded defaults
#   make test  - create .venv if needed, install the Debian peers the tests use, run pytest
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A local wheel folder (if the machine has one) lets pip find the CPU build of torch.
WHEELS := $(wildcard /opt/wheels)
PIP_INSTALL := $(BIN)/python -m pip --disable-pip-version-check install $(if $(WHEELS),--find-links $(WHEELS))
# Debian packages of the real peers the tests talk to: command -> package.
DEBIAN_TOOLS := storescu:dcmtk Orthanc:orthanc dciodvfy:dicom3tools plastimatch:plastimatch \
  strace:strace systemd-analyze:systemd chromium:chromium chromedriver:chromium-driver
# PostgreSQL (initdb:postgresql) is checked by path below: Debian keeps initdb off PATH.
# Libraries and plugins (no command to look for): file path -> package.
DEBIAN_FILES := /usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb
PYTEST_ARGS ?=

.PHONY: run test install debian-tools clean-venv

run: $(VENV)/.installed
	$(BIN)/radnode serve

test: $(VENV)/.installed debian-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	# The node tests once more on pynetdicom's ordinary receive path (node.fast_receive off).
	RADNODE_NODE__FAST_RECEIVE=false $(BIN)/python -m pytest tests/test_node_*.py $(PYTEST_ARGS)

install: $(VENV)/.installed

# pyradiomics builds a C extension against the numpy already in the venv, so numpy
# and versioneer come first and its build runs without isolation; torch is pinned to
# the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel
	$(PIP_INSTALL) torch==2.13.0 numpy versioneer
	$(PIP_INSTALL) --no-build-isolation pyradiomics
	$(PIP_INSTALL) -e '.[test]'
	# nnunetv2 -> dynamic-network-architectures -> timm brings PyPI's torchvision, built for the
	# CUDA torch: against the CPU torch it fails to import (operator torchvision::nms does not
	# exist). nnU-Net's predictor uses neither, so both go when torchvision does not import.
	$(BIN)/python -c "import torchvision" 2>/dev/null || $(BIN)/python -m pip uninstall -y -q torchvision timm
	touch $@

debian-tools:
	@missing=""; for pair in $(DEBIAN_TOOLS); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; \
	done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	for pair in $(DEBIAN_FILES); do \
	  test -e "$${pair%%:*}" || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

clean-venv:
	rm -rf $(VENV)
