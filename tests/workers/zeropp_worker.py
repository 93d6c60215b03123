"""Worker for test_ds_configs.py, started by the `deepspeed` launcher with 2 CPU processes (gloo).

Runs the engine's own set-up (`engine.training.engines.build_engines` and `train_step`) with the shipped configs,
reduced to what runs on CPU (fp32, no quantisation, hpZ over the 2 ranks), against the unsharded models:

- the frozen teacher under zero3_inference_zeropp.json gives the unsharded logits, and its parameters hold
  hpZ's secondary shard (the all-gathers after the first one read it);
- one step of a student under zero3_train_offload_optimizer.json (DeepSpeedCPUAdam on the CPU copy of the
  optimiser states) gives the loss and the weights of torch AdamW on the unsharded model;
- a second build_engines under hpZ in the same process (what `minidisc compress` does stage after stage);
- teacher and student both under hpZ (zero3_train_zeropp.json), the hpZ group cleared before each model load;
- qwZ (`zero_quantized_weights`) and qgZ (`zero_quantized_gradients`): whether they start here, and the error
  DeepSpeed gives when they do not.

Rank 0 writes the findings to --out as JSON.
"""
import argparse
import json
import os
import time
import traceback
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from engine.config import RunConfig
from engine.distillation.loss import Objective, teacher_outputs, width_loss
from engine.models.loading import load_causal_lm
from engine.training import engines, trainer
from engine.training import stage as stages

