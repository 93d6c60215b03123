"""The `minidisc` command line. Every option is explained by `minidisc COMMAND --help`.

Each command imports the engine modules it needs when it runs, so `--help` and `--version` answer at once,
without loading torch, transformers or DeepSpeed."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from engine.core import faults
from engine.core.errors import UserError
from engine.core.progress import setup_logging

log = logging.getLogger("minidisc")


def _add_prune(sub):
    p = sub.add_parser("prune", help="score units on calibration data, reorder the teacher, list the candidates",
                       description="Step 1 of MiniDisc: accumulate |dL/dmask| of every attention unit (a head; "
                       "under GQA a KV group, or with --attention-unit query-head the j-th query head of every KV "
                       "group) and FFN neuron over calibration batches, normalise per layer, rank globally, "
                       "and permute the weights so every candidate width is a prefix slice. Writes the "
                       "reordered teacher (HF checkpoint + tokenizer) and pruning.json to --out.")
    p.add_argument("--teacher", required=True, metavar="DIR", help="Hugging Face checkpoint directory of the "
                   "teacher (LLaMA, Mistral, Qwen2/2.5, Qwen3 or OPT) with its tokenizer")
    p.add_argument("--data", required=True, nargs="+", metavar="SOURCE", help="calibration data, as compress's "
                   "--data: files, globs or folders of .txt, .jsonl/.json, .parquet, .csv (also .gz), or a "
                   "save_to_disk folder; several sources give blocks by weight (PATH@WEIGHT[@FIELD])")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created; an earlier minidisc "
                   "output is replaced, any other existing non-empty directory is refused)")
    p.add_argument("--sparsities", nargs="+", metavar="S", help="candidate grid as fractions removed in [0, 1) "
                   "(default: 0 0.1 ... 0.9 0.85 0.95)")
    p.add_argument("--calib-samples", type=int, default=64, metavar="N", help="calibration blocks (default 64)")
    # (--seq-len and --batch-size: the earlier names, which compress uses for its training batches)
    p.add_argument("--calib-seq-len", "--seq-len", type=int, default=512, metavar="T", help="tokens per calibration "
                   "block (default 512)")
    p.add_argument("--calib-batch-size", "--batch-size", type=int, default=4, metavar="B", help="calibration blocks "
                   "per backward pass (default 4)")
    p.add_argument("--ffn-multiple", type=int, default=8, metavar="M", help="round each layer's FFN removals to a "
                   "multiple of M neurons (default 8; 1 disables rounding)")
    p.add_argument("--attention-unit", default="kv-group", choices=["kv-group", "query-head"],
                   help="under grouped-query attention: kv-group (a KV head with its query heads; the default) or "
                   "query-head (the j-th query head of every KV group: layers keep the same query heads per group, "
                   "and their KV heads until they keep none)")
    p.add_argument("--attention-norm", default="layer", choices=["layer", "none"],
                   help="attention importance before the global ranking: layer (divided by each layer's L2 norm, as "
                   "FFN scores always are; the default) or none (as measured, keeping the differences between "
                   "layers with few units: better one-shot, worse at high sparsity after training)")
    p.add_argument("--text-field", default="text", metavar="NAME", help="record field holding the text for "
                   "json/jsonl/parquet/csv data (default 'text')")
    p.add_argument("--seed", type=int, default=0, help="seed for shuffling the calibration records (default 0)")
    p.add_argument("--device", default="cpu", help="torch device for calibration, e.g. cpu or cuda (default cpu)")


def _add_export(sub):
    p = sub.add_parser("export", help="write one candidate width as a smaller Hugging Face checkpoint",
                       description="Slice a directory written by `minidisc prune`, or a compress run's "
                       "OUT/supernet, to the width at --sparsity and save it as a real, smaller HF checkpoint "
                       "(safetensors + config + tokenizer).")
    p.add_argument("--model", required=True, metavar="DIR", help="directory written by `minidisc prune` "
                   "(reordered weights + pruning.json), or OUT/supernet of `minidisc compress` (the sandwich's "
                   "trained weights: every width it trained, see the report's Trained widths)")
    p.add_argument("--sparsity", required=True, metavar="S", help="fraction removed, in [0, 1) (0.9 = 10%% "
                   "scale); must be on the pruning grid unless --uniform")
    p.add_argument("--uniform", action="store_true", help="keep the same units in every layer and write a stock "
                   "LlamaForCausalLM/OPTForCausalLM that plain transformers loads. LLaMA head counts are rounded "
                   "to the nearest count dividing hidden_size (transformers requires it); OPT keeps all heads "
                   "(its config ties head_dim to hidden_size) and prunes FFN neurons only. Without --uniform the "
                   "per-layer widths of the global ranking are kept, in a MiniDisc model class that loads with "
                   "trust_remote_code=True (or engine.load_causal_lm)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for the exported checkpoint")


def _add_eval(sub):
    from engine.report.harness import BUILTIN_TASKS

    p = sub.add_parser("eval", help="score models on lm-evaluation-harness tasks (local tasks built in)",
                       description="Runs lm-evaluation-harness (its Hugging Face backend, trust_remote_code=True so "
                       "per-layer exports load their own class) on every MODEL and prints one table; the numbers "
                       "equal `lm_eval --model hf --model_args pretrained=MODEL,trust_remote_code=True` on the same "
                       "tasks. Needs `pip install 'minidisc[eval]'`.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="Hugging Face checkpoint folders (a run's ta/, "
                   "student/, baselines/*/, the teacher, or any other)")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK", help=f"task names: {BUILTIN_TASKS[0]} "
                   f"(rolling perplexity) and {BUILTIN_TASKS[1]} (4-way choice of a passage's true continuation), "
                   "built from --text; tasks defined by YAMLs in --include; or lm_eval's registry (which needs "
                   "its datasets locally or from the Hub)")
    p.add_argument("--text", metavar="FILE", help="text the built-in tasks are made of, one document per record "
                   "or paragraph: .txt, .jsonl/.json, .parquet, .csv or a save_to_disk folder (held-out text, "
                   "not the training data)")
    p.add_argument("--text-field", default="text", metavar="NAME", help="record field holding the text (default "
                   "'text')")
    p.add_argument("--include", metavar="DIR", help="folder of lm-eval task YAMLs, e.g. copies of standard tasks "
                   "with dataset_path/data_files pointing at local files")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="sequences per forward pass (default 8)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N documents of each task (a quick look)")
    p.add_argument("--device", metavar="DEV", help="cpu or cuda (default: cuda when available); float32 on the "
                   "CPU, the checkpoint's dtype on a GPU")
    p.add_argument("--out", metavar="FILE", help="also write the scores as JSON: {tasks, models: {MODEL: {task: "
                   "{metric: value}}}}")


def _add_report(sub):
    p = sub.add_parser("report", help="re-render report.md and the plots of a finished run from its report.json",
                       description="Reads OUT/report.json (written by compress, distill or maxidisc), writes "
                       "OUT/report.md, tradeoff.png, models.png and curves.png again, and prints the summary.")
    p.add_argument("out", metavar="OUT", help="output directory of a finished run")


def _add_plan(sub):
    from engine.cli.memory_plan.presets import PRESETS
    from engine.config import PLAN_FIELDS, add_arguments

    p = sub.add_parser("plan", help="estimate per-GPU memory of a MiniDisc run and recommend a placement",
                       description="Per-GPU memory of the sandwich stage (teacher, supernet parameters+gradients, "
                       "optimizer states, activations of the widths held at once, loss buffers) for several "
                       "placements of the teacher (ZeRO-3, replicated, int8, nf4) and of the trained supernet "
                       "(AdamW, AdamW8bit, CPU offload), from the model config alone; recommends the fastest that "
                       "fits with ~10%% headroom. The run options below are `minidisc compress`'s, with its "
                       "defaults, and a recipe (--config) gives them as it does to `compress`.")
    p.add_argument("model", metavar="MODEL", help="Hugging Face checkpoint directory, a config.json, or a preset: "
                   + ", ".join(PRESETS))
    p.add_argument("--nodes", type=int, metavar="N", help="number of nodes (default: --cluster's, else 1)")
    p.add_argument("--gpus-per-node", type=int, metavar="G", help="GPUs per node (default: --cluster's, else 1)")
    p.add_argument("--gpu-memory", type=float, metavar="GIB", help="memory of one GPU in GiB, e.g. 80 for an "
                   "A100/H100 80GB (required unless --cluster gives it)")
    p.add_argument("--cpu-memory", type=float, metavar="GIB", help="CPU memory per node in GiB; when given, "
                   "offload placements must also fit it (default: not checked)")
    add_arguments(p, only=PLAN_FIELDS)
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")


RUN_COMMANDS = {
    "compress": ("MiniDisc: choose the teacher assistant in one trial and distil the student through it",
                 "With no --teacher and no --data (and no recipe naming them) it runs the built-in example: a "
                 "small LLaMA pretrained on the Python docs (cached after the first run), compressed to 10%%, "
                 "compared with plain KD and with no distillation, in ./minidisc-demo. Otherwise it prunes the "
                 "teacher (unless --teacher was written by `minidisc prune`), trains every candidate TA "
                 "between --truncate and --target-sparsity at once (sandwich training on DeepSpeed), scores them "
                 "by p(s) + lambda * s, exports the chosen TA to OUT/ta, distils the student from it into "
                 "OUT/student, and writes OUT/report.json, report.md and plots."),
    "distill": ("plain knowledge distillation baseline: teacher -> student, no TA",
                "The student (the teacher's target-sparsity slice) is distilled from the teacher directly, with "
                "the same trainer, data and per-stage budget as `compress`."),
    "maxidisc": ("MaxiDisc baseline: teacher -> TA -> student for every candidate TA, best student kept",
                 "Runs one full teacher -> TA -> student trial per candidate (2K-1 distillation stages) and keeps "
                 "the student with the best dev accuracy: the expensive search MiniDisc replaces."),
}
LAUNCH_NOTE = ("Runs as is (one process) or under a launcher: `deepspeed --num_gpus N $(which minidisc) {cmd} ...`, "
               "torchrun, or srun (one task per GPU). Options can also come from a YAML recipe (--config).")


def _add_run_command(sub, name: str) -> None:
    from engine.config import add_arguments

    summary, description = RUN_COMMANDS[name]
    p = sub.add_parser(name, help=summary, description=description + " " + LAUNCH_NOTE.format(cmd=name))
    add_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="check the options (or recipe) against the teacher's "
                   "config.json and tokenizer, the data paths and the DeepSpeed configs without reading weights or "
                   "data, print the candidate widths, the stages and, with --cluster, the memory per GPU; exit 2 "
                   "on the first problem")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("minidisc")
    except PackageNotFoundError:  # a source tree that was not pip-installed
        return "0.0.0+source"


def _add_common(parser, default) -> None:
    """Options accepted before and after the command (`minidisc --log-level DEBUG compress` and
    `minidisc compress --log-level DEBUG`); after it they override, so their default there is 'not given'."""
    parser.add_argument("--log-level", default=default("INFO"), choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="how much to log (default INFO; processes other than rank 0 log warnings only)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=default(None),
                        help="set by the deepspeed launcher; not for users")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block would bury the line that says what to fix."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minidisc", description="Compress LLaMA, Mistral, Qwen and OPT models by structured pruning "
                                     "and distillation, choosing the teacher assistant in one trial (MiniDisc).")
    parser.add_argument("--version", action="version", version=f"minidisc {_version()}")
    _add_common(parser, lambda value: value)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name in RUN_COMMANDS:
        _add_run_command(sub, name)
    _add_prune(sub)
    _add_export(sub)
    _add_eval(sub)
    _add_report(sub)
    _add_plan(sub)
    for command in sub.choices.values():
        _add_common(command, lambda value: argparse.SUPPRESS)
    return parser


def print_candidates(plan, title: str = "MiniDisc candidates") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("sparsity", "scale", "heads", "KV heads", "neurons", "parameters", "of teacher"):
        table.add_column(column, justify="right")
    for row in plan.candidates:
        table.add_row(f"{row['sparsity']:g}", f"{row['scale']:.0%}", str(row["kept_heads"]), str(row["kept_kv_heads"]),
                      str(row["kept_neurons"]), f"{row['parameters']:,}", f"{row['parameter_fraction']:.1%}")
    Console().print(table)  # results go to stdout; logs and progress to stderr


def _is_builtin(args) -> bool:
    """`minidisc compress` naming no teacher and no data runs the built-in example (built once, cached)."""
    from engine.config import given

    values = given(args)
    return args.command == "compress" and not values.get("teacher") and not values.get("data")


def _builtin_defaults(args) -> dict | None:
    if not _is_builtin(args):
        return None
    from engine.cli.demo import builtin_options
    from engine.core import distributed

    distributed.init()
    options = None
    with distributed.main_first("building the built-in example") as main:
        if main:
            options = builtin_options()
    return options or builtin_options()  # the other ranks read what rank 0 built


def run(args) -> None:
    from engine.core.widths import DEFAULT_GRID, parse_grid

    if args.command in RUN_COMMANDS:
        from engine.config import resolve
        from engine.core import distributed
        from engine.report.render import print_summary
        from engine.schedule.pipelines import COMMANDS

        if args.dry_run:
            from engine.cli.dry_run import dry_run

            if _is_builtin(args):  # it would pretrain the built-in teacher first: not a dry run
                raise UserError("--dry-run checks a run against its teacher: give --teacher and --data (or a recipe); "
                                "`minidisc compress` alone runs the built-in example")

            dry_run(resolve(args), args.command)
            return
        report = COMMANDS[args.command](resolve(args, _builtin_defaults(args)))
        if distributed.is_main():
            print_summary(report.to_dict())
    elif args.command == "prune":
        from engine.core import distributed
        from engine.pruning.prune import prune

        _check_pruning_fits(args)
        if distributed.launched():  # the ranks score it partitioned
            distributed.init()
        plan = prune(args.teacher, args.data, args.out, grid=parse_grid(args.sparsities) if args.sparsities else
                     DEFAULT_GRID, calib_samples=args.calib_samples, seq_len=args.calib_seq_len,
                     batch_size=args.calib_batch_size,
                     ffn_multiple=args.ffn_multiple, text_field=args.text_field, seed=args.seed, device=args.device,
                     attention_unit=args.attention_unit, attention_norm=args.attention_norm)
        if plan is not None:  # (rank 0's)
            print_candidates(plan)
    elif args.command == "export":
        from engine.models.export import export

        export(args.model, args.sparsity, args.out, uniform=args.uniform)
    elif args.command == "eval":
        run_eval(args)
    elif args.command == "report":
        from engine.report.render import rerender

        rerender(args.out)
    elif args.command == "plan":
        from engine.cli.memory_plan.advice import run_plan

        run_plan(args)


def run_eval(args) -> None:
    """`minidisc eval`: lm_eval on every model, one table, optionally a JSON file."""
    import json

    from engine.core.hub import model_folder
    from engine.data import load_text_dataset
    from engine.report.harness import evaluate_tasks
    from engine.report.render import benchmark_rows

    folders = {model: model_folder(model) for model in args.models}  # a Hub id: its snapshot in the cache
    for model, folder in folders.items():
        if not (Path(folder) / "config.json").is_file():
            raise UserError(f"{model} is not a Hugging Face checkpoint folder (no config.json)")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--batch-size and --limit must be at least 1")
    texts = list(load_text_dataset(args.text, args.text_field)[args.text_field]) if args.text else None
    results = evaluate_tasks(folders, args.tasks, texts=texts, include=args.include,
                       batch_size=args.batch_size, device=args.device, limit=args.limit)
    header, rows = benchmark_rows({m: {"benchmarks": scores} for m, scores in results["models"].items()})
    columns = list(zip(*rows))  # one row per task and metric, one column per model: fits a terminal
    _print_table("lm-eval scores", ["task metric", *columns[0]], [[h, *c] for h, c in zip(header[1:], columns[1:])])
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(f".{out.name}.partial")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(out)


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _quiet_libraries() -> None:
    """Our own progress bars and logs say what happens; silence the libraries' per-file bars."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _check_pruning_fits(args) -> None:
    """Refuse a calibration batch the machine cannot hold before `prune` loads the teacher (`minidisc plan`'s
    arithmetic; the environment names the launch the way torchrun and the deepspeed launcher do)."""
    import torch

    from engine.cli.memory_plan.pruning import check_pruning_fits
    from engine.core.hub import model_folder
    from engine.models.loading import check_seq_len, checkpoint_dtype, load_config

    config = load_config(model_folder(str(args.teacher)))
    check_seq_len(config, args.calib_seq_len, flag="--calib-seq-len")  # the cheaper refusal first
    world = int(os.environ.get("WORLD_SIZE", 1))
    itemsize = torch.tensor([], dtype=checkpoint_dtype(config)).element_size()
    check_pruning_fits(config, args.calib_batch_size, args.calib_seq_len, args.device, world,
                       int(os.environ.get("LOCAL_WORLD_SIZE", world)), itemsize)


def main(argv=None) -> int:
    faults.install_signal_handler()  # first: a pre-timeout signal or SIGTERM must never kill us mid-write
    args = build_parser().parse_args(argv)
    from engine.training.memory import return_freed_memory  # after --help: torch takes 1.5 s to import

    return_freed_memory()
    if os.environ.get("RANK", "0") != "0" or os.environ.get("SLURM_PROCID", "0") != "0":
        args.log_level = "WARNING"  # one voice per job: rank 0 tells the story
    setup_logging(args.log_level)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's calls
    _quiet_libraries()
    try:
        run(args)
    except UserError as e:
        print(f"minidisc: error: {e}", file=sys.stderr)
        return 2
    except faults.Preempted as e:
        print(f"minidisc: stopped: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        from engine.core import distributed

        if faults.is_disk_full(e):
            print(f"minidisc: error: {faults.disk_full_message(e)}", file=sys.stderr)
            return 1
        if distributed.world_size() > 1 and faults.is_comm_failure(e):
            print(f"minidisc: error: {faults.peer_lost(e, distributed.rank(), distributed.world_size())}",
                  file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
