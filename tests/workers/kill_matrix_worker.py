"""The kill matrix's driver: `python kill_matrix_worker.py LOGS COMMAND POINT,POINT,... ARGS...`.

Runs `minidisc COMMAND ARGS` once per kill point, each time in a new process that SIGKILLs itself at that point
(MINIDISC_KILL_AT): the first as ARGS say (a fresh run unless they hold --resume), the others with --resume;
then once more with --resume, to the end. The processes are forked from this one once the engine, torch,
DeepSpeed and transformers are imported, so a kill costs the work it interrupts rather than an interpreter
start; each is still a whole process that dies as on a node failure, leaving only what it wrote to disk.
After each one, what --out holds is recorded.

Prints one JSON object: per run, its point, exit status (-9 for SIGKILL), log file and the top-level entries of
--out with whether each model folder there is complete.
"""
import json
import os
import sys
import traceback
from pathlib import Path

import deepspeed  # noqa: F401  (imported once, before the forks)
import transformers  # noqa: F401

import engine.report.render  # noqa: F401
import engine.schedule.pipelines  # noqa: F401
from engine.cli import main as cli
from engine.core import faults
from engine.core.outputs import is_ours

MODELS = ("ta", "student", "baselines")


def run_child(argv: list[str], point: str | None, log: Path) -> int:
    pid = os.fork()
    if pid == 0:
        with open(log, "w") as out:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
        code = 1
        try:
            if point:
                os.environ[faults.KILL_AT] = point
            code = cli.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:  # never return into this loop
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def outputs(out: Path) -> dict:
    """--out's top-level entries; for each model folder, whether it is complete (ours, with config and weights)."""
    folders = [out / "ta", out / "student", *sorted((out / "baselines").glob("*"))]
    return {"entries": sorted(p.name for p in out.iterdir()) if out.is_dir() else [],
            "models": {str(p.relative_to(out)): is_ours(p) and (p / "config.json").is_file()
                       and any(p.glob("*.safetensors")) for p in folders if p.exists()}}


def main() -> None:
    logs, command, points, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(","), sys.argv[4:]
    out = Path(args[args.index("--out") + 1])
    logs.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, point in enumerate([*points, None]):
        log = logs / f"{i:02d}-{(point or 'final').replace('/', '_').replace(':', '_')}.log"
        code = run_child([command, *args, *(["--resume"] if i and "--resume" not in args else [])], point, log)
        runs.append({"point": point, "exit": code, "log": str(log), **outputs(out)})
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
