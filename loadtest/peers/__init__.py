"""Training runners for loadtest/bench_training.py, one per library (see setup.sh)."""
