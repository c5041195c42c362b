"""Placeholder application: prints the (now disciplined) time every 10 s."""

import time

while True:
    print(f"enclave time {time.time():.6f}", flush=True)
    time.sleep(10)
