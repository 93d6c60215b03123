"""Benchmark evaluation through lm-evaluation-harness: `minidisc eval` and `compress --eval-tasks`.

Every model is evaluated by path with lm_eval's Hugging Face backend and `trust_remote_code=True` (so a
per-layer export loads its own class), exactly as `lm_eval --model hf` would. Two tasks are built here from
a text of the user's (no hub needed), one document per record or paragraph:

    minidisc_ppl    rolling log-likelihood of each document: word and byte perplexity, bits per byte
    minidisc_cloze  the opening words of a document and 4 candidate continuations (its own next words and
                    those of 3 other documents): acc and acc_norm; chance is 0.25

Any other task comes from `--include DIR` (task YAMLs, e.g. copies of lm_eval's standard tasks whose
`dataset_path`/`data_files` point at local copies) or from lm_eval's own registry.
"""
from __future__ import annotations

import json
import logging
import random
import tempfile
from pathlib import Path
from typing import Callable

from engine.core.errors import UserError

log = logging.getLogger(__name__)
BUILTIN_TASKS = ("minidisc_ppl", "minidisc_cloze")
MAX_DOCUMENTS = 200  # per built-in task: enough for stable numbers, minutes not hours on a GPU
CLOZE_CONTEXT, CLOZE_CHOICE = 24, 12  # words of context and of each candidate continuation
METRIC = {"aggregation": "mean", "higher_is_better": True}


def _documents(texts: list[str], min_words: int) -> list[str]:
    """Non-empty documents, whitespace-normalised, with at least `min_words` words."""
    documents = [" ".join(text.split()) for text in texts]
    return [d for d in documents if len(d.split()) >= min_words]


def _cloze_items(documents: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = [d.split() for d in documents]
    items = []
    for i, doc in enumerate(words):
        others = rng.sample([j for j in range(len(words)) if j != i], 3)
        choices = [doc[CLOZE_CONTEXT:CLOZE_CONTEXT + CLOZE_CHOICE]] + [
            words[j][CLOZE_CONTEXT:CLOZE_CONTEXT + CLOZE_CHOICE] for j in others]
        order = list(range(4))
        rng.shuffle(order)
        items.append({"context": " ".join(doc[:CLOZE_CONTEXT]), "choices": [" ".join(choices[k]) for k in order],
                      "answer": order.index(0)})
    return items


def builtin_documents(texts: list[str]) -> tuple[list[str], list[str]]:
    """The documents of minidisc_ppl and minidisc_cloze, or a UserError when the text cannot make them (a run
    checks this before training)."""
    ppl = _documents(texts, 1)[:MAX_DOCUMENTS]
    cloze = _documents(texts, CLOZE_CONTEXT + CLOZE_CHOICE)[:MAX_DOCUMENTS]
    if not ppl:
        raise UserError("the evaluation text is empty: give --eval-text (or --text) with some paragraphs")
    if len(cloze) < 4:
        raise UserError(f"minidisc_cloze needs 4 documents of at least {CLOZE_CONTEXT + CLOZE_CHOICE} words; the "
                        f"evaluation text has {len(cloze)}: give a longer text (--eval-text) or leave the task out")
    return ppl, cloze


def write_builtin_tasks(texts: list[str], folder, seed: int = 0,
                        fits: Callable[[str, str], bool] | None = None) -> Path:
    """Write minidisc_ppl and minidisc_cloze (YAML + jsonl, absolute paths: lm_eval resolves data files from
    the working directory) into `folder`; returns it. `fits(context, continuation)`: whether the models can
    score a continuation (`continuation_fits`); cloze items with one that does not are left out."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    ppl, cloze = builtin_documents(texts)
    items = _cloze_items(cloze, seed)
    if fits is not None:
        kept = [item for item in items if all(fits(item["context"], choice) for choice in item["choices"])]
        if len(kept) < len(items):
            log.info("minidisc_cloze: %d of %d items left out (a continuation longer than a model's positions)",
                     len(items) - len(kept), len(items))
        if not kept:
            raise UserError("minidisc_cloze: no item's continuations fit the models' positions; leave the task out")
        items = kept
    rows = {"minidisc_ppl": [{"text": d} for d in ppl], "minidisc_cloze": items}
    specs = {
        "minidisc_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                         "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in (
                             ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                             ("bits_per_byte", "bits_per_byte"))]},
        "minidisc_cloze": {"output_type": "multiple_choice", "doc_to_text": "{{context}}",
                           "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
                           "metric_list": [{"metric": "acc", **METRIC}, {"metric": "acc_norm", **METRIC}]},
    }
    for task, spec in specs.items():
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows[task]))
        config = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                  "test_split": "test", **spec, "metadata": {"version": 1.0}}
        (folder / f"{task}.yaml").write_text(json.dumps(config, indent=1) + "\n")  # JSON is valid YAML
    return folder


def continuation_fits(models: dict[str, str]) -> Callable[[str, str], bool]:
    """Whether a continuation fits the positions of every model (lm_eval asserts on one that does not; a context
    that is too long it truncates from the left itself)."""
    from engine.models.loading import load_config, load_tokenizer

    limits = [(load_tokenizer(path), load_config(path).max_position_embeddings) for path in models.values()]

    def fits(context: str, continuation: str) -> bool:
        for tokenizer, positions in limits:
            tokens = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
            if tokens(f"{context} {continuation}") - tokens(context) > positions:
                return False
        return True

    return fits


def check_tasks(tasks: list[str], include=None, builtin: bool = True) -> None:
    """Fail before a long run, not after it: lm_eval installed, the include folder there, every task known
    (`builtin`: the built-in tasks will be made, i.e. a text was given)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("benchmark evaluation needs lm-evaluation-harness: pip install 'minidisc[eval]'") from None
    if include and not Path(include).is_dir():
        raise UserError(f"--include {include} is not a folder of lm-eval task YAMLs")
    textless = [task for task in tasks if not (builtin or include) and task in BUILTIN_TASKS]
    if textless:  # before lm_eval indexes its registry (seconds), which does not have them
        raise UserError(f"{', '.join(textless)} is made of a text: give --text FILE")
    others = [task for task in tasks if not (builtin and task in BUILTIN_TASKS)]
    if others:
        _check_data(others, _task_manager(others, [Path(include)] if include else []))


def _check_data(tasks: list[str], manager) -> None:
    """Build each task, which loads its data set as the evaluation will (from the cache offline, downloading it
    online), so data that cannot be had fails before the training, in one line naming the task."""
    import re
    import warnings

    from lm_eval.tasks import get_task_dict

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    for task in tasks:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                get_task_dict([task], manager)
        except Exception as error:  # lm_eval and datasets raise many kinds (ConnectionError, FileNotFoundError...)
            reason = " ".join(str(error).split()) or type(error).__name__
            hub = re.search(r"reach '([^']+)'", reason)
            fetch = (f"`python -c \"import datasets; datasets.load_dataset('{hub.group(1)}')\"` (or a run of this "
                     "task)") if hub else "this task once"
            raise UserError(f"lm-eval task {task}: its data could not be loaded ({reason[:200]}); run {fetch} where "
                            "the Hugging Face Hub is reachable, with the same HF_HOME, or define the task by a YAML in "
                            "--include / --eval-include that reads a local copy") from None


def _task_manager(tasks: list[str], include: list[Path]):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include] or None, include_defaults=False)
    if all(task in manager.all_tasks for task in tasks):
        return manager  # indexing lm_eval's ~15k standard tasks takes seconds: only when asked for
    manager = TaskManager(include_path=[str(p) for p in include] or None)
    missing = [task for task in tasks if task not in manager.all_tasks]
    if missing:
        raise UserError(f"unknown lm-eval task(s) {', '.join(missing)}: use {' or '.join(BUILTIN_TASKS)} (made of "
                        "--text FILE), a task of lm_eval's registry, or one defined by a YAML in --include DIR")
    return manager


