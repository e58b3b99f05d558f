# kilnproxy: `make run` starts a demo server, `make test` runs every check (SPEC 10).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export KILNPROXY_HOME ?= $(CURDIR)/var

.PHONY: run test lint readme deps venv stamp clean bench bench-quick bench-profile bench-lookup bench-deps soak

$(BIN)/kilnproxy: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# paramiko as it was before AES-GCM (3.4), beside the current one in the venv: its own
# directory, taken by tests/integration/test_client_families.py through PYTHONPATH (it runs on
# the venv's cryptography; bcrypt and PyNaCl as constraints.txt pins them).
PARAMIKO_OLD := $(VENV)/paramiko-3.4
$(PARAMIKO_OLD)/paramiko/__init__.py: constraints.txt | $(BIN)/kilnproxy
	rm -rf $(PARAMIKO_OLD)
	$(BIN)/pip install --quiet --no-deps --target $(PARAMIKO_OLD) \
	  paramiko==3.4.1 bcrypt==5.0.0 PyNaCl==1.6.2
	touch $@

# The version stamp (SPEC 9) is written when the package is installed, and must name the commit
# checked out, not the one the venv was made at: after a commit, checkout or pull, the package
# alone is installed again (not its dependencies). When nothing changed this costs one git call
# and one interpreter start. Without git or a repository (a tarball), the stamp made at install
# stays. KILNPROXY_BUILD_SHA, if set, stands for the commit, as it does for setup.py.
STAMPED_COMMIT = $(BIN)/python -c 'from kilnproxy.version import build_info; print(build_info().commit)'
stamp: $(BIN)/kilnproxy
	@sha=$${KILNPROXY_BUILD_SHA:-$$(git rev-parse --short=7 HEAD 2>/dev/null)}; \
	if [ -n "$$sha" ] && [ "$$($(STAMPED_COMMIT))" != "$$sha" ]; then \
	  echo "stamping the version for commit $$sha"; \
	  $(BIN)/pip install --quiet --no-deps -e .; \
	fi

venv: $(BIN)/kilnproxy $(PARAMIKO_OLD)/paramiko/__init__.py stamp

# What the tests run against: OpenSSH server and client, git, Mercurial, Debian's Chromium
# for the dashboard test, and PostgreSQL (the tests run their own throwaway cluster with its
# binaries in /usr/lib/postgresql/N/bin; the package's own cluster is not used), HAProxy
# for the two-host test (started by the test on loopback, never as a service), and the other SSH
# clients git can use: PuTTY's plink and puttygen, Dropbear's dbclient and dropbearconvert
# (dropbear-bin: no server is started), curl, built on Debian's libssh2, and Go with its
# x/crypto (a test builds an ssh command on golang.org/x/crypto/ssh).
deps:
	@if ! command -v git >/dev/null || ! command -v hg >/dev/null || \
	    ! command -v ssh >/dev/null || [ ! -x /usr/sbin/sshd ] || \
	    ! command -v chromium >/dev/null || ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
	    ! command -v plink >/dev/null || ! command -v puttygen >/dev/null || \
	    ! command -v dbclient >/dev/null || ! command -v dropbearconvert >/dev/null || \
	    ! command -v curl >/dev/null || ! command -v go >/dev/null || \
	    [ ! -d /usr/share/gocode/src/golang.org/x/crypto/ssh ] || ! command -v haproxy >/dev/null; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    openssh-server openssh-client git mercurial chromium postgresql haproxy \
	    putty-tools dropbear-bin curl golang-go golang-golang-x-crypto-dev >/dev/null; \
	fi
	@# sshd's privilege separation directory, normally made by its (here unused) service.
	@[ -d /run/sshd ] || $(SUDO) install -d -m 0755 /run/sshd

run: venv
	$(BIN)/kilnproxy demo
	exec $(BIN)/kilnproxy serve

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: deps venv lint
	$(BIN)/pytest

# README.md's configuration block, written from the settings kilnproxy/config.py declares (a unit
# test fails while they differ).
readme: venv
	$(BIN)/python -c 'import pathlib, kilnproxy.config as c; p = pathlib.Path("README.md"); \
	  p.write_text(c.with_reference(p.read_text()))'

# Benchmarks against OpenSSH (not part of `make test`): the full run (15-20 minutes), and a
# smaller one (under 5 minutes by estimate; not timed since the full run grew past 3).
bench: bench-deps
	$(BIN)/python bench/run.py

bench-quick: bench-deps
	$(BIN)/python bench/run.py --quick

# The cost of a directory lookup alone, SQLite against PostgreSQL: bench/results/lookup.json.
bench-lookup: bench-deps
	$(BIN)/python bench/lookup.py

# Where a relaying worker's CPU goes (py-spy), through the ssh:// backend and through an agent:
# bench/results/profile-C.txt and profile-E.txt.
bench-profile: bench-deps
	$(BIN)/python bench/profile.py --path C
	$(BIN)/python bench/profile.py --path E

# The soak (issue 12): 50 clients cloning, fetching and pushing git and hg through the ssh://
# backend while the master is HUPed and workers are killed; bench/results/$(SOAK_NAME).{json,png}.
SOAK_MINUTES ?= 30
SOAK_NAME ?= soak
soak: bench-deps
	SOAK_MINUTES=$(SOAK_MINUTES) $(BIN)/python bench/soak.py --name $(SOAK_NAME)

# `patch` applies bench/asyncssh-hotpath.patch to a scratch copy for --asyncssh-patch.
bench-deps: deps venv
	@command -v patch >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq patch >/dev/null; }
	$(BIN)/pip install --quiet -c constraints.txt -e '.[bench]'

clean:
	rm -rf $(VENV) build *.egg-info kilnproxy/_stamp.py
