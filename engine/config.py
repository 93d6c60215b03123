"""Options of a distillation run (`minidisc compress | distill | maxidisc`), defined once.

Every field below is both a YAML/JSON recipe key and a command-line option (`lam` <-> `--lam`,
`target_sparsity` <-> `--target-sparsity`), with the same meaning and the same help text. Precedence:
defaults < recipe (`--config`) < command line. Unknown recipe keys are an error.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from engine.core.errors import UserError
from engine.core.hub import model_folder
from engine.core.widths import check_target_and_truncate, parse_sparsity

# The shipped DeepSpeed JSONs: inside the package in a wheel install (setup.py copies them there), the
# repository's top-level ds_configs/ in a checkout or an editable install.
_PACKAGED = Path(__file__).resolve().parent / "ds_configs"
DS_CONFIGS = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[1] / "ds_configs"


def option(default, help: str, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class RunConfig:
    # what to compress, on what
    teacher: str = option(None, "the teacher (LLaMA, Mistral, Qwen2/2.5, Qwen3 or OPT) with its tokenizer: a Hugging "
                          "Face checkpoint directory, or a Hub id org/name[@revision] (from the local Hugging Face "
                          "cache; downloaded when the Hub is reachable); a directory written by `minidisc prune` is "
                          "used as is, any other is pruned first. `compress` with neither --teacher nor --data runs "
                          "the built-in example", metavar="DIR|ID")
    data: list[str | dict] | None = option(
        None, "training data: files, globs or folders of .txt, .jsonl/.json, .parquet, .csv (also .gz), a datasets "
        "save_to_disk folder, or a Hub data set org/name[:config][:split] (default split train). Several sources "
        "are mixed by weight: PATH@WEIGHT or PATH@WEIGHT@FIELD (a recipe: a list of {path, weight, text_field}). "
        "Records whose field holds chat messages go through the tokenizer's chat template and only the assistant's "
        "tokens are trained on (docs/data.md)", nargs="+", metavar="SOURCE")
    dev_data: str | None = option(None, "dev text in the same formats; it selects (p(s), best snapshots, MaxiDisc's "
                                  "winner) (default: records held out of --data, the same for every --seed)",
                                  metavar="FILE")
    test_data: str | None = option(None, "test text in the same formats; every number the report gives for a model "
                                   "is measured on it, never used to select (default: other records held out of "
                                   "--data)", metavar="FILE")
    out: str = option(None, "output directory: ta/, student/, baselines/, report.json, report.md, plots, work/ "
                      "(checkpoints); the built-in example writes ./minidisc-demo", metavar="DIR")
    text_field: str = option("text", "record field holding the text, or the chat messages, in json/jsonl/parquet/csv "
                             "data (a missing 'text' falls back to 'messages')", metavar="NAME")
    token_cache: str | None = option(None, "folder of the token files the data is tokenised into once and reused by "
                                     "--resume and later runs (default MINIDISC_CACHE/tokens, else "
                                     "~/.cache/minidisc/tokens); every node must see it", metavar="DIR")
    data_workers: int = option(0, "processes that tokenise the data (0 = one per CPU core, up to 8; one below 10,000 "
                               "records)", metavar="N")
    # the MiniDisc schedule
    target_sparsity: float = option(0.9, "fraction of attention units and FFN neurons the student removes (0.9 = a "
                                    "10%%-scale student)", metavar="S")
    lam: float = option(0.2, "lambda of the trade-off p(s) + lambda * s that chooses the teacher assistant; larger "
                        "values favour sparser TAs. With relative accuracy, 0.1 to 0.3 ranked the candidates best "
                        "on the built-in example at target 0.9, 0.5 at 0.95 (docs/studies.md); for "
                        "--metric accuracy multiply it by the teacher's accuracy", metavar="L")
    truncate: float = option(0.0, "candidate TAs are the grid sparsities from this one up to the target (0 = the "
                             "whole grid, so the trade-off alone chooses; a higher value saves the sandwich the "
                             "densest, costliest widths)", metavar="S")
    grid: list[float] | None = option(None, "sparsity grid used when the teacher still has to be pruned (default "
                                      "0 0.1 ... 0.9 0.85 0.95, plus the target)", nargs="+", type=float, metavar="S")
    metric: str = option("relative_accuracy", "p(s): next-token accuracy divided by the teacher's "
                         "(relative_accuracy), raw accuracy, or exp(-dev loss) (exp_loss)",
                         choices=["relative_accuracy", "accuracy", "exp_loss"])
    baselines: list[str] | None = option(None, "also train these students of the target size and compare them in "
                                         "the report: kd = plain KD from the teacher (no TA) for --max-steps, "
                                         "kd-matched = plain KD given the training FLOPs of the whole MiniDisc "
                                         "pipeline, kd-steps = plain KD given its optimiser steps, ce = the slice "
                                         "trained on the data alone (no distillation, no teacher) for --max-steps, "
                                         "which with a plain-KD baseline checks that the teacher knows more than "
                                         "the data; `compress` only", nargs="+",
                                         choices=["kd", "kd-matched", "kd-steps", "ce"])
    sandwich_sample: int = option(0, "widths trained per step: 0 = every candidate; n > 0 = the largest, the smallest "
                                  "and n random others (the sandwich rule, cheaper)", metavar="N")
    stack_widths: int = option(0, "widths per forward in a sandwich step: 0 = all of the step's widths in one "
                               "forward and one backward, each decoder layer running them in turn (ZeRO-3 gathers "
                               "a layer once per step, not once per width; their activations are alive together); "
                               "n = groups of n; 1 = one width after another (the least activation memory)",
                               metavar="N")
    sparsest: float = option(0.0, "the sparsest width `compress` trains (0 = the target). Grid widths past the "
                             "target (the reference trains 0.95 for a 0.9 target) are trained in the sandwich and "
                             "in a joint student stage, but are never the TA", metavar="S")
    student_stage: str = option("single", "the TA -> student stage of `compress`: single = the student alone; joint "
                                "= the student trained together with every grid width between the TA and "
                                "--sparsest (the reference's schedule), its best snapshot chosen on the student's "
                                "dev score", choices=["single", "joint"])
    uniform: bool = option(False, "keep the same units in every layer, so the TA and student are stock "
                           "LlamaForCausalLM/OPTForCausalLM checkpoints (default: per-layer widths of the global "
                           "ranking, in MiniDisc model classes)")
    no_supernet: bool = option(False, "do not keep the sandwich's trained weights in OUT/supernet (a copy of the "
                               "pruned teacher's size from which `minidisc export` writes any width the sandwich "
                               "trained; the report measures each of them on test against a one-shot prune)")
    # budget and data
    max_steps: int = option(200, "optimiser steps of every distillation stage (TA -> student, plain KD, each "
                            "MaxiDisc trial; the sandwich's follow from it, see --sandwich-share)", metavar="N")
    sandwich_steps: int = option(0, "optimiser steps of the sandwich (selection) stage of `compress` (0 = the steps "
                                 "that spend --sandwich-share of the pipeline's training FLOPs)", metavar="N")
    sandwich_share: float = option(0.2, "the share of the compress pipeline's training FLOPs spent on the sandwich "
                                   "when --sandwich-steps is 0, the student stage counted as --max-steps of plain "
                                   "KD. A fifth did best of the shares measured at equal compute (docs/studies.md, "
                                   "\"Schedules at equal compute\")", metavar="F")
    eval_every: int = option(50, "evaluate every N steps (and at the end), checkpointing each time", metavar="N")
    patience: int = option(0, "stop a stage after N evaluations without improvement (0 = never stop early)",
                           metavar="N")
    batch_size: int = option(8, "sequences per optimiser step, over all processes and accumulation steps (the same "
                             "number for any process count, so runs are comparable)", metavar="N")
    grad_accum: int = option(1, "micro-batches accumulated per optimiser step on each process", metavar="N")
    seq_len: int = option(256, "tokens per training/dev sequence", metavar="T")
    eval_samples: int = option(64, "dev sequences evaluated at every evaluation", metavar="N")
    test_samples: int = option(64, "test sequences every model of the report is measured on at the end", metavar="N")
    calib_samples: int = option(64, "calibration sequences for the importance scores (when pruning)", metavar="N")
    ffn_multiple: int = option(8, "round each layer's FFN removals to a multiple of M neurons (when pruning)",
                               metavar="M")
    attention_unit: str = option("kv-group", "what an attention unit is under grouped-query attention (when "
                                 "pruning): kv-group, a KV head with its query heads; query-head, the j-th query head "
                                 "of every KV group, so a layer keeps the same query heads in each group and its KV "
                                 "heads until it keeps none", choices=["kv-group", "query-head"])
    attention_norm: str = option("layer", "attention importance before the global ranking (when pruning): layer "
                                 "divides each layer's scores by their L2 norm, as FFN scores always are; none ranks "
                                 "them as measured, keeping the differences between layers with few units (better "
                                 "one-shot, worse at high sparsity after training: docs/studies.md)",
                                 choices=["layer", "none"])
    seed: int = option(0, "seed for data order, width sampling and dropout", metavar="N")
    # optimisation
    lr: float = option(1e-4, "peak learning rate (AdamW, linear warm-up then linear decay to 0)", metavar="LR")
    weight_decay: float = option(0.01, "AdamW weight decay (not applied to biases and norm weights, the 1-D "
                                 "parameters; embeddings and an untied LM head are decayed)", metavar="W")
    warmup_ratio: float = option(0.05, "fraction of --max-steps spent warming the learning rate up", metavar="R")
    max_grad_norm: float = option(1.0, "clip the global gradient norm (0 = no clipping)", metavar="N")
    # the distillation loss
    loss: str = option("forward_kl", "logit divergence: KL(teacher||student), KL(student||teacher) or generalised "
                       "JSD", choices=["forward_kl", "reverse_kl", "jsd"])
    temperature: float = option(1.0, "softmax temperature of the logit term (scaled by T^2)", metavar="T")
    jsd_beta: float = option(0.5, "JSD mixture weight beta", metavar="B")
    logit_weight: float = option(0.5, "weight of the logit divergence", metavar="W")
    hidden_weight: float = option(0.0, "weight of the hidden-state MSE (every ceil(L/6)-th layer; the reference's "
                                  "0.5, with --ce-weight 0, measured worse: docs/studies.md)", metavar="W")
    ce_weight: float = option(0.5, "weight of the hard-label next-token cross-entropy", metavar="W")
    # DeepSpeed and memory placement (`minidisc plan` says which fits)
    deepspeed: str | None = option(None, "DeepSpeed JSON for the trained model (default ds_configs/zero3_train.json;"
                                   " zero3_train_offload*.json offload to CPU); its bf16 setting decides the "
                                   "precision of teacher and student", metavar="JSON")
    teacher_deepspeed: str | None = option(None, "DeepSpeed JSON for frozen teachers under --teacher-placement zero3 "
                                           "(default ds_configs/zero3_inference.json)", metavar="JSON")
    teacher_placement: str = option("zero3", "frozen teachers: zero3 = sharded over all GPUs (least memory, "
                                    "gathers every layer), replicated = a full copy per GPU (fastest), int8 / nf4 "
                                    "= a bitsandbytes-quantised copy per GPU (1/2 or 1/4 of the weights' memory; "
                                    "the teacher's outputs change slightly)",
                                    choices=["zero3", "replicated", "int8", "nf4"])
    gradient_checkpointing: bool = option(False, "recompute each decoder layer's activations in the backward "
                                          "instead of keeping them (about a third slower; activations shrink to "
                                          "one hidden state per layer)")
    optimizer: str = option("adamw", "optimiser of the trained model: adamw, or adamw8bit (bitsandbytes: 8-bit "
                            "moments, 2 instead of 8 bytes per parameter; not with an optimizer block in the "
                            "DeepSpeed JSON, e.g. CPU offload)", choices=["adamw", "adamw8bit"])
    # what the report shows of every model (no effect on training, so --resume accepts changes)
    sample_prompts: list[str] | None = option(None, "prompts whose greedy continuations report.md shows for every "
                                              "model (default: the first 16 tokens of 3 dev sequences)", nargs="+",
                                              metavar="TEXT")
    sample_tokens: int = option(32, "tokens each model generates per sample prompt (0 = no samples)", metavar="N")
    eval_tasks: list[str] | None = option(None, "lm-evaluation-harness tasks run at the end on teacher, TA, student "
                                          "and baselines, shown in report.md and the model cards: minidisc_ppl, "
                                          "minidisc_cloze or any task `minidisc eval` takes (needs minidisc[eval])",
                                          nargs="+", metavar="TASK")
    eval_include: str | None = option(None, "folder of lm-eval task YAMLs for --eval-tasks", metavar="DIR")
    eval_text: str | None = option(None, "text the built-in tasks are made of (default: --test-data, else the "
                                   "test records held out of --data)", metavar="FILE")
    # run control
    cluster: str | None = option(None, "the cluster a recipe is meant for, NODESxGPUSxGIB (e.g. 4x8x80 = 4 nodes of 8 "
                                 "GPUs with 80 GiB): --dry-run checks --batch-size and the memory against it",
                                 metavar="NxGxM")
    resume: bool = option(False, "continue the run in --out from its last checkpoint (after a kill or a requeue)")
    log_every: int = option(0, "off a terminal (a batch log, nohup), a progress line every N steps: the step, losses, "
                            "learning rate, gradient norm, tokens/s, and the elapsed time and ETA of the stage and "
                            "of the run (0 = about once a minute). In a terminal, progress bars", metavar="N")
    report_to: list[str] | None = option(None, "also send every step's losses, learning rate, gradient norm and "
                                         "tokens/s, every evaluation (accuracy, loss, p(s), trade-off per width) "
                                         "and the chosen TA to these trackers, under OUT/tracking: tensorboard, "
                                         "csv, wandb (tensorboard and wandb need minidisc[tracking]; "
                                         "WANDB_MODE=offline works without a network)", nargs="+",
                                         choices=["tensorboard", "csv", "wandb"])

    # ------------------------------------------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        for name in ("teacher", "data", "out"):
            if not getattr(self, name):
                raise UserError(f"--{name.replace('_', '-')} is required (on the command line or in the recipe)")
        self.teacher = model_folder(self.teacher)  # a Hub id -> its snapshot in the local cache
        for f in fields(self):  # nan passes every comparison below, and inf most of them
            if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name)):
                raise UserError(f"--{f.name.replace('_', '-')} {getattr(self, f.name)}: give a finite number")
        target = parse_sparsity(self.target_sparsity)
        check_target_and_truncate(target, parse_sparsity(self.truncate))
        if self.sparsest and parse_sparsity(self.sparsest) < target:
            raise UserError(f"--sparsest {self.sparsest} is below --target-sparsity {self.target_sparsity}: give 0 "
                            "(the target) or a sparsity past it")
        positive = ("max_steps", "eval_every", "batch_size", "grad_accum", "seq_len", "eval_samples", "test_samples",
                    "calib_samples", "ffn_multiple")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.seq_len < 2:
            raise UserError("--seq-len must be at least 2 (a token and the next one)")
        if self.lr <= 0 or self.temperature <= 0:
            raise UserError("--lr and --temperature must be positive")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.jsd_beta <= 1:
            raise UserError("--warmup-ratio must be in [0, 1) and --jsd-beta in [0, 1]")
        for f in fields(self):  # recipes and the Python API bypass argparse's choices
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            values = value if isinstance(value, list) else [value]
            if choices and value is not None and any(v not in choices for v in values):
                raise UserError(f"--{f.name.replace('_', '-')} {value!r}: choose from {', '.join(choices)}")
        if self.cluster is not None:
            self.cluster_shape()
        if not 0 < self.sandwich_share < 1:
            raise UserError(f"--sandwich-share {self.sandwich_share:g}: give a fraction between 0 and 1, e.g. 0.2")
        if min(self.sandwich_sample, self.sandwich_steps, self.stack_widths, self.patience, self.max_grad_norm,
               self.sample_tokens, self.log_every, self.data_workers) < 0:
            raise UserError("--sandwich-sample, --sandwich-steps, --stack-widths, --patience, --max-grad-norm, "
                            "--sample-tokens, --log-every and --data-workers cannot be negative")
        self.sources()
        for name in ("lam", "weight_decay", "logit_weight", "hidden_weight", "ce_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name):g} cannot be negative")
        return self

    def sources(self) -> list:
        """--data as sources (path, weight, field)."""
        from engine.data.sources import parse_sources

        return parse_sources(self.data)

    def cluster_shape(self) -> tuple[int, int, float]:
        """(nodes, GPUs per node, GiB per GPU) of --cluster."""
        try:
            nodes, gpus, memory = self.cluster.lower().split("x")
            shape = int(nodes), int(gpus), float(memory)
        except (AttributeError, ValueError):
            shape = (0, 0, 0)
        if min(shape) <= 0:
            raise UserError(f"--cluster {self.cluster!r}: write NODESxGPUSxGIB, e.g. 1x8x80")
        return shape

    def train_ds_config(self) -> Path:
        return _shipped(self.deepspeed) if self.deepspeed else DS_CONFIGS / "zero3_train.json"

    def teacher_ds_config(self) -> Path:
        return _shipped(self.teacher_deepspeed) if self.teacher_deepspeed else DS_CONFIGS / "zero3_inference.json"

    def to_dict(self) -> dict:
        return asdict(self)


def split_batch(batch_size: int, processes: int, grad_accum: int, what: str = "processes") -> int:
    """Sequences per process per micro-step of a global --batch-size (it must split evenly)."""
    per_step = processes * grad_accum
    if batch_size % per_step:
        raise UserError(f"--batch-size {batch_size} cannot be split evenly over {processes} {what} x {grad_accum} "
                        f"accumulation steps; use a multiple of {per_step}")
    return batch_size // per_step


def _shipped(path: str) -> Path:
    """A DeepSpeed JSON as given or, when a relative `ds_configs/...` path is not found from the working
    directory, the shipped file of that name, so recipes work from any directory and from a wheel install."""
    given = Path(path)
    if not given.is_absolute() and not given.exists() and given.parts[:1] == ("ds_configs",):
        shipped = DS_CONFIGS.joinpath(*given.parts[1:])
        if shipped.is_file():
            return shipped
    return given


FIELDS = {f.name: f for f in fields(RunConfig)}
# The options that decide a run's memory: `minidisc plan` takes them as these fields, so it plans the run
# `minidisc compress` would do with the same recipe and flags.
PLAN_FIELDS = ("target_sparsity", "truncate", "grid", "batch_size", "seq_len", "grad_accum", "sandwich_sample",
               "stack_widths", "gradient_checkpointing", "cluster")


def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One option per RunConfig field (or per field in `only`). Defaults stay unset here so recipe values are
    not overridden."""
    parser.add_argument("--config", metavar="RECIPE", help="YAML or JSON recipe whose keys are these options' names "
                        "(with underscores, e.g. target_sparsity: 0.9); the command line overrides it")
    for f in fields(RunConfig):
        if only is not None and f.name not in only:
            continue
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        default = f.default if f.default is not MISSING else None
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        if "type" not in meta and "choices" not in meta:
            meta["type"] = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
        shown = "" if default is None else f" (default {default})"
        parser.add_argument(flag, default=argparse.SUPPRESS, help=help_text + shown, **meta)


