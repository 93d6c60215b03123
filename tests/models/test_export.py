"""Exported checkpoints reload in a fresh process and reproduce the supernet's logits (fp32, 1e-5)."""
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, run_python, tiny_model
from huggingface_hub import ModelCard

import engine
from engine.models.families import FAMILIES, family_for

# What an export must carry over from the teacher's config unchanged (sliding-window attention).
KEPT_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "tie_word_embeddings")

# Loads each case's checkpoint the way a user would and reports its class and the logits' error.
LOADER = r"""
import json, sys
if sys.argv[2] == "block-engine":
    sys.modules["engine"] = None  # the package is installed here; prove the checkpoint does not need it
else:
    import engine
import torch
from transformers import AutoModelForCausalLM
results = []
for case in json.load(open(sys.argv[1])):
    if sys.argv[2] == "block-engine":
        model = AutoModelForCausalLM.from_pretrained(case["dir"], trust_remote_code=case["trust_remote_code"])
    else:
        model = engine.load_causal_lm(case["dir"])
    model.eval()
    data = torch.load(case["io"])
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"]).logits
        # greedy decoding with the KV cache (layers without heads must keep its length) vs without it
        prompt, ids = data["input_ids"][:1], data["input_ids"][:1]
        cached = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=True,
                                pad_token_id=0)
        for _ in range(4):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    results.append({"class": type(model).__module__ + "." + type(model).__name__,
                    "max_error": (logits - data["logits"]).abs().max().item(),
                    "generate_matches": torch.equal(cached, ids),
                    "parameters": sum(p.numel() for p in model.parameters())})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def exported(pruned_dirs, tmp_path_factory):
    """Export every family at two per-layer sparsities (one with emptied layers) and uniformly."""
    root = tmp_path_factory.mktemp("exports")
    cases = []
    x = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    for name, pruned in pruned_dirs.items():
        supernet = engine.Supernet.from_pretrained(pruned).eval()
        family = family_for(supernet.config)
        for sparsity, uniform in ((0.5, False), (0.95, False), (0.5, True)):
            out = root / f"{name}-{sparsity}-{'uniform' if uniform else 'layers'}"
            summary = engine.export(pruned, sparsity, out, uniform=uniform)
            shape = supernet.plan.uniform_shape(sparsity, family) if uniform else supernet.plan.shape(sparsity)
            supernet.set_shape(shape)
            with torch.no_grad():
                logits = supernet(input_ids=x).logits
            torch.save({"input_ids": x, "logits": logits}, out / "io.pt")
            cases.append(dict(name=name, sparsity=sparsity, uniform=uniform, dir=str(out), io=str(out / "io.pt"),
                              shape=shape, parameters=summary["parameters"]))
    return cases


def _load_all(cases, tmp_path, block_engine, trust_remote_code):
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps([{"dir": c["dir"], "io": c["io"], "trust_remote_code": trust_remote_code}
                                for c in cases]))
    result = run_python(LOADER, spec, "block-engine" if block_engine else "with-engine")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_per_layer_export_after_import_engine(exported, tmp_path):
    cases = [c for c in exported if not c["uniform"]]
    assert any(0 in c["shape"].attention + c["shape"].ffn for c in cases)  # empty layers are exercised
    for case, result in zip(cases, _load_all(cases, tmp_path, block_engine=False, trust_remote_code=False)):
        assert result["class"].startswith("engine.models.modeling_minidisc.MiniDisc"), result
        assert result["max_error"] <= 1e-5, (case["name"], case["sparsity"], result)
        assert result["parameters"] == case["parameters"]


def test_per_layer_export_from_checkpoint_alone(exported, tmp_path):
    cases = [c for c in exported if not c["uniform"]]
    for case, result in zip(cases, _load_all(cases, tmp_path, block_engine=True, trust_remote_code=True)):
        assert result["class"].startswith("transformers_modules."), result  # code came from the checkpoint
        assert result["max_error"] <= 1e-5, (case["name"], case["sparsity"], result)
        assert result["generate_matches"], (case["name"], case["sparsity"], result)


def test_uniform_export_is_stock_transformers(exported, tmp_path):
    cases = [c for c in exported if c["uniform"]]
    for case, result in zip(cases, _load_all(cases, tmp_path, block_engine=True, trust_remote_code=False)):
        model_type = CONFIGS[case["name"]]["model_type"]
        expected = "." + FAMILIES[model_type].architectures[0]
        assert result["class"].startswith("transformers.models.") and result["class"].endswith(expected), result
        assert result["max_error"] <= 1e-5, (case["name"], result)
        assert len(set(case["shape"].attention)) == 1 and len(set(case["shape"].ffn)) == 1
        config = json.loads(Path(case["dir"], "config.json").read_text())
        assert config["model_type"] == model_type and "auto_map" not in config


def test_query_head_exports_keep_every_kv_head_until_a_layer_empties(exported):
    """Query-head units: every exported layer keeps all KV heads and the same query heads in each KV group, or no
    heads at all; some layer lost query heads without losing its KV heads (what KV-group units cannot do)."""
    partial = 0
    for case in (c for c in exported if CONFIGS[c["name"]].get("attention_unit") == "query-head"):
        config = json.loads(Path(case["dir"], "config.json").read_text())
        teacher = CONFIGS[case["name"]]
        teacher_kv, teacher_q = teacher["num_key_value_heads"], teacher["num_attention_heads"]
        if case["uniform"]:
            layers = [(config["num_key_value_heads"], config["num_attention_heads"])]
        else:
            layers = list(zip(config["kv_heads_per_layer"], config["query_heads_per_layer"]))
        for kv, query in layers:
            assert (kv, query % teacher_kv) == (teacher_kv, 0) if query else kv == 0, (case["dir"], layers)
            partial += 0 < query < teacher_q
        assert config["minidisc_attention_unit"] == "query-head"
    assert partial


def test_exports_keep_the_teachers_attention_settings(exported, pruned_dirs):
    """Sliding windows (Mistral's, Qwen2's per-layer types) and tying come through both kinds of export."""
    for case in exported:
        teacher = json.loads((pruned_dirs[case["name"]] / "config.json").read_text())
        config = json.loads(Path(case["dir"], "config.json").read_text())
        for key in KEPT_KEYS:
            assert config.get(key) == teacher.get(key), (case["name"], case["uniform"], key)
    windows = {c["name"] for c in exported
               if json.loads(Path(c["dir"], "config.json").read_text()).get("sliding_window")}
    assert {"mistral", "qwen2"} <= windows  # the check above compared real windows


TOKENIZER_LOADER = r"""
import json, sys, warnings
sys.modules["engine"] = None
warnings.simplefilter("always")  # any warning reaches stderr
# ... but this one of torch 2.6 (pyproject's lowest): torch.distributed.nn.jit.instantiator makes a TemporaryDirectory
# at import that lives as long as the process, reported at exit (the pinned torch has none)
warnings.filterwarnings("ignore", "Implicitly cleaning up <TemporaryDirectory", ResourceWarning)
from transformers import AutoConfig, AutoTokenizer
from pathlib import Path
for directory in json.loads(Path(sys.argv[1]).read_text()):
    assert AutoTokenizer.from_pretrained(directory)("hello world")["input_ids"], directory
    AutoConfig.from_pretrained(directory)
