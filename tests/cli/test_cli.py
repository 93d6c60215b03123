"""The `minidisc` command: prune and export end to end, and one-line errors (exit 2) on bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, SCRIPTS, run_python, save_teacher

from engine.cli.main import main


@pytest.fixture(scope="module")
def teacher(tokenizer_dir, tmp_path_factory):
    return save_teacher("llama_gqa", tmp_path_factory.mktemp("cli") / "teacher", tokenizer_dir)


@pytest.mark.slow
def test_prune_and_export_through_the_console_command(teacher, corpus, tmp_path):
    minidisc = Path(sys.executable).parent / "minidisc"
    pruned, exported = tmp_path / "pruned", tmp_path / "student"
    result = subprocess.run([minidisc, "prune", "--teacher", teacher, "--data", corpus["train"], "--out", pruned,
                             "--sparsities", "0", "0.5", "0.9", "--calib-samples", "3", "--calib-seq-len", "16"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    plan = json.loads((pruned / "pruning.json").read_text())
    assert [c["sparsity"] for c in plan["candidates"]] == [0.0, 0.5, 0.9]
    assert plan["calibration"]["samples"] == 3 and plan["calibration"]["seq_len"] == 16
    for row in plan["candidates"]:  # the printed table shows every candidate's parameter count
        assert f"{row['parameters']:,}" in result.stdout
    assert len(plan["importance"]["attention"]) == 3 and len(plan["importance"]["ffn"][0]) == 37
    scoring = plan["memory"]["scoring"]  # the scoring's peak, recorded where it was scored (here a CPU)
    assert scoring["kind"] == "cpu resident" and scoring["peak_mb"] >= scoring["live_mb"] > 0
    result = subprocess.run([minidisc, "export", "--model", pruned, "--sparsity", "0.9", "--out", exported],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((exported / "minidisc_export.json").read_text())
    assert summary["parameters"] == plan["candidates"][2]["parameters"]
    assert summary["attention_units"] == plan["candidates"][2]["attention_units"]


def test_help_explains_every_option(capsys):
    import argparse

    from engine.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"compress", "prune", "export", "report", "plan"} <= set(commands)
    for name, command in commands.items():
        for action in command._actions:
            assert action.help and len(action.help) > 10, f"{name} {action.option_strings} has no help"
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        shown = capsys.readouterr().out
        assert all(a.option_strings[0] in shown for a in command._actions if a.option_strings)


def test_version_and_log_level_after_the_command(capsys):
    from importlib.metadata import version

    from engine.cli.main import build_parser

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"minidisc {version('minidisc')}"
    parser = build_parser()
    assert parser.parse_args(["plan", "llama-2-7b", "--gpu-memory", "80"]).log_level == "INFO"
    assert parser.parse_args(["--log-level", "ERROR", "plan", "llama-2-7b", "--gpu-memory", "80"]).log_level == "ERROR"
    assert parser.parse_args(["plan", "llama-2-7b", "--gpu-memory", "80", "--log-level", "DEBUG"]).log_level == "DEBUG"
    assert parser.parse_args(["--log-level", "ERROR", "export", "--model", "m", "--sparsity", "0.5", "--out", "o",
                              "--log-level", "WARNING"]).log_level == "WARNING"  # the later one wins


def _error(capsys, argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("minidisc: error: ")
    return err[-1]


def test_bad_inputs_get_one_line_errors(teacher, corpus, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    prune = ["prune", "--teacher", teacher, "--data", corpus["train"], "--out", out, "--calib-samples", "2",
             "--seq-len", "16"]
    assert "does not exist" in _error(capsys, ["prune", "--teacher", tmp_path / "nope", "--data", corpus["train"],
                                               "--out", out])
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((teacher / "config.json").read_text())
    assert "no tokenizer in" in _error(capsys, ["prune", "--teacher", no_tokenizer, "--data", corpus["train"],
                                                "--out", out])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "is empty" in _error(capsys, prune[:4] + [empty] + prune[5:])
    assert "no 'body' field" in _error(capsys, prune[:4] + [corpus["jsonl"]] + prune[5:] + ["--text-field", "body"])
    xml = tmp_path / "data.xml"
    xml.write_text("<text>hello</text>")
    assert "unsupported extension '.xml'" in _error(capsys, prune[:4] + [xml] + prune[5:])
    too_long = prune[:-2] + ["--calib-seq-len", "4096"]
    assert "--calib-seq-len 4096 exceeds the model's max_position_embeddings" in _error(capsys, too_long)
    short = tmp_path / "short.txt"
    short.write_text("two words")
    assert "fewer than 16 tokens" in _error(capsys, prune[:4] + [short] + prune[5:])
    assert "outside [0, 1)" in _error(capsys, prune + ["--sparsities", "0.5", "1.5"])
    assert "max_position_embeddings" in _error(capsys, prune[:-1] + ["100000"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "not written by minidisc" in _error(capsys, prune[:6] + [foreign] + prune[7:])
    assert (foreign / "notes.txt").read_text() == "mine"

    assert main([str(a) for a in prune]) == 0  # a valid run, then export errors against it
    capsys.readouterr()
    export = ["export", "--model", out, "--out", tmp_path / "student", "--sparsity"]
    assert "outside [0, 1)" in _error(capsys, export + ["1.2"])
    assert "not on the pruning grid" in _error(capsys, export + ["0.33"])
    assert "no pruning.json" in _error(capsys, ["export", "--model", teacher, "--sparsity", "0.5", "--out", out])
    assert not (tmp_path / "student").exists()  # nothing half-written
    assert "--dry-run checks a run against its teacher" in _error(capsys, ["compress", "--dry-run"])  # no pretraining


def test_prune_refuses_a_calibration_batch_the_machine_cannot_hold(tokenizer_dir, corpus, tmp_path, capsys):
    """Before the teacher is loaded: a batch whose fp32 logits alone exceed this host's memory is refused in one
    line that names a calibration shape which fits (checked with the same arithmetic), and nothing is written."""
    import re

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from engine.cli.memory_plan.pruning import check_pruning_fits

    teacher = tmp_path / "long-context"  # a real checkpoint: tiny layers, 32k vocabulary, 4M positions
    config = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=1 << 22)
    AutoModelForCausalLM.from_config(config).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(teacher)
    out = tmp_path / "out"
    message = _error(capsys, ["prune", "--teacher", teacher, "--data", corpus["train"], "--out", out,
                              "--calib-seq-len", 1 << 21, "--calib-batch-size", 4])
    assert "GiB of this host's memory for 4 x 2097152 calibration tokens" in message, message
    tokens = int(re.search(r"--calib-batch-size 1 --calib-seq-len (\d+)$", message).group(1))
    check_pruning_fits(config, 1, tokens, "cpu", 1, 1, 4)  # what it names fits
    assert not out.exists()


def test_unsupported_family_names_the_supported_ones(tmp_path, corpus, capsys):
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(gpt2)
    message = _error(capsys, ["prune", "--teacher", gpt2, "--data", corpus["train"], "--out", tmp_path / "o"])
    assert "unsupported model family 'gpt2'" in message and "LlamaForCausalLM" in message and "OPT" in message


def test_rerun_replaces_our_own_output(teacher, corpus, tmp_path, capsys):
    argv = ["prune", "--teacher", teacher, "--data", corpus["jsonl"], "--out", tmp_path / "p", "--calib-samples",
            "2", "--seq-len", "16", "--sparsities", "0", "0.5"]
    assert main([str(a) for a in argv]) == 0
    argv[-2:] = ["0.2", "0.6"]
    assert main([str(a) for a in argv]) == 0
    plan = json.loads((tmp_path / "p" / "pruning.json").read_text())
    assert [c["sparsity"] for c in plan["candidates"]] == [0.2, 0.6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no scratch directories left behind


@pytest.mark.multiprocess
@pytest.mark.slow
def test_single_node_launch_script(teacher, corpus, tmp_path):
    script = SCRIPTS / "prune_single_node.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    missing = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "set TEACHER" in missing.stderr
    env.update(TEACHER=str(teacher), DATA=str(corpus["train"]), OUT=str(tmp_path / "p"), CALIB_SAMPLES="2",
               SEQ_LEN="16")
    done = subprocess.run(["bash", script, "--sparsities", "0", "0.5"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert [c["sparsity"] for c in json.loads((tmp_path / "p" / "pruning.json").read_text())["candidates"]] == [0, 0.5]


def test_the_docs_document_every_option():
    """The configuration reference (docs/options.md) covers every option of the run commands."""
    from dataclasses import fields

    from engine.config import RunConfig

    text = (REPO / "docs" / "options.md").read_text()
    missing = [f.name for f in fields(RunConfig) if f"`--{f.name.replace('_', '-')}` (`{f.name}`)" not in text]
    assert not missing, f"docs/options.md lacks {missing}"


def test_help_and_import_engine_do_not_load_torch():
    """`minidisc --help` answers at once: neither it nor `import engine` loads torch, transformers or DeepSpeed."""
    heavy = "print('loaded:', sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))"

    def loaded(result):  # (DeepSpeed logs its accelerator to stdout when imported)
        return [line for line in result.stdout.splitlines() if line.startswith("loaded:")]

    help_ = run_python(f"import sys\nfrom engine.cli.main import main\ntry:\n    main(['compress', '--help'])\n"
                       f"except SystemExit:\n    pass\n{heavy}")
    assert help_.returncode == 0 and loaded(help_) == ["loaded: []"], help_.stderr[-2000:]
    imported = run_python(f"import sys\nimport engine\nengine.__version__\n{heavy}\nengine.compress\n{heavy}")
    before, after = loaded(imported)
    assert before == "loaded: []" and "'torch'" in after, imported.stderr[-2000:]  # the API still loads on first use


def test_the_option_table_is_runconfigs():
    """One RunConfig field = one flag = one recipe key = one docs/options.md row, with the same help."""
    from engine.cli.options_table import OPTIONS_PAGE, with_table

    text = OPTIONS_PAGE.read_text()
    assert with_table(text) == text, "docs/options.md's option table is out of date: run `make docs-options`"
