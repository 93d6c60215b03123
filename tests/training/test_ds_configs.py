"""Every DeepSpeed JSON in ds_configs/ is accepted by DeepSpeed as the engine fills it, and is what it says it is.

The ZeRO++ configs are also run for real on 2 CPU processes as far as CPU allows: hierarchical partitioning
(hpZ) of the frozen teacher and of the trained student, and the optimiser-only offload (DeepSpeedCPUAdam),
through `engine.training.engines.build_engines` against the unsharded models. qwZ and qgZ need DeepSpeed's quantizer
kernels, which exist only for CUDA: on CPU the test checks that DeepSpeed says so.
"""
import copy
import json

import pytest
from helpers import REPO, launch_two_ranks, tiny_model

from engine.training.stage import TrainConfig

DS_CONFIGS = REPO / "ds_configs"

# What each file promises: trained (has the batch/clipping keys, may carry an optimizer) or frozen, bf16,
# offload devices, the optimizer block DeepSpeed builds, and the ZeRO++ keys.
PROMISES = {
    "zero3_train.json": dict(trained=True, bf16=True),
    "zero3_train_fp32.json": dict(trained=True, bf16=False),
    "zero3_train_offload.json": dict(trained=True, bf16=True, offload_param="cpu", offload_optimizer="cpu",
                                     optimizer="adamw"),
    "zero3_train_offload_optimizer.json": dict(trained=True, bf16=True, offload_optimizer="cpu", optimizer="adamw"),
    "zero3_train_zeropp.json": dict(trained=True, bf16=True, hpz=8, quantized_weights=True,
                                    quantized_gradients=True),
    "zero3_inference.json": dict(trained=False, bf16=True),
    "zero3_inference_offload.json": dict(trained=False, bf16=True, offload_param="cpu"),
    "zero3_inference_zeropp.json": dict(trained=False, bf16=True, hpz=8, quantized_weights=True),
}
TRAINED = sorted(name for name, promise in PROMISES.items() if promise["trained"])
FROZEN = sorted(name for name, promise in PROMISES.items() if not promise["trained"])
# "auto" is allowed only where the engine replaces it (training.deepspeed_config.train_ds_config, build_engines).
FILLED_AUTO = {("train_micro_batch_size_per_gpu",), ("gradient_accumulation_steps",), ("gradient_clipping",),
               *(("optimizer", "params", key) for key in ("lr", "betas", "eps", "weight_decay"))}


def load(name: str) -> dict:
    return json.loads((DS_CONFIGS / name).read_text())


