"""The solopo-data command line: --help, the offline two-command demo, errors, imports."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys

import pytest

from solopo_kernels.data.cli import build_parser, main

from .conftest import read_jsonl, write_jsonl


def test_help_explains_every_option(capsys):
    parser = build_parser()
    [commands] = [
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    ]
    assert set(commands.choices) == {"build-contexts", "sample-pairs", "evaluate"}
    for name, subparser in commands.choices.items():
        options = [
            action
            for action in subparser._actions
            if action.option_strings and action.dest != "help"
        ]
        assert len(options) >= 10
        for action in options:
            assert action.help and len(action.help) >= 10, (name, action.dest)
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert all(action.option_strings[-1] in text for action in options)


def test_offline_demo_two_commands(tmp_path, sample_path, capsys):
    import datasets

    contexts, pairs = tmp_path / "contexts.jsonl", tmp_path / "pairs.jsonl"
    build = ["build-contexts", "--input", str(sample_path), "--output", str(contexts)]
    build += ["--tokenizer", "tiny", "--target-lengths", "512,1k", "--limit", "4", "--quiet"]
    assert main(build) == 0
    out = capsys.readouterr().out
    assert "wrote 4 rows" in out and "rho mean" in out
    sample = ["sample-pairs", "--input", str(contexts), "--output", str(pairs), "--model", "tiny"]
    sample += ["--tokenizer", "tiny", "--num-samples", "2", "--max-new-tokens", "4"]
    sample += ["--include-gold", "--keep-truncated", "--quiet"]
    assert main(sample) == 0
    assert "pairs written in total" in capsys.readouterr().out
    dataset = datasets.load_dataset("json", data_files=str(pairs), split="train")
    assert len(dataset) == 4
    assert {"prompt", "long_prompt", "chosen", "rejected", "metadata"} <= set(dataset.column_names)
    assert all(
        len(row["long_prompt"][0]["content"]) > len(row["prompt"][0]["content"]) for row in dataset
    )

    # Same command again: everything is done, nothing is added.
    assert main(sample) == 0
    assert len(read_jsonl(pairs)) == 4
    # Other settings on the same output: refused with a clear message.
    assert main([*sample, "--temperature", "0.5"]) == 2
    assert "different settings (temperature)" in capsys.readouterr().err


def test_bad_input_exits_2_naming_the_example(tmp_path, capsys):
    row = {
        "id": "q7",
        "question": "Q?",
        "answer": "A",
        "paragraphs": [{"title": "t", "paragraph_text": "p", "is_supporting": False}],
    }
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    code = main(
        [
            "build-contexts",
            "--input",
            str(path),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--tokenizer",
            "tiny",
        ]
    )
    assert code == 2
    assert (
        "example 'q7': field 'paragraphs' has no paragraph with is_supporting"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "o.jsonl").exists()


def test_data_package_imports_no_torch_kernels_or_losses():
    code = (
        "import sys; before = set(sys.modules); "
        "import solopo_kernels.data, solopo_kernels.data.cli; "
        "new = set(sys.modules) - before; "
        "bad = sorted(m for m in new if m.split('.')[0] in ('torch', 'transformers', 'vllm') "
        "or m.startswith(('solopo_kernels.ops', 'solopo_kernels.losses'))); "
        "print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_demo_output_trains_with_the_solopo_trainer(tmp_path, sample_path):
    """The contract with the trainer: the two commands' output is a SoLoPOTrainer dataset."""
    pytest.importorskip("trl")
    import datasets

    from solopo_kernels.data.cli import tiny_tokenizer_for
    from solopo_kernels.integrations.trl import SoLoPOConfig, SoLoPOTrainer
    from solopo_kernels.tiny_models import tiny_llama

    contexts, pairs = tmp_path / "contexts.jsonl", tmp_path / "pairs.jsonl"
    common = ["--tokenizer", "tiny", "--limit", "4", "--quiet"]
    build = ["build-contexts", "--input", str(sample_path), "--output", str(contexts)]
    assert main([*build, "--target-lengths", "512,1k", *common]) == 0
    sample = ["sample-pairs", "--input", str(contexts), "--output", str(pairs), "--model", "tiny"]
    assert (
        main([*sample, "--num-samples", "2", "--max-new-tokens", "4", "--include-gold", *common])
        == 0
    )

    dataset = datasets.load_dataset("json", data_files=str(pairs), split="train")
    texts = [
        m["content"]
        for row in dataset
        for key in ("prompt", "long_prompt", "chosen", "rejected")
        for m in row[key]
    ]
    tokenizer = tiny_tokenizer_for(texts)
    args = SoLoPOConfig(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        per_device_train_batch_size=2,
        max_steps=1,
        logging_steps=1,
        solopo_loss_type="simpo",
        max_length=None,
        disable_tqdm=True,
    )
    trainer = SoLoPOTrainer(
        model=tiny_llama(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert math.isfinite(logged["loss"]) and "solo_ra/distance" in logged


def test_an_interrupted_or_failed_generation_says_the_run_resumes(capsys):
    """sample-pairs and evaluate: Ctrl-C exits 130 and a failed server 1, each saying that the
    finished batches are saved (both commands go through the same helper)."""
    from solopo_kernels.data import cli
    from solopo_kernels.data.backends import SamplingServerError

    def interrupted():
        raise KeyboardInterrupt

    def server_failed():
        raise SamplingServerError("the server went away")

    assert cli._run_resumable("evaluate", lambda: 7) == (7, None)
    assert cli._run_resumable("evaluate", interrupted) == (None, 130)
    assert "finished batches are saved" in capsys.readouterr().err
    assert cli._run_resumable("sample-pairs", server_failed) == (None, 1)
    err = capsys.readouterr().err
    assert "solopo-data sample-pairs: error: the server went away" in err
    assert "rerun the same command to resume" in err
