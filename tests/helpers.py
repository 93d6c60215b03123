"""What the test modules share: tiny models and teachers, the console script, 2-process launches, recipes.

Test modules import from here (never from each other); fixtures live in conftest.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).parent / "workers"
SCRIPTS = REPO / "launch_scripts"
FP32 = str(REPO / "ds_configs" / "zero3_train_fp32.json")  # the CPU runs' DeepSpeed config
VOCAB = 512
MINIDISC = str(Path(sys.executable).parent / "minidisc")


# Odd sizes on purpose: intermediate 37 is not a multiple of 8, GQA has 3 query heads per KV group. The newer
# families each add what LLaMA lacks: Mistral a sliding window shorter than the test sequences, Qwen2 q/k/v
# biases, tied embeddings and sliding layers after the first, Qwen3 per-head q/k norms and head_dim x heads != hidden.
# Qwen's embeddings have rows past its tokenizer (`extra_vocab`), as the published ones do: AutoTokenizer loads the
# test tokenizer in a Qwen folder as a Qwen2Tokenizer, which adds <|endoftext|>.


CONFIGS = {
    "llama_mha": dict(model_type="llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=6,
                      head_dim=8, intermediate_size=37, num_hidden_layers=3),
    "llama_gqa": dict(model_type="llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                      head_dim=8, intermediate_size=37, num_hidden_layers=3),
    "llama_gqa_bias": dict(model_type="llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                           head_dim=8, intermediate_size=37, num_hidden_layers=3, attention_bias=True, mlp_bias=True),
    "mistral": dict(model_type="mistral", hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                    intermediate_size=37, num_hidden_layers=3, sliding_window=8),
    "qwen2": dict(model_type="qwen2", hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                  intermediate_size=37, num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
                  max_window_layers=1, tie_word_embeddings=True, extra_vocab=8),
    "qwen3": dict(model_type="qwen3", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=37, num_hidden_layers=3, extra_vocab=8),
    # query-head attention units (`minidisc prune --attention-unit query-head`)
    "llama_gqa_qh": dict(model_type="llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                         head_dim=8, intermediate_size=37, num_hidden_layers=3, attention_unit="query-head"),
    "qwen3_qh": dict(model_type="qwen3", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     intermediate_size=37, num_hidden_layers=3, extra_vocab=8, attention_unit="query-head"),
    "opt": dict(model_type="opt", hidden_size=48, num_attention_heads=6, ffn_dim=37, num_hidden_layers=3,
                dropout=0.0, word_embed_proj_dim=48),
}


def tiny_model(name: str, seed: int = 0, vocab_size: int = VOCAB):
    """A randomly initialised tiny causal LM (weights large enough that every unit matters)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    options = dict(CONFIGS[name])
    model_type = options.pop("model_type")
    vocab_size += options.pop("extra_vocab", 0)
    attention_unit = options.pop("attention_unit", None)
    if model_type == "opt":
        options["pad_token_id"] = 0
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, **options)
    if attention_unit:
        config.minidisc_attention_unit = attention_unit  # what `minidisc prune` writes
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "norm" not in name_:
                p.normal_(0, 0.15)
            elif "q_norm" in name_ or "k_norm" in name_:  # per-head norms that differ by channel
                p.uniform_(0.5, 1.5)
    return model.eval()