print("ok")
"""


def test_exports_load_tokenizer_and_config_without_prompt_or_warning(exported, tmp_path):
    """A tokenizer needs no model code: AutoTokenizer (which reads config.json first) neither asks to run the
    checkpoint's code nor warns, for per-layer and uniform exports alike."""
    spec = tmp_path / "dirs.json"
    spec.write_text(json.dumps([c["dir"] for c in exported]))
    result = run_python(TOKENIZER_LOADER, spec)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    assert result.stderr.strip() == "", result.stderr[-3000:]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_exported_files(exported):
    for case in exported:
        readable = 0o666 & ~_umask()  # what any other tool's files get: a teammate can read them
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in Path(case["dir"]).iterdir()}
        assert set(modes.values()) == {readable}, modes
        files = set(modes)
        expected = {"config.json", "model.safetensors", "tokenizer_config.json", "minidisc_export.json", "README.md"}
        assert expected <= files
        card = ModelCard.load(Path(case["dir"], "README.md"))
        assert card.data.library_name == "transformers" and "minidisc" in card.data.tags
        assert f"{case['parameters']:,}" in card.text and ("trust_remote_code=True" in card.text) != case["uniform"]
        assert ("modeling_minidisc.py" in files) == (not case["uniform"])


def test_bf16_teacher_stays_bf16(corpus, tokenizer_dir, tmp_path):
    """Scores are computed in fp32, but a bf16 checkpoint comes back in bf16 (not twice its size)."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    teacher = tmp_path / "teacher"
    tiny_model("llama_gqa").to(torch.bfloat16).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(teacher)
    engine.prune(teacher, corpus["jsonl"], tmp_path / "pruned", calib_samples=2, seq_len=16)
    engine.export(tmp_path / "pruned", 0.5, tmp_path / "student")
    for directory in ("pruned", "student"):
        with safe_open(tmp_path / directory / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, directory
        assert json.loads((tmp_path / directory / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("name", ["llama_gqa", "llama_gqa_bias", "qwen3", "llama_gqa_qh", "opt"])
@pytest.mark.parametrize("uniform", [False, True])
def test_slicing_reads_the_checkpoint_tensor_by_tensor(name, uniform, pruned_dirs, tmp_path, monkeypatch):
    """A stage's start (sparsity 0.9 with a trained TA at 0.5 written over its prefixes) is built from the
    checkpoints' tensors one at a time, equal to slicing the whole teacher in memory, which it never loads."""
    from engine.models.export import kept_regions, pruned_model, sliced_checkpoint
    from engine.models.loading import load_causal_lm

    pruned = pruned_dirs[name]
    full = load_causal_lm(pruned)
    family, plan = family_for(full.config), engine.PruningPlan.load(pruned)
    shape_of = (lambda s: plan.uniform_shape(s, family)) if uniform else plan.shape
    ta = pruned_model(full, shape_of(500), uniform)
    with torch.no_grad():  # "trained": the TA's weights differ from the teacher's prefixes
        for p in ta.parameters():
            p.add_(torch.randn_like(p))
    ta.save_pretrained(tmp_path / "ta")
    state = {k: v.clone() for k, v in full.state_dict().items()}  # the in-memory way: the TA over the teacher
    ta_part = kept_regions(full, family, shape_of(500))  # prefixes, or prefixes of every KV group's query heads
    for key, tensor in ta.state_dict().items():
        state[key][ta_part.get(key, (slice(None),))] = tensor
    expected = pruned_model(full, shape_of(900), uniform, state=state).state_dict()

    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a whole checkpoint was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    model = sliced_checkpoint(pruned, shape_of(900), uniform, trained=tmp_path / "ta")
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    for key, buffer in model.named_buffers():
        assert not buffer.is_meta, key
    x = torch.randint(3, 300, (1, 7))
    with torch.no_grad():
        reference = pruned_model(full, shape_of(900), uniform, state=state)
        torch.testing.assert_close(model(input_ids=x).logits, reference(input_ids=x).logits, rtol=0, atol=0)
    if name == "opt" and not uniform:  # a TA saved as pytorch_model.bin cannot be read by parts: loaded whole
        monkeypatch.undo()
        ta.config.save_pretrained(tmp_path / "ta-bin")  # (save_pretrained writes safetensors only)
        torch.save(ta.state_dict(), tmp_path / "ta-bin" / "pytorch_model.bin")
        whole = sliced_checkpoint(pruned, shape_of(900), uniform, trained=tmp_path / "ta-bin").state_dict()
        assert all(torch.equal(whole[key], expected[key]) for key in expected)


def test_per_layer_model_takes_query_heads_its_kv_heads_can_share():
    """Per layer: the listed query heads (by default 3 per KV head, the teacher's), refused in one line when the
    KV heads cannot share them evenly. Checked on the model, as older transformers fill configs in no hook."""
    from engine.models.modeling_minidisc import MiniDiscLlamaConfig, MiniDiscLlamaForCausalLM

    shapes = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=2, vocab_size=32)

    def query_heads(**lists):
        model = MiniDiscLlamaForCausalLM(MiniDiscLlamaConfig(**shapes, **lists))
        return [layer.self_attn.q_proj.out_features // 8 for layer in model.model.layers]

    assert query_heads(kv_heads_per_layer=[2, 0], query_heads_per_layer=[4, 0]) == [4, 0]
    assert query_heads(kv_heads_per_layer=[2, 1]) == [6, 3]
    for query in ([3, 0], [4, 2]):
        with pytest.raises(ValueError, match="cannot share"):
            query_heads(kv_heads_per_layer=[2, 0], query_heads_per_layer=query)
