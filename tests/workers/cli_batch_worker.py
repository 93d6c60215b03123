"""Run several `minidisc` command lines, each in its own process forked from this one once the engine and its
libraries are imported (tests with many short, failing runs pay one interpreter start, not one each).

    python cli_batch_worker.py LOGS ARGV_JSON     ARGV_JSON: a JSON list of argument lists

Prints one JSON list: per command line, its exit status and its stderr.
"""
import json
import sys
from pathlib import Path

from kill_matrix_worker import run_child


def main() -> None:
    logs, commands = Path(sys.argv[1]), json.loads(sys.argv[2])
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    for i, argv in enumerate(commands):
        log = logs / f"{i:02d}.log"
        results.append({"exit": run_child(argv, None, log), "stderr": log.read_text()})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