def save_teacher(name: str, directory: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer

    tiny_model(name, seed).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


def run_python(code: str, *args, timeout: int = 300, env=None) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter (for loading checkpoints the way a user's process would)."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, env={**os.environ, **(env or {})}, cwd="/")


def options(teacher, corpus, out, *extra):
    return ["--teacher", teacher, "--data", corpus["train"], "--dev-data", corpus["dev"], "--out", out,
            "--grid", "0", "0.5", "0.7", "0.9", "--truncate", "0.5", "--max-steps", "8", "--sandwich-steps", "8",
            "--eval-every", "4",
            "--batch-size", "4", "--seq-len", "32", "--eval-samples", "16", "--test-samples", "16",
            "--calib-samples", "4", "--lr", "2e-3", "--deepspeed", FP32, *extra]


def minidisc(*args, timeout=600, check=True, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run([MINIDISC, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "240",  # unwrapped log lines
                                 **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr[-5000:]
    return result


def held_out_blocks(out: Path, cache: Path | None = None) -> dict[str, torch.Tensor]:
    """The dev and test blocks of a run (text sources), read from its work/data.json and token files directly:
    each part's documents concatenated and cut into --seq-len blocks."""
    import numpy as np

    described = json.loads((Path(out) / "work" / "data.json").read_text())
    root = Path(cache or os.environ["MINIDISC_CACHE"]) / "tokens"
    size, splits = described["seq_len"], {}
    for name in ("dev", "test"):
        blocks = []
        for part in described[name]:
            folder = root / part["key"]
            offsets = np.fromfile(folder / "offsets.bin", dtype=np.int64)
            dtype = json.loads((folder / "meta.json").read_text())["dtype"]
            tokens = np.fromfile(folder / "tokens.bin", dtype=dtype)[offsets[part["first"]]: offsets[part["end"]]]
            blocks += [tokens[i * size: (i + 1) * size] for i in range(part["blocks"])]
        splits[name] = torch.tensor(np.stack(blocks).astype(np.int64))
    return splits


@torch.no_grad()
def accuracy_on(model_dir: Path, blocks: torch.Tensor) -> float:
    """Next-token accuracy of a saved checkpoint on token blocks, computed independently of the engine."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True).eval()
    logits = model(input_ids=blocks).logits[:, :-1]
    return (logits.argmax(-1) == blocks[:, 1:]).double().mean().item()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(worker: str, out: Path, *args) -> dict:
    """Run a worker with the `deepspeed` launcher on 2 CPU processes; returns rank 0's JSON report."""
    launcher = Path(sys.executable).parent / "deepspeed"
    command = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), WORKERS / worker, "--out", out, *args]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out.with_suffix(".log")
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0 and out.exists(), f"full log: {log}\n" + (result.stdout + result.stderr)[-4000:]
    return json.loads(out.read_text())


def write_recipe(path: Path, teacher, corpus, out: Path, **extra) -> Path:
    """The tiny compress run every launch test shares (the same as test_compress's, as a recipe)."""
    recipe = {"teacher": str(teacher), "data": str(corpus["train"]), "dev_data": str(corpus["dev"]),
              "out": str(out), "grid": [0, 0.5, 0.7, 0.9], "max_steps": 8, "eval_every": 4, "batch_size": 4,
              "seq_len": 32, "eval_samples": 16, "calib_samples": 4, "lr": 2e-3, "lam": 0.05,
              "deepspeed": FP32, **extra}
    recipe.setdefault("sandwich_steps", recipe["max_steps"])  # a sandwich long enough to kill and resume
    path.write_text(yaml.safe_dump(recipe))
    return path


def script_env(**env) -> dict:
    """What a user's shell has after activating the environment."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "COLUMNS": "240", **{k: str(v) for k, v in env.items()}}


def run_script(name: str, timeout=600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPTS / name], capture_output=True, text=True, timeout=timeout,
                          env=script_env(**env))


def assert_same_student(a: Path, b: Path) -> None:
    assert_same_weights(a / "student", b / "student")
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert ra.get("selected_ta") == rb.get("selected_ta") and ra["student"]["loss"] == rb["student"]["loss"]


def kill_chain(command: str, args: list, points: list[str], logs: Path) -> list[dict]:
    """`minidisc COMMAND ARGS` SIGKILLed at each point in turn (the first a fresh run, then --resume), then resumed
    to the end (tests/workers/kill_matrix_worker.py); per run, its exit status and what --out held after it."""
    command = [sys.executable, WORKERS / "kill_matrix_worker.py", logs, command, ",".join(points), *args]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "240"})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def minidisc_forked(commands: list[list], logs: Path) -> list[dict]:
    """Several `minidisc` command lines, each in a process forked after one import of the engine
    (tests/workers/cli_batch_worker.py); per command line, its exit status and stderr (stdout goes there too)."""
    command = [sys.executable, WORKERS / "cli_batch_worker.py", logs, json.dumps([list(map(str, c)) for c in commands])]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "240"})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


VOLATILE = {"wall_s", "phases", "stage_timings", "stage_memory", "config", "tokenise_s"}  # times, memory, options


def report_numbers(out: Path) -> dict:
    """report.json without what differs between two runs of the same computation: times, memory, options, --out."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
        return [strip(v) for v in value] if isinstance(value, list) else value

    return strip(json.loads((out / "report.json").read_text().replace(str(out), "OUT")))


def assert_same_weights(a: Path, b: Path) -> None:
    """Two model folders hold bit-identical tensors under the same names."""
    from safetensors.torch import load_file

    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys(), (a, b)
    for name in first:
        assert torch.equal(first[name], second[name]), (b, name)


def tracked_csv(out: Path, stage: str) -> dict[str, dict[int, float]]:
    """OUT/tracking/STAGE.csv as name -> step -> value, refusing a (step, name) logged twice."""
    import csv

    values = {}
    with open(out / "tracking" / f"{stage}.csv", newline="") as f:
        for row in csv.DictReader(f):
            by_step = values.setdefault(row["name"], {})
            assert int(row["step"]) not in by_step, f"{stage}: {row} logged twice"
            by_step[int(row["step"])] = float(row["value"])
    return values
