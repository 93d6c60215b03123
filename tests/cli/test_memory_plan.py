"""`minidisc plan`: byte accounting against independent references (DeepSpeed's estimator, meta-device models,
saved tensors measured under autograd), physics that must hold, and the command end to end."""
import gc
import json
from dataclasses import replace
from functools import lru_cache

import pytest
import torch

import engine
from engine.cli.main import main
from engine.cli.memory_plan.advice import recommend
from engine.cli.memory_plan.estimate import (
    GIB,
    Cluster,
    PlanOptions,
    activation_bytes,
    layer_activation_bytes,
    mse_bytes,
    plan_memory,
    trained_model_states,
)
from engine.cli.memory_plan.shapes import (
    PRESETS,
    Shapes,
    largest_layer_parameters,
    parameter_count,
    preset_config,
    width_parameters,
)
from engine.config import RunConfig
from engine.core.widths import Shape
from engine.models.loading import meta_model


@lru_cache(maxsize=None)
def preset_model(name):
    """A preset's architecture on the meta device, built once per test session (the 70B ones take a while)."""
    return meta_model(preset_config(name))


def measured_counts(model) -> tuple[int, int]:
    """(total parameters, largest module's own parameters) read off the instantiated model. Shared weights are
    deduplicated by identity: on the meta device every tensor reports data_ptr() == 0, so DeepSpeed's
    `model_to_params` (and `estimate_zero3_model_states_mem_needs_all_live`) would count one tensor only."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


# --- parameter counts -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_counts_from_config_equal_the_meta_model(name):
    total, largest = measured_counts(preset_model(name))
    config = preset_config(name)
    assert parameter_count(config) == total
    assert largest_layer_parameters(config) == largest


def test_presets_have_the_published_sizes():
    published = {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
                 "llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496, "opt-1.3b": 1_315_758_080,
                 "mistral-7b": 7_241_732_096, "qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512,
                 "qwen3-0.6b": 596_049_920, "qwen3-8b": 8_190_735_360}
    for name, count in published.items():
        assert parameter_count(preset_config(name)) == count, name
    assert preset_config("llama-3-8b").num_key_value_heads == 8
    assert preset_config("llama-2-7b").num_key_value_heads == 32
    assert preset_config("opt-30b").ffn_dim == 4 * 7168 and preset_config("opt-30b").tie_word_embeddings


TINY = {
    "llama_bias": ("llama", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                                 intermediate_size=37, num_hidden_layers=3, attention_bias=True, mlp_bias=True,
                                 tie_word_embeddings=True)),
    "qwen2_tied": ("qwen2", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=37,
                                 num_hidden_layers=3, tie_word_embeddings=True)),
    "qwen3_bias": ("qwen3", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 intermediate_size=37, num_hidden_layers=3, attention_bias=True)),
    "opt_project": ("opt", dict(hidden_size=48, num_attention_heads=6, ffn_dim=37, num_hidden_layers=3,
                                word_embed_proj_dim=32)),
    "opt_post_norm": ("opt", dict(hidden_size=48, num_attention_heads=6, ffn_dim=37, num_hidden_layers=3,
                                  word_embed_proj_dim=48, do_layer_norm_before=False, enable_bias=False)),
}


def tiny_config(name, **overrides):
    from transformers import AutoConfig

    family, options = TINY[name]
    return AutoConfig.for_model(family, vocab_size=97, **{**options, **overrides})


@pytest.mark.parametrize("name", list(TINY))
def test_counts_of_unusual_configs(name):
    config = tiny_config(name)
    assert (parameter_count(config), largest_layer_parameters(config)) == measured_counts(meta_model(config))


@pytest.mark.parametrize("name", ["llama-2-70b", "opt-1.3b", "llama-3-8b"])
def test_width_counts_equal_count_parameters_on_any_layer_split(name):
    """The candidate counts depend only on the total units kept: check against engine.models.units.count_parameters
    with the kept units spread unevenly over the layers (as a global ranking does)."""
    from engine.models.families import family_for
    from engine.models.units import count_parameters

    config, model = preset_config(name), preset_model(name)
    s = Shapes.of(config)
    for permille in (0, 500, 850, 900):
        width_count = width_parameters(config, permille)
        kept_kv = s.layers * s.kv_heads - (permille * s.layers * s.kv_heads + 500) // 1000
        kept_ffn = s.layers * s.intermediate - (permille * s.layers * s.intermediate + 500) // 1000
        shape = Shape(_spread(kept_kv, s.layers, s.kv_heads), _spread(kept_ffn, s.layers, s.intermediate))
        assert count_parameters(model, family_for(config), shape) == width_count


def _spread(kept: int, layers: int, size: int) -> tuple[int, ...]:
    """`kept` units over `layers` layers of `size`, front-loaded (full early layers, empty late ones)."""
    out = []
    for _ in range(layers):
        out.append(min(size, kept))
        kept -= out[-1]
    return tuple(out)


# --- model states against DeepSpeed's estimator -----------------------------------------------------------------
OFFLOAD = {"adamw": (False, False), "offload-opt": (True, False), "offload-all": (True, True)}


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-2-70b", "opt-1.3b", "llama-3-8b", "opt-30b"])
def test_model_states_agree_with_deepspeeds_estimator(name):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    total, largest = measured_counts(preset_model(name))  # measured on the model, not from our arithmetic
    config = preset_config(name)
    worst = 0.0
    for nodes, gpus in ((1, 8), (4, 8), (2, 1)):
        cluster = Cluster(nodes, gpus, 80)
        for trained, (cpu_offload, offload_params) in OFFLOAD.items():
            ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
                total, largest, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=cpu_offload,
                cpu_offload_params=offload_params, zero_init=True)
            ours = trained_model_states(parameter_count(config), largest_layer_parameters(config), cluster, trained)
            # DeepSpeed's estimator counts the gradient partition in fp32; bf16 ZeRO-3 keeps it in bf16
            fp32_grads = 2 * total / cluster.gpus if trained == "adamw" else 0
            gpu = ours.params_grads + ours.optimizer + fp32_grads
            for mine, theirs in ((gpu, ds_gpu), (ours.cpu_per_node, ds_cpu)):
                worst = max(worst, abs(mine - theirs) / theirs)
    assert worst < 0.10


def test_the_optimiser_step_is_one_sub_group_and_not_added_to_the_activations():
    """The step's fp32 gradient (6 bytes x a sub-group, `SUB_GROUP`) is made after the backward has freed the
    activations: the total takes the larger of the two, and offloaded optimisers step on the CPU."""
    from engine.cli.memory_plan.estimate import SUB_GROUP

    small = trained_model_states(10**8, 10**7, Cluster(1, 8, 80), "adamw")  # a 12.5M partition: all of it
    large = trained_model_states(7 * 10**9, 10**8, Cluster(1, 8, 80), "adamw")  # 875M: one sub-group of it
    assert (small.step, large.step) == (6 * 10**8 // 8, 6 * SUB_GROUP)
    assert trained_model_states(7 * 10**9, 10**8, Cluster(1, 8, 80), "offload-opt").step == 0
    row = rows_by_name(preset_config("llama-3-8b"), Cluster(1, 8, 80), PlanOptions())["zero3 / adamw"]
    states = row.teacher_bytes + row.params_grads_bytes + row.optimizer_bytes
    assert row.step_bytes == 6 * SUB_GROUP < row.activation_bytes + row.loss_bytes
    assert row.total_bytes == states + row.activation_bytes + row.loss_bytes
    larger = replace(row, step_bytes=row.activation_bytes + row.loss_bytes + 1)
    assert larger.total_bytes == states + larger.step_bytes


def test_adamw8bit_saves_six_bytes_per_parameter():
    cluster = Cluster(1, 8, 80)
    adamw = trained_model_states(7_000_000_000, 10**8, cluster, "adamw")
    small = trained_model_states(7_000_000_000, 10**8, cluster, "adamw8bit")
    assert adamw.params_grads == small.params_grads
    assert adamw.optimizer - small.optimizer == pytest.approx(6 * 7e9 / 8, rel=1e-6)


# --- activations against what autograd really saves -------------------------------------------------------------
def measure_activations(config, batch=2, seq=64, checkpointing=False, stacked=None) -> int:
    """Bytes of distinct non-parameter storages autograd saves in a bf16 forward with output_hidden_states,
    plus hidden states that only the returned tuple keeps alive (as while the loss is computed). `stacked`: the
    supernet's widths, run stacked on the batch repeated once per width."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForCausalLM

    from engine.training.engines import checkpoint_layers

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).train()
    if checkpointing:
        checkpoint_layers(model)
    if stacked:
        engine.Supernet(model).stack(stacked)
        batch *= len(stacked)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, config.vocab_size, (batch, seq))
    # The plan counts fused attention (flash: output and log-sum-exp saved), as GPUs run it. Older torch runs these
    # calls through the math path on a CPU (fp32 attention probabilities saved): nothing to compare with there.
    unsupported = None
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model.model(input_ids=ids, output_hidden_states=True, use_cache=False)
    except RuntimeError as e:
        unsupported = str(e).splitlines()[0]
    if unsupported:
        # A checkpointed layer that raised leaves torch's non-reentrant checkpoint generator open, its saved-tensor
        # hooks still pushed; whenever it is collected it pops the hooks on top of the stack, which in a later
        # measurement were that model's own checkpoint hooks (torch 2.6: the next one then measured as if not
        # checkpointed, depending on when the collector ran). Collect it now, with nothing of ours on the stack.
        gc.collect()
        pytest.skip(f"torch {torch.__version__} has no fused CPU attention for this call ({unsupported})")
    for state in out.hidden_states:
        saved.setdefault(state.untyped_storage().data_ptr(), state.untyped_storage().nbytes())
    return sum(saved.values())


