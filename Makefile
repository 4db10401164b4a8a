# The two commands of the README. Each sets up what it needs first (scripts/bootstrap.sh is
# idempotent: a second run checks a stamp and returns at once).
VENV ?= .venv
PY := $(VENV)/bin/python
# Keep demo and test traffic on this machine.
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST

.PHONY: setup demo test lint params clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(PY) -m ros2_sab3r.ros.demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

# Regenerate config/perception.yaml after changing ros2_sab3r/config.py.
params: setup
	$(PY) -m ros2_sab3r.config > config/perception.yaml

clean:
	rm -rf build $(VENV)