def scores(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm_eval's results (the 'none' filter; standard errors left out)."""
    table = {}
    for task, values in results.items():
        table[task] = {key.split(",")[0]: float(value) for key, value in values.items()
                       if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    return table


def evaluate_tasks(models: dict[str, str], tasks: list[str], *, texts: list[str] | None = None, include=None,
             batch_size: int = 8, device: str | None = None, limit: int | None = None, seed: int = 0) -> dict:
    """Run lm_eval on every model (label -> checkpoint folder). Returns {"tasks", "models": {label: scores}}.
    `seed` only shuffles the cloze distractors; lm_eval runs with its own default seeds, as its command line."""
    check_tasks(tasks, include, builtin=texts is not None)
    import lm_eval
    import torch

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # one warning per truncated document otherwise
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="minidisc-tasks-") as scratch:
        folders = [Path(include)] if include else []
        if texts is not None and any(task in BUILTIN_TASKS for task in tasks):
            folders.append(write_builtin_tasks(texts, scratch, seed, fits=continuation_fits(models)))
        manager = _task_manager(list(tasks), folders)
        table = {}
        for label, path in models.items():
            log.info("lm-eval: %s on %s", ", ".join(tasks), label)
            dtype = "float32" if device.startswith("cpu") else "auto"  # a GPU keeps the checkpoint's dtype
            result = lm_eval.simple_evaluate(
                model="hf", model_args={"pretrained": str(path), "dtype": dtype, "trust_remote_code": True},
                tasks=list(tasks), task_manager=manager, batch_size=batch_size, device=device, limit=limit,
                log_samples=False)  # lm_eval's default seeds, as its command line uses
            table[label] = scores(result["results"])
    return {"tasks": list(tasks), "models": table}
