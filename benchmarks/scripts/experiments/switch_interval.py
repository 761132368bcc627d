"""Experiment (agents-dense-switch-interval-0.5ms-cuda-20261126T062933.json): the agents bench with
another GIL switch interval: python3 switch_interval.py SECONDS [djinn bench agents arguments]."""
import sys
sys.setswitchinterval(float(sys.argv[1]))
from djinn.bench import agents
sys.exit(agents.main(sys.argv[2:]))
