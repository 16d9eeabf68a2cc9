"""A main_env application process for the lifecycle tests.

    python client_process.py MODE MODEL_PATH

Starts a BatchedInference, prints the worker's pid as JSON, then:
  sleep  -- sleeps (the test SIGKILLs this process: the worker must follow)
  exit   -- returns without stop() (atexit must clean up)
  block  -- blocks on a long request (the test sends SIGINT: no hang)
"""

from __future__ import annotations

import json
import sys
import time

from bridge import BatchedInference


def main() -> None:
    mode, model = sys.argv[1], sys.argv[2]
    client = BatchedInference(model_id=model, engine="torch")
    print(json.dumps({"worker_pid": client.status()[0]["pid"]}), flush=True)
    if mode == "sleep":
        time.sleep(600)
    elif mode == "block":
        texts = [("long text to keep the worker busy " * 40) + str(i) for i in range(4000)]
        client.embed(sentences=texts).result()
    elif mode == "exit":
        return


if __name__ == "__main__":
    main()