def load_recipe(path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"cannot parse recipe {path}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of option: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    for key in data:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"recipe {path}: unknown option '{key}'{hint}; see `minidisc compress --help`")
    return data


def _coerce(key: str, value):
    kind = FIELDS[key].type
    if value is None:
        return None
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if kind == "float":
            return float(value)
        if kind.startswith("list"):
            items = value if isinstance(value, list) else [value]
            if kind.startswith("list[str | dict]"):
                if any(not isinstance(v, (str, dict)) for v in items):
                    raise ValueError
                return items
            if kind.startswith("list[str]"):
                choices = FIELDS[key].metadata.get("choices")
                if choices and any(str(v) not in choices for v in items):
                    raise ValueError
                return [str(v) for v in items]
            return [float(v) for v in items]
        return str(value)
    except (TypeError, ValueError):
        choices = FIELDS[key].metadata.get("choices")
        expected = f"a list of {', '.join(choices)}" if kind.startswith("list[str]") and choices else \
            kind.replace(" | None", "")
        raise UserError(f"option '{key}' expects {expected}, got {value!r}") from None


def given(args: argparse.Namespace) -> dict:
    """The options a user set: the recipe's, overridden by the command line's."""
    values = load_recipe(args.config) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items() if k in FIELDS})
    return values


def resolve_some(args: argparse.Namespace, names: tuple[str, ...]) -> RunConfig:
    """A RunConfig whose `names` come from the defaults, the recipe and the command line, as `resolve`, and whose
    other fields keep their defaults (a recipe's teacher or data are ignored), not validated as a whole: for
    commands that share some of `compress`'s options, such as `minidisc plan`."""
    values = {k: _coerce(k, v) for k, v in given(args).items() if k in names}
    return RunConfig(**values)


def resolve(args: argparse.Namespace, defaults: dict | None = None) -> RunConfig:
    """Defaults (the dataclass's, then `defaults`), then the recipe, then what the command line set."""
    values = {**(defaults or {}), **given(args)}
    return RunConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate()
