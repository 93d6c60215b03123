"""The end of every run: each model measured on test (and each width the sandwich trained), samples, lm-eval
scores, model cards, then report.json, report.md and the plots. Rank 0 does it, one model in memory at a time."""
from __future__ import annotations

import json
import logging
from dataclasses import replace

import torch

from engine.core import distributed as dist
from engine.core import faults
from engine.core.hub import public_name
from engine.core.provenance import environment, model_source, shareable
from engine.core.tracking import final_figures
from engine.core.widths import parse_sparsity
from engine.models.export import sliced_checkpoint
from engine.models.loading import load_tokenizer
from engine.models.model_card import write_model_card
from engine.report.harness import evaluate_tasks
from engine.report.render import render
from engine.report.report import Report
from engine.report.samples import continuations, default_prompts, encode_prompts
from engine.report.scoring import measured_on_test, score_and_free, score_checkpoint, widths_measured_on_test
from engine.schedule.run import Run

log = logging.getLogger(__name__)


def finish(run: Run, report: Report) -> Report:
    """The run's report: `report` (what its pipeline found) with the run's data, compute and environment, every
    model measured on test, then written (report.json last: its presence means the run is complete). report.json's
    paths are relative to --out (models it wrote) or names (inputs): `engine.core.provenance.shareable`."""
    run.add_up_phases()
    report = replace(report, data=run.data_summary(), compute=run.compute, phases=run.phases,
                     stage_timings=run.stage_timings, stage_memory=run.stage_memory, config=run.cfg.to_dict(),
                     environment=environment(dist.world_size()))
    with dist.main_first("writing the report") as main:
        if main:
            log.info("measuring every model on the test split (%d blocks)", len(run.data.test))
            with run.timed("test"):
                report = measured_on_test(report, lambda path: score_on_test(run, path))
            if report.supernet:
                log.info("measuring every trained width on test, against its one-shot prune")
                with run.timed("widths"):
                    report = replace(report, supernet=widths_measured_on_test(
                        report.supernet, report.test_block_tokens, lambda source, s: score_width(run, source, s)))
            with run.timed("samples"):
                report = replace(report, samples=samples(run, report))
            if run.cfg.eval_tasks:
                with run.timed("benchmarks"):
                    report = benchmarks(run, report)
            run.add_up_phases()
            faults.kill_point("report:scored")
            write_cards(run, report)
            faults.kill_point("report:cards")
            written = shareable(report.to_dict(), run.out)  # no path of this machine in what a user may share
            tmp = run.out / ".report.json.partial"
            tmp.write_text(json.dumps(written, indent=1) + "\n")
            render(written, run.out)
            tmp.replace(run.out / "report.json")  # last: its presence means the run is complete
            log.info("wrote %s", run.out / "report.json")
            run.monitor.finish(final_figures(written))
    return report