def small_llama(**overrides):
    from transformers import LlamaConfig

    options = dict(vocab_size=101, hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                   intermediate_size=688, num_hidden_layers=3, tie_word_embeddings=False)
    return LlamaConfig(**{**options, **overrides})


def small_qwen3(**overrides):
    from transformers import Qwen3Config

    options = dict(vocab_size=101, hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                   intermediate_size=688, num_hidden_layers=3, tie_word_embeddings=False)
    return Qwen3Config(**{**options, **overrides})


def small_opt(**overrides):
    from transformers import OPTConfig

    options = dict(vocab_size=101, hidden_size=256, num_attention_heads=8, ffn_dim=1024, num_hidden_layers=3,
                   word_embed_proj_dim=256, dropout=0.0)
    return OPTConfig(**{**options, **overrides})


def planned_model_activations(config, tokens, permille=0, checkpointing=False) -> int:
    """The plan's activations without the loss's MSE term (the measurement runs the model alone) and without
    the checkpointed layer being recomputed (the measurement stops at the end of the forward)."""
    s = Shapes.of(config)
    planned = activation_bytes(config, tokens, permille, checkpointing) - mse_bytes(s) * tokens
    if checkpointing:
        planned -= layer_activation_bytes(s, s.q_dim, s.kv_dim, s.heads, s.intermediate) * tokens
    return planned


