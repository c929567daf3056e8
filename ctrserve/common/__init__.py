"""What every layer shares, below all of them: the user-input error (errors.py) and the Redis
key schema of the online state (keys.py). It imports nothing else of ctrserve."""