def _scoring(run: Run) -> tuple[torch.device, torch.dtype, int]:
    """Where and how test scoring runs: this rank's device, fp32 on a CPU (else the published dtype), and the
    training micro-batch size."""
    device = dist.device()
    dtype = torch.float32 if device.type == "cpu" else run.setup.export_dtype
    return device, dtype, max(1, run.cfg.batch_size // (run.cfg.grad_accum * dist.world_size()))


def score_on_test(run: Run, path) -> dict:
    device, dtype, batch = _scoring(run)
    return score_checkpoint(path, run.data.test, batch, device, dtype)


def score_width(run: Run, directory, sparsity: float) -> dict:
    """Test figures of the width at `sparsity` sliced from `directory` (the supernet, or the pruned teacher)."""
    device, dtype, batch = _scoring(run)
    shape = run.shape_of(parse_sparsity(sparsity))
    return score_and_free(sliced_checkpoint(directory, shape, run.cfg.uniform, dtype=dtype).to(device),
                          run.data.test, batch, device)


def samples(run: Run, report: Report) -> dict | None:
    """Every model's greedy continuation of the sample prompts (rank 0, one model in memory at a time)."""
    if not run.cfg.sample_tokens:
        return None
    tokenizer = load_tokenizer(run.teacher_dir)
    prompts = (encode_prompts(tokenizer, run.cfg.sample_prompts) if run.cfg.sample_prompts
               else default_prompts(run.data.dev.ids))
    log.info("generating samples: %d prompts x %d tokens per model", len(prompts), run.cfg.sample_tokens)
    return {"new_tokens": run.cfg.sample_tokens,
            "prompts": [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts],
            "models": {label: continuations(m.path, prompts, run.cfg.sample_tokens, dist.device())
                       for label, _, m in report.models()}}


def benchmarks(run: Run, report: Report) -> Report:
    """`report` with every model's lm-eval scores (rank 0, one model at a time) and what they were measured on."""
    cfg = run.cfg
    source = cfg.eval_text or cfg.test_data
    models = report.models()
    results = evaluate_tasks({label: m.path for label, _, m in models}, cfg.eval_tasks,
                             texts=run.setup.eval_texts(), include=cfg.eval_include, device=str(dist.device()),
                             seed=cfg.seed)
    for label, key, m in models:
        report = report.with_model(key, replace(m, benchmarks=results["models"][label]))
    return replace(report, benchmarks={"tasks": results["tasks"],
                                       "text": str(source) if source else "the test records held out of --data"})


def write_cards(run: Run, report: Report) -> None:
    """A model card in every model published under --out, with the report's numbers (before report.json,
    so a run killed here writes them again when resumed)."""
    via = None if report.selected_ta is None else report.selected_ta.sparsity
    published = [("teacher assistant", "ta", report.ta, None), ("student", "student", report.student, via)]
    published += [(f"baseline student ({m.label})", f"baselines/{name}", m, None)
                  for name, m in report.baselines.items()]
    source, training = model_source(run.teacher_dir), training_facts(run, report)
    for role, folder, figures, via_ta in published:
        if figures and (run.out / folder).is_dir():
            write_model_card(run.out / folder, role=role, source=source, sparsity=figures.sparsity,
                             shape=run.shape_of(parse_sparsity(figures.sparsity)), parameters=figures.parameters,
                             teacher_parameters=report.teacher.parameters, uniform=run.cfg.uniform,
                             via_ta=via_ta, metrics=figures.to_dict(), benchmarks=figures.benchmarks,
                             query_heads_per_unit=run.setup.family.query_heads_per_unit, training=training)


def training_facts(run: Run, report: Report) -> dict:
    """What a card says of the run that made its model: data by name, the settings that shape the result, compute."""
    cfg, env = run.cfg, report.environment
    packages = env["packages"]
    objective = (f"{cfg.loss} on logits x {cfg.logit_weight:g} (T = {cfg.temperature:g}) + hidden-state MSE x "
                 f"{cfg.hidden_weight:g} + cross-entropy x {cfg.ce_weight:g}")
    settings = {"command": f"minidisc {run.command}", "target sparsity": f"{report.target_sparsity:g}",
                "steps per stage": cfg.max_steps, "batch": f"{cfg.batch_size} sequences x {cfg.seq_len} tokens",
                "learning rate": f"{cfg.lr:g}", "objective": objective, "seed": cfg.seed}
    if run.command == "compress":
        settings["TA trade-off"] = f"p(s) + {cfg.lam:g} s ({cfg.metric})"
    flops = sum(stage.get("train_flops") or 0 for stage in report.compute.values())
    compute = {"training FLOPs": f"{flops:.3g}", "wall time": f"{run.phases.get('total', 0) / 3600:.2f} h",
               "hardware": f"{env['device']} x {env['processes']} processes",
               "software": ", ".join(f"{p} {packages[p]}" for p in ("minidisc", "torch", "transformers", "deepspeed")
                                     if p in packages)}
    return {"data": [(public_name(s.path), s.weight) for s in cfg.sources()], "settings": settings,
            "compute": compute}