@pytest.mark.parametrize("make", [small_llama, small_qwen3, small_opt], ids=["llama", "qwen3", "opt"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_saved_tensors(make, checkpointing):
    config = make()
    measured = measure_activations(config, checkpointing=checkpointing)
    # OPT's LayerNorm keeps bf16 statistics on CPUs and fp32 ones on GPUs (what the plan counts): 8 bytes/token.
    assert planned_model_activations(config, 2 * 64, 0, checkpointing) == pytest.approx(measured, rel=0.01)


def test_activations_of_a_width_match_a_model_that_narrow():
    """Sparsity 0.5 keeps half the KV groups and neurons: a stock LLaMA with those shapes must save as much."""
    narrow = small_llama(num_attention_heads=4, num_key_value_heads=2, intermediate_size=344)
    assert planned_model_activations(small_llama(), 128, 500) == pytest.approx(measure_activations(narrow), rel=0.01)


def test_stacked_widths_hold_the_sum_of_their_activations():
    """Stacked (the default), a step holds every width's activations at once: the plan counts the sum over the
    widths a step may train, measured here on the supernet's stacked forward of the full and the half width."""
    full, half = Shape((4,) * 3, (688,) * 3), Shape((2,) * 3, (344,) * 3)
    planned = planned_model_activations(small_llama(), 128, 0) + planned_model_activations(small_llama(), 128, 500)
    assert planned == pytest.approx(measure_activations(small_llama(), stacked=[full, half]), rel=0.01)
    assert PlanOptions(truncate=500).widths_held == [500, 600, 700, 800, 850, 900]
    assert PlanOptions(truncate=500, sandwich_sample=2).widths_held == [500, 600, 700, 900]  # the most it may draw
    assert PlanOptions(truncate=500, stack_widths=2).widths_held == [500, 600]  # the first forward's
    assert PlanOptions(truncate=500, stack_widths=1).widths_held == [500]
    config = preset_config("llama-2-7b")
    stacked = rows_by_name(config, Cluster(1, 8, 80))["zero3 / adamw"]
    one_by_one = rows_by_name(config, Cluster(1, 8, 80), PlanOptions(stack_widths=1))["zero3 / adamw"]
    assert stacked.activation_bytes == sum(activation_bytes(config, 256, w) for w in PlanOptions().widths_held)
    assert one_by_one.activation_bytes == activation_bytes(config, 256, 0) < stacked.activation_bytes  # the widest


def test_opt_ffn_bytes_per_neuron():
    """ReLU saves its output, which is also fc2's input: 2 bytes per neuron and token, not 4."""
    s = Shapes.of(small_opt())
    per_layer = (layer_activation_bytes(s, s.q_dim, s.kv_dim, s.heads, 1024)
                 - layer_activation_bytes(s, s.q_dim, s.kv_dim, s.heads, 512))
    measured = measure_activations(small_opt()) - measure_activations(small_opt(ffn_dim=512))
    assert per_layer * s.layers * 128 == measured


# --- physics ----------------------------------------------------------------------------------------------------
def rows_by_name(config, cluster, options=PlanOptions()):
    return {row.name: row for row in plan_memory(config, cluster, options)}


def test_doubling_gpus_halves_the_sharded_terms():
    config = preset_config("llama-2-13b")
    largest = largest_layer_parameters(config)
    one, two = rows_by_name(config, Cluster(1, 8, 80)), rows_by_name(config, Cluster(2, 8, 80))
    gathered = 4 * largest
    assert two["zero3 / adamw"].optimizer_bytes == pytest.approx(one["zero3 / adamw"].optimizer_bytes / 2, rel=1e-6)
    assert two["zero3 / adamw"].params_grads_bytes - gathered == pytest.approx(
        (one["zero3 / adamw"].params_grads_bytes - gathered) / 2, rel=1e-6)
    head = 2 * max(largest, config.vocab_size * config.hidden_size)
    assert two["zero3 / adamw"].teacher_bytes - head == pytest.approx((one["zero3 / adamw"].teacher_bytes - head) / 2,
                                                                      rel=1e-6)
    for name in ("replicated / adamw", "int8 / adamw", "nf4 / adamw"):
        assert two[name].teacher_bytes == one[name].teacher_bytes
        assert two[name].activation_bytes == one[name].activation_bytes
        assert two[name].loss_bytes == one[name].loss_bytes


def test_teacher_placements_order():
    config = preset_config("llama-2-7b")
    eight, single = rows_by_name(config, Cluster(1, 8, 80)), rows_by_name(config, Cluster(1, 1, 80))
    teacher = {name.split(" / ")[0]: row.teacher_bytes for name, row in eight.items() if name.endswith("/ adamw")}
    assert teacher["nf4"] < teacher["int8"] < teacher["replicated"]
    assert teacher["zero3"] < teacher["int8"]
    assert 0.5 < teacher["int8"] / teacher["replicated"] < 0.56  # 1 byte vs 2 for the linears, bf16 embeddings
    assert single["zero3 / adamw"].teacher_bytes > single["replicated / adamw"].teacher_bytes  # + gathered layers


def test_activation_physics():
    config = preset_config("llama-2-7b")
    full = activation_bytes(config, 4 * 2048)
    assert activation_bytes(config, 4 * 2048, checkpointing=True) < full / 5
    assert activation_bytes(config, 8 * 2048) == 2 * full
    assert activation_bytes(config, 4 * 2048, 500) < full
    one_by_one = dict(stack_widths=1)  # the widest width's activations alone
    wide = rows_by_name(config, Cluster(1, 8, 80), PlanOptions(truncate=0, **one_by_one))["zero3 / adamw"]
    narrow = rows_by_name(config, Cluster(1, 8, 80), PlanOptions(truncate=500, **one_by_one))["zero3 / adamw"]
    assert wide.activation_bytes == activation_bytes(config, 256) > narrow.activation_bytes


def test_candidates_and_widths_per_step():
    options = PlanOptions(target=900, truncate=500)
    assert options.candidates == [500, 600, 700, 800, 850, 900]
    assert options.widths_per_step == 6
    assert PlanOptions(truncate=500, sandwich_sample=2).widths_per_step == 4
    assert PlanOptions(truncate=500, sandwich_sample=10).widths_per_step == 6
    assert PlanOptions(target=875, truncate=500, grid=(0, 500, 900)).candidates == [500, 875]


def test_recommendation_prefers_exact_teachers_then_no_offload():
    config = preset_config("llama-2-70b")
    best, reason = recommend(plan_memory(config, Cluster(4, 8, 80), PlanOptions(truncate=500)))
    assert best.name == "zero3 / adamw" and "replicated / adamw" in reason
    best, _ = recommend(plan_memory(config, Cluster(1, 8, 80), PlanOptions(truncate=500, seq_len=2048,
                                                                           stack_widths=1)))
    assert best.fits and best.teacher in ("replicated", "zero3") and best.trained != "adamw"
    best, _ = recommend(plan_memory(preset_config("opt-1.3b"), Cluster(1, 1, 80), PlanOptions()))
    assert best.name == "replicated / adamw"


def test_cpu_memory_limits_offload():
    config = preset_config("llama-2-70b")
    rows = plan_memory(config, Cluster(1, 8, 40, cpu_memory_gib=256), PlanOptions())
    offloaded = [row for row in rows if row.trained.startswith("offload")]
    assert offloaded and not any(row.fits for row in offloaded)
    assert all(row.cpu_per_node_bytes > 256 * GIB for row in offloaded)


# --- the command ------------------------------------------------------------------------------------------------
def plan_json(capsys, *argv) -> dict:
    assert main(["plan", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_llama_2_7b_on_one_node(capsys):
    argv = ["plan", "llama-2-7b", "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory", "80",
            "--target-sparsity", "0.9", "--truncate", "0.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "recommended: replicated / adamw" in out and "zero3_train.json" in out
    assert "6,738,415,616" in out and "909,176,832" in out  # teacher and the 0.9 candidate
    report = plan_json(capsys, *argv[1:])
    best = next(row for row in report["placements"] if row["name"] == report["recommended"])
    assert best["fits"] and best["total_bytes"] <= report["cluster"]["usable_bytes"]
    assert report["run"]["candidates"] == ["0.5", "0.6", "0.7", "0.8", "0.85", "0.9"]


def test_plan_defaults_are_compress_defaults(capsys):
    """No flags: the run `minidisc compress` does with its defaults (the whole grid, --batch-size 8, --seq-len 256)."""
    cfg = RunConfig()
    assert (cfg.truncate, cfg.batch_size, cfg.seq_len) == (0, 8, 256)
    report = plan_json(capsys, "llama-2-7b", "--gpus-per-node", 4, "--gpu-memory", 80)
    assert report["run"]["candidates"] == ["0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.85", "0.9"]
    assert (report["run"]["micro_batch"], report["run"]["seq_len"]) == (2, 256)


def test_a_slow_fit_gives_way_to_a_cheaper_change_of_options(capsys):
    """Offloading or quantising costs more than recomputing layers: when only that fits (or nothing does) and
    gradient checkpointing lets an exact, on-GPU placement fit, the plan recommends it and says what changed."""
    argv = ("llama-3-8b", "--gpus-per-node", 8, "--gpu-memory", 38, "--batch-size", 16, "--seq-len", 2048,
            "--truncate", 0.5)
    config, cluster = preset_config("llama-3-8b"), Cluster(1, 8, 38)
    as_given = PlanOptions(truncate=500, batch_size=16, seq_len=2048)
    slow = lambda options: not getattr(recommend(plan_memory(config, cluster, options))[0], "fast", False)  # noqa
    assert slow(as_given) and all(slow(replace(as_given, stack_widths=n)) for n in range(1, 6))
    report = plan_json(capsys, *argv)
    assert report["changed_options"] == ["--gradient-checkpointing"] and report["run"]["gradient_checkpointing"]
    best = next(row for row in report["placements"] if row["name"] == report["recommended"])
    assert best["fits"] and best["teacher"] in ("replicated", "zero3") and best["trained"] in ("adamw", "adamw8bit")
    assert main(["plan", *map(str, argv)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "with --gradient-checkpointing (as given," in out and "--gradient-checkpointing ..." in out
    assert plan_json(capsys, *argv, "--gradient-checkpointing")["changed_options"] == []  # already fast


def test_plan_llama_2_70b_on_four_nodes(capsys):
    report = plan_json(capsys, "llama-2-70b", "--nodes", 4, "--gpus-per-node", 8, "--gpu-memory", 80,
                       "--batch-size", 32, "--truncate", 0.5)
    assert report["recommended"] == "zero3 / adamw"
    assert report["ds_config"]["teacher_deepspeed"] == "ds_configs/zero3_inference.json"
    assert report["parameters"]["teacher"] == 68_976_648_192
    assert main(["plan", "llama-2-70b", "--nodes", "4", "--gpus-per-node", "8", "--gpu-memory", "80",
                 "--batch-size", "32", "--truncate", "0.5"]) == 0
    assert "zero3 / adamw *" in capsys.readouterr().out


def test_nothing_fits_says_what_to_change(capsys):
    assert main(["plan", "llama-2-70b", "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory", "16"]) == 0
    out = capsys.readouterr().out
    assert "nothing fits" in out and "more GPUs" in out and "--gradient-checkpointing" in out
    assert "--stack-widths 1: still needs" in out  # the fewest widths per forward do not fit either
    argv = ["plan", "llama-2-70b", "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory", "80", "--seq-len", "2048",
            "--truncate", "0.5", "--batch-size", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out  # all six widths of a step do not fit in one forward; fewer do
    config, cluster = preset_config("llama-2-70b"), Cluster(1, 8, 80)
    most = next(n for n in range(5, 0, -1) if recommend(plan_memory(config, cluster, PlanOptions(
        truncate=500, seq_len=2048, stack_widths=n)))[0])  # the most widths per forward that fit
    assert "nothing fits" in out and f"--stack-widths {most}: fits" in out
    report = plan_json(capsys, "llama-2-70b", "--gpu-memory", 16)
    assert report["recommended"] is None and not any(row["fits"] for row in report["placements"])


def save_tiny_llama(directory):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def test_plan_a_checkpoint_directory_and_a_config_file(tmp_path, capsys):
    count = save_tiny_llama(tmp_path / "tiny")
    report = plan_json(capsys, tmp_path / "tiny", "--gpu-memory", 8)
    assert report["parameters"]["teacher"] == count and report["recommended"] == "replicated / adamw"
    assert plan_json(capsys, tmp_path / "tiny" / "config.json", "--gpu-memory", 8)["parameters"]["teacher"] == count


def _error(capsys, *argv) -> str:
    assert main(["plan", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minidisc: error: ")
    return err[0]


def test_bad_inputs_get_one_line_errors(tmp_path, capsys):
    from transformers import GPT2Config

    assert all(name in _error(capsys, "llama-9b", "--gpu-memory", 80) for name in PRESETS)
    assert "does not exist" in _error(capsys, tmp_path / "missing", "--gpu-memory", 80)
    GPT2Config().save_pretrained(tmp_path / "gpt2")
    assert "unsupported model family 'gpt2'" in _error(capsys, tmp_path / "gpt2", "--gpu-memory", 80)
    assert "unsupported model family 'gpt2'" in _error(capsys, tmp_path / "gpt2" / "config.json", "--gpu-memory", 80)
    assert "--gpu-memory must be a positive" in _error(capsys, "llama-2-7b", "--gpu-memory", 0)
    assert "--gpu-memory must be a positive" in _error(capsys, "llama-2-7b", "--gpu-memory", -8)
    assert "cannot be split evenly" in _error(capsys, "llama-2-7b", "--gpu-memory", 80, "--gpus-per-node", 8,
                                              "--batch-size", 12)
    assert "is above --target-sparsity" in _error(capsys, "llama-2-7b", "--gpu-memory", 80, "--truncate", 0.95)


def test_a_per_layer_export_is_refused(pruned_dirs, tmp_path, capsys):
    """A per-layer export keeps the stock model_type, so only its architectures tell it apart: plan the teacher."""
    import engine

    exported = tmp_path / "student"
    engine.export(pruned_dirs["llama_gqa"], 0.7, exported, uniform=False)
    capsys.readouterr()  # the export's log
    for spec in (exported, exported / "config.json"):
        assert "an exported MiniDisc model with per-layer widths" in _error(capsys, spec, "--gpu-memory", 80)


# --- pruning's importance pass ----------------------------------------------------------------------------------
def measure_importance_activations(config, batch=2, seq=64) -> int:
    """Bytes autograd saves in pruning's importance forward: frozen bf16 weights, masks that take the gradient."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForCausalLM

    from engine.models.families import family_for
    from engine.pruning.masks import masked, ones_masks

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval().requires_grad_(False)
    family = family_for(model.config)
    attention, ffn = ones_masks(model, family, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(0, config.vocab_size, (batch, seq))
    try:
        with masked(model, family, attention, ffn, fused=True), sdpa_kernel(SDPBackend.FLASH_ATTENTION), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(input_ids=ids, use_cache=False)
    except RuntimeError as e:
        pytest.skip(f"torch {torch.__version__} has no fused CPU attention for this call ({str(e).splitlines()[0]})")
    return sum(saved.values())


@pytest.mark.parametrize("make", [small_llama, small_qwen3, small_opt], ids=["llama", "qwen3", "opt"])
def test_pruning_activations_match_saved_tensors(make):
    """The plan's importance-pass activations against what autograd keeps: a few percent over on 8 layers (the
    first layer keeps less, its input taking no gradient), never under."""
    from engine.cli.memory_plan.pruning import pruning_memory

    config = make(num_hidden_layers=8)
    planned = pruning_memory(config, Cluster(1, 1, 80), 2, 64).activation_bytes
    measured = measure_importance_activations(config)
    assert measured <= planned <= 1.1 * measured


def test_pruning_is_planned_and_advised(capsys):
    """Partitioned over more GPUs each holds less of the teacher, not fewer activations; what does not fit says
    what would: a shorter calibration batch through `minidisc prune`."""
    from engine.cli.memory_plan.pruning import pruning_memory
    from engine.models.export import SHARD_BYTES
    from engine.pruning.prune import calibration_batch

    config = preset_config("llama-2-7b")
    one, eight = (pruning_memory(config, Cluster(1, gpus, 80), 1, 2048) for gpus in (1, 8))
    assert one.teacher_bytes == 2 * parameter_count(config) and eight.teacher_bytes < one.teacher_bytes / 4
    assert one.activation_bytes == eight.activation_bytes and one.cpu_node_bytes == 2 * parameter_count(config)
    assert eight.cpu_node_bytes == 2 * SHARD_BYTES  # after a launch rank 0 writes the checkpoint a shard at a time
    assert [calibration_batch(8, 256), calibration_batch(64, 2048), calibration_batch(2, 128)] == [4, 1, 2]
    report = plan_json(capsys, "llama-2-7b", "--gpu-memory", 18, "--seq-len", 2048)["pruning"]
    assert report["calibration_batch"] == 1 and not report["fits"]
    assert report["command"] == "minidisc prune --calib-batch-size 1 --calib-seq-len 512"  # the longest that fits
    assert report["advice"] == [f"`{report['command']}` first, then compress its output: fits",
                                "more GPUs: fits at 2 nodes x 1 GPUs"]  # the teacher split over 2
    assert plan_json(capsys, "llama-2-7b", "--gpu-memory", 80, "--seq-len", 2048)["pruning"]["fits"]
