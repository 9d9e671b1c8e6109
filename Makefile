# One command each: `make demo` (set up + run the demo), `make test` (set up + run the tests).
# `make demo` installs only what the engine needs; `make test` adds the test extras (pytest, diffusers, slicer-core
# with its vtk). requirements/constraints.txt pins torch==2.13.0; which build of it (CPU or CUDA) pip installs
# depends on the index it finds the wheel on — see the README's "Prerequisites and install".
VENV ?= .venv
PY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.installed-base
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup setup-test test demo clean

setup: $(BASE_STAMP)
setup-test: $(TEST_STAMP)

$(BASE_STAMP): setup.py requirements/constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e .
	touch $(BASE_STAMP)

$(TEST_STAMP): $(BASE_STAMP)
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[test]"
	touch $(TEST_STAMP)

# One BLAS/OpenMP thread: the tests use tiny networks, where thread start-up and oversubscription cost more
# than they give (the suite runs several times faster on the 2-core CI machine).
test: $(TEST_STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest Testing -q -ra

demo: $(BASE_STAMP)
	$(VENV)/bin/ftddm demo --out demo_out --overwrite

clean:
	rm -rf $(VENV) demo_out