def deepspeed_config(config: dict):
    """DeepSpeed's parsed config (pydantic-validated; a world of one without a process group)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(copy.deepcopy(config))


def as_engine_fills(config: dict) -> dict:
    """The batch keys the engine sets (engine.training.deepspeed_config.train_ds_config / teacher_ds_config)."""
    config = copy.deepcopy(config)
    config.pop("train_batch_size", None)
    config.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=3)
    return config


def autos(value, path=()):
    if value == "auto":
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from autos(item, path + (key,))


def test_every_file_has_its_promises_listed():
    assert sorted(p.name for p in DS_CONFIGS.glob("*.json")) == sorted(PROMISES)


@pytest.mark.parametrize("name", sorted(PROMISES))
def test_config_parses_and_keeps_its_promises(name):
    raw = load(name)
    promise = PROMISES[name]
    assert not set(autos(raw)) - FILLED_AUTO, "an 'auto' value the engine does not fill"
    parsed = deepspeed_config(as_engine_fills(raw))
    zero = parsed.zero_config
    assert parsed.zero_optimization_stage == 3
    assert parsed.train_micro_batch_size_per_gpu == 2 and parsed.gradient_accumulation_steps == 3
    assert parsed.bfloat16_config.enabled == promise["bf16"] and not parsed.float16_config.enabled
    for key in ("offload_param", "offload_optimizer"):
        offload = getattr(zero, key)
        assert (offload.device if offload is not None else None) == promise.get(key), key
    assert parsed.optimizer_name == promise.get("optimizer")
    assert zero.zero_hpz_partition_size == promise.get("hpz", 1)
    assert zero.zero_quantized_weights == promise.get("quantized_weights", False)
    assert zero.zero_quantized_gradients == promise.get("quantized_gradients", False)
    assert not zero.zero_quantized_nontrainable_weights  # the teacher is frozen only after it is partitioned
    if promise["trained"]:
        assert "gradient_clipping" in raw and zero.overlap_comm
        assert zero.gather_16bit_weights_on_model_save  # the trainer saves consolidated 16-bit snapshots
        assert zero.reduce_scatter  # qgZ refuses reduce_scatter=false (stage3.py asserts it)
    else:
        assert "optimizer" not in raw and "scheduler" not in raw and parsed.optimizer_name is None
        assert "gradient_clipping" not in raw


def test_deepspeed_rejects_unknown_keys_inside_zero_optimization():
    """Why the configs carry no "_comment" keys: DeepSpeed forbids unknown keys in its sections."""
    config = as_engine_fills(load("zero3_inference_zeropp.json"))
    config["zero_optimization"]["_comment"] = "hpZ = GPUs per node"
    with pytest.raises(Exception, match="_comment"):
        deepspeed_config(config)


@pytest.mark.parametrize("train", TRAINED)
@pytest.mark.parametrize("teacher", FROZEN)
def test_engine_configs_are_accepted(train, teacher):
    from engine.config import RunConfig
    from engine.training.deepspeed_config import bf16_enabled, teacher_ds_config, train_ds_config

    cfg = RunConfig(teacher="x", data="x", out="x", batch_size=8, grad_accum=2, max_grad_norm=0.5,
                    deepspeed=str(DS_CONFIGS / train), teacher_deepspeed=str(DS_CONFIGS / teacher))
    trained = train_ds_config(TrainConfig.of(cfg), backwards_per_step=3)
    frozen = teacher_ds_config(TrainConfig.of(cfg), trained)
    parsed_trained, parsed_frozen = deepspeed_config(trained), deepspeed_config(frozen)
    assert parsed_trained.train_micro_batch_size_per_gpu == 4  # 8 sequences / (1 process x 2 accumulation)
    assert parsed_trained.gradient_accumulation_steps == 6  # 3 widths x --grad-accum 2
    assert parsed_trained.gradient_clipping == 0.5
    assert parsed_frozen.gradient_accumulation_steps == 1 and parsed_frozen.optimizer_name is None
    assert parsed_frozen.bfloat16_config.enabled == bf16_enabled(trained) == PROMISES[train]["bf16"]
    zero, frozen_zero = load(train)["zero_optimization"], load(teacher)["zero_optimization"]
    assert trained["zero_optimization"] == zero and frozen["zero_optimization"] == frozen_zero


# --- ZeRO++ and optimiser offload on 2 CPU processes --------------------------------------------------------------
@pytest.fixture(scope="module")
def zeropp_report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zeropp")
    tiny_model("llama_gqa", seed=0).save_pretrained(root / "teacher")
    tiny_model("llama_gqa", seed=1).save_pretrained(root / "student")  # differs from the teacher: a real loss
    return launch_two_ranks("zeropp_worker.py", root / "report.json", "--teacher", root / "teacher",
                            "--student", root / "student")


def assert_stage_matches(row: dict, student_hpz: int):
    assert row["ok"], row
    assert row["teacher_partitioned"] and row["teacher_hpz"] == 2 and row["teacher_hpz_secondary"], row
    assert row["teacher_logit_error_0"] <= 1e-5 and row["teacher_logit_error_1"] <= 1e-5, row
    assert row["student_hpz"] == student_hpz and row["student_hpz_secondary"] == (student_hpz > 1), row
    assert row["student_loss"] > 0.1 and row["student_loss_error"] <= 1e-5, row
    # Adam's first step moves every weight by about lr (1e-2); a gradient summed in another order changes
    # the tiniest gradients' steps a little.
    assert row["student_update_size"] > 5e-3 and row["student_update_error"] <= 1e-4, row


@pytest.mark.multiprocess
@pytest.mark.slow
def test_hpz_teacher_and_optimizer_offload(zeropp_report):
    """zero3_inference_zeropp.json (hpZ only) + zero3_train_offload_optimizer.json through build_engines."""
    row = zeropp_report["hpz_teacher_offload_optimizer"]
    assert_stage_matches(row, student_hpz=1)
    assert row["student_optimizer"] == "DeepSpeedCPUAdam" and row["student_offload_optimizer"] == "cpu"
    assert not row["student_offload_param"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_hpz_on_teacher_and_student(zeropp_report):
    """Both engines under hpZ (zero3_train_zeropp.json without quantisation)."""
    row = zeropp_report["hpz_teacher_hpz_student"]
    assert_stage_matches(row, student_hpz=2)
    assert row["student_optimizer"] == "AdamW"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_hpz_second_stage_in_the_same_process(zeropp_report):
    """`minidisc compress` builds its stages in one process: the next stage's hpZ models load too."""
    row = zeropp_report["second_stage"]
    assert row["ok"], row
    assert_stage_matches(row, student_hpz=1)


def cpu_kernel_missing(row: dict) -> bool:
    return not row["ok"] and "not been implemented on CPU" in row["error"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_qwz_teacher(zeropp_report):
    """qwZ (int8 weights in the all-gather): DeepSpeed's quantizer op has no CPU implementation."""
    row = zeropp_report["qwz_teacher"]
    if cpu_kernel_missing(row):
        pytest.skip(f"qwZ cannot run here: {row['error']} ({row['where']})")
    assert row["ok"], row
    assert row["teacher_logit_error"] < 0.5, row  # int8 block quantisation: close, not exact


@pytest.mark.multiprocess
@pytest.mark.slow
def test_qgz(zeropp_report):
    """qgZ on one node falls back to the plain reduce-scatter; across nodes it needs the quantizer op."""
    assert zeropp_report["qgz_one_node"]["ok"], zeropp_report["qgz_one_node"]
    row = zeropp_report["qgz_two_nodes"]
    if cpu_kernel_missing(row):
        pytest.skip(f"qgZ across nodes cannot run here: {row['error']} ({row['where']})")
    assert row["ok"], row