REPO = Path(__file__).resolve().parents[2]
parser = argparse.ArgumentParser()
parser.add_argument("--teacher", required=True)
parser.add_argument("--student", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()
deepspeed.init_distributed(dist_backend="gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
work = Path(args.out).parent


def shipped(name: str) -> dict:
    return json.loads((REPO / "ds_configs" / name).read_text())


def cpu_variant(config: dict, **zero) -> dict:
    """fp32 (an exact comparison), every parameter partitioned, the given ZeRO keys replaced."""
    config["bf16"] = {"enabled": False}
    config["zero_optimization"].update(stage3_param_persistence_threshold=0, **zero)
    if "offload_optimizer" in config["zero_optimization"]:
        config["zero_optimization"]["offload_optimizer"]["pin_memory"] = False  # no pinned memory without CUDA
    return config


def write(name: str, config: dict) -> str:
    path = work / f"{name}.rank{rank}.json"
    path.write_text(json.dumps(config))
    return str(path)


def error_of(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def where(e: BaseException) -> str:
    """The innermost two frames of the error, innermost first."""
    frames = traceback.extract_tb(e.__traceback__)[-2:]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} ({f.name})" for f in reversed(frames))


report = {"world_size": world, "seconds": {}}
clock = time.perf_counter()


def lap(name: str) -> None:
    global clock
    report["seconds"][name] = round(time.perf_counter() - clock, 1)
    clock = time.perf_counter()


def run_config(train: str, **train_zero) -> RunConfig:
    """The shipped ZeRO++ teacher config with hpZ over this world (qwZ off: no CPU kernel) and a trained config."""
    teacher = cpu_variant(shipped("zero3_inference_zeropp.json"), zero_hpz_partition_size=world,
                          zero_quantized_weights=False)
    return RunConfig(teacher="x", data="x", out="x", batch_size=world, max_grad_norm=0.0, warmup_ratio=0.0, lr=1e-2,
                     deepspeed=write(train, cpu_variant(shipped(train), **train_zero)),
                     teacher_deepspeed=write("teacher", teacher))


stage = stages.Stage(name="s", teacher_dir=Path(args.teacher), student_dir=Path(args.student), widths=[0])
objective = Objective()
all_ids = [torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(1 + r)) for r in range(world)]
ids = all_ids[rank]  # each rank its own batch
# The unsharded references, loaded before ZeRO-3 is switched on by HfDeepSpeedConfig.
ref_teacher = load_causal_lm(args.teacher).eval()
ref_logits = ref_teacher(input_ids=ids).logits.detach()
lap("start")


def check_stage(cfg: RunConfig) -> dict:
    """build_engines, the teacher's logits and one trainer step, against the unsharded models."""
    ref_student = load_causal_lm(args.student)
    t0 = time.perf_counter()
    teacher, student, distiller, keep_alive, _ = engines.build_engines(stage, stages.TrainConfig.of(cfg), 1)
    out = {"build_s": round(time.perf_counter() - t0, 1)}
    params = list(teacher.module.parameters())
    out["teacher_partitioned"] = all(p.ds_tensor.numel() < p.ds_numel for p in params if p.ds_numel > 1)
    out["teacher_hpz_secondary"] = all(getattr(p, "ds_secondary_tensor", None) is not None for p in params)
    out["teacher_hpz"] = teacher.zero_hpz_partition_size()
    with torch.no_grad():
        for n in range(2):  # after the first forward, the all-gather reads the secondary shards
            logits = teacher.module(input_ids=ids).logits
            out[f"teacher_logit_error_{n}"] = (logits - ref_logits).abs().max().item()
    out["student_hpz"] = student.zero_hpz_partition_size()
    out["student_hpz_secondary"] = all(getattr(p, "ds_secondary_tensor", None) is not None
                                       for p in distiller.parameters())
    out["student_optimizer"] = type(student.optimizer.optimizer).__name__
    offload = student.zero_offload_optimizer()
    out["student_offload_optimizer"] = str(getattr(offload, "device", None))
    out["student_offload_param"] = student.zero_offload_param() is not None
    losses = trainer.train_step(teacher, student, [(ids, None)], [0], objective).losses  # its step

    # DeepSpeed averages gradients over ranks: the reference steps on the mean loss of every rank's batch.
    named = list(ref_student.named_parameters())
    initial = [p.detach().clone() for _, p in named]
    groups_ = [{"params": [p for n, p in named if not engines._no_decay(n, p)], "weight_decay": cfg.weight_decay},
               {"params": [p for n, p in named if engines._no_decay(n, p)], "weight_decay": 0.0}]
    ref_opt = torch.optim.AdamW(groups_, lr=cfg.lr, betas=engines.BETAS, eps=engines.EPS)
    mean_loss = sum(width_loss(ref_student, teacher_outputs(ref_teacher, x), x, None, objective)["loss"]
                    for x in all_ids) / world
    out["student_loss"] = mean_loss.item()
    out["student_loss_error"] = abs(losses[0] - mean_loss.item())
    mean_loss.backward()
    ref_opt.step()
    update_error = 0.0
    for param, (_, ref) in zip(distiller.student.parameters(), named):
        with deepspeed.zero.GatheredParameters([param]):
            update_error = max(update_error, (param.detach() - ref.detach()).abs().max().item())
    out["student_update_error"] = update_error
    out["student_update_size"] = max((ref.detach() - before).abs().max().item()
                                     for (_, ref), before in zip(named, initial))
    engines.release(teacher, student)
    del teacher, student, distiller, keep_alive
    return out


def attempt(function, *args, **kwargs) -> dict:
    try:
        return {"ok": True, **function(*args, **kwargs)}
    except Exception as e:  # noqa: BLE001  (reported, not hidden)
        return {"ok": False, "error": error_of(e), "where": where(e)}


# Stage 1: the hpZ teacher, a student whose optimiser states live on the CPU (DeepSpeedCPUAdam).
report["hpz_teacher_offload_optimizer"] = attempt(check_stage, run_config("zero3_train_offload_optimizer.json"))
lap("hpz_teacher_offload_optimizer")
# Stage 2 in the same process (as `minidisc compress` runs its stages): DeepSpeed creates the hpZ process group
# in every zero.Init that asks for hpZ and refuses a second one.
report["second_stage"] = attempt(check_stage, run_config("zero3_train_offload_optimizer.json"))
lap("second_stage")
# hpZ on both the teacher and the trained student (zero3_train_zeropp.json without the quantisation).
report["hpz_teacher_hpz_student"] = attempt(
    check_stage, run_config("zero3_train_zeropp.json", zero_hpz_partition_size=world, zero_quantized_weights=False,
                            zero_quantized_gradients=False))
lap("hpz_teacher_hpz_student")


def frozen(**zero) -> dict:
    """A frozen model built the way the trainer builds teachers (HfDeepSpeedConfig + from_pretrained, then
    deepspeed.initialize without an optimiser), compared with the unsharded one."""
    config = cpu_variant(shipped("zero3_inference_zeropp.json"), zero_hpz_partition_size=1, **zero)
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    model, keep_alive = engines.load_partitioned(Path(args.teacher), config)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    with torch.no_grad():
        error = (engine.module(input_ids=ids).logits - ref_logits).abs().max().item()
    engines.release(engine)
    return {"teacher_logit_error": error}


def trained(**zero) -> dict:
    """One training step of a ZeRO-3 model under zero3_train_zeropp.json with only the given ZeRO++ keys on."""
    config = cpu_variant(shipped("zero3_train_zeropp.json"), zero_hpz_partition_size=1, zero_quantized_weights=False,
                         zero_quantized_gradients=False)
    config["zero_optimization"].update(zero)
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, gradient_clipping=0.0)
    model, keep_alive = engines.load_partitioned(Path(args.student), config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=config)
    out = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    engine.step()
    engines.release(engine)
    return {"loss": out.loss.item()}


report["qwz_teacher"] = attempt(frozen, zero_quantized_weights=True)
lap("qwz_teacher")
report["gpus_per_node_seen_by_deepspeed"] = get_accelerator().device_count()
report["qgz_one_node"] = attempt(trained, zero_quantized_gradients=True)
lap("qgz_one_node")
# DeepSpeed counts the nodes as world size // GPUs per node (the accelerator's device_count, LOCAL_SIZE on CPU);
# with one "GPU" per node the 2 ranks look like 2 nodes and qgZ's quantised all-to-all path is taken.
os.environ["LOCAL_SIZE"] = "1"
report["qgz_two_nodes"] = attempt(trained, zero_quantized_gradients=True)
lap("qgz_two_nodes")
if rank == 0:
    Path(args.out).write_text(json.dumps(report, indent=1))
# A clean shutdown (see zero3_fused_linear_worker.py).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
# Even after that, a gloo thread still aborts the interpreter's exit now and then ("terminate called without an
# active exception", seen in CI on this worker): the report is written and closed, so leave without the teardown.
print(end="", flush=True)  # (os._exit skips flushing)
os._exit(0)
