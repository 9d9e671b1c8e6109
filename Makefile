# One command each: `make demo` (set up + run the demo), `make test` (set up + run the tests).
# The virtual environment pins torch==2.13.0 (CPU) through requirements/constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): setup.py requirements/constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[test]"
	touch $(STAMP)

# One BLAS/OpenMP thread: the tests use tiny networks, where thread start-up and oversubscription cost more
# than they give (the suite runs several times faster on the 2-core CI machine).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest Testing -q -ra

demo: $(STAMP)
	$(VENV)/bin/ftddm demo --out demo_out --overwrite

clean:
	rm -rf $(VENV) demo_out
