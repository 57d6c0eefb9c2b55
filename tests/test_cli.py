"""``python -m pykernels compress`` and ``demo``: a user's mistake is one line on stderr and
exit status 2, found before any model loads; a file that would run code when unpickled
is refused without ``--trust-pickle`` (issue 24, points 8, 9 and 12)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pykernels as pk
from pykernels.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "pykernels", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_a_bad_recipe_is_one_line_and_status_2_before_any_model_loads(tmp_path):
    # The folder holds no model at all: had the command loaded it first, it would
    # have complained about the folder, not the recipe.
    (tmp_path / "empty").mkdir()
    out = run_cli(
        "compress", "empty", "--recipe", "int9+prune", "--out", "m.safetensors", cwd=tmp_path
    )
    assert out.returncode == 2
    line = one_error_line(out.stderr)
    assert line.startswith("python -m pykernels compress: error: --recipe")
    assert "'int9'" in line and "valid steps" in line
    assert out.stdout == ""
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize(
    "args, says",
    [
        (["missing", "--recipe", "int8"], "no such file or directory: missing"),
        (["empty", "--recipe", "int8"], "no config.json"),
        (["weights.safetensors", "--recipe", "int8"], "Hugging Face model directory"),
        (["state.pt", "--recipe", "int8", "--input-shape", "2,8"], "not a model (a state_dict"),
        (["state.pt", "--recipe", "int8", "--input-shape", "2,x"], "--input-shape '2,x'"),
        (["state.pt", "--recipe", "int8", "--input-shape", "0,8"], "positive integers"),
        (["state.pt", "--recipe", "int8", "--example", "nope.pt"], "--example: no such file"),
        (["state.pt", "--recipe", "+int8"], "empty step"),
        (["state.pt", "--recipe", "sparse:1.5"], "--recipe"),
    ],
)
def test_user_errors_are_one_line_and_status_2(tmp_path, monkeypatch, capsys, args, says):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"")
    torch.save(torch.nn.Linear(8, 4).state_dict(), tmp_path / "state.pt")
    monkeypatch.chdir(tmp_path)
    assert main(["compress", *args, "--out", "m.safetensors", "--quiet"]) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert line.startswith("python -m pykernels compress: error: ")
    assert says in line
    assert not (tmp_path / "m.safetensors").exists()


def test_out_must_be_a_file_in_an_existing_folder(tmp_path, capsys):
    torch.save(torch.nn.Linear(8, 4).state_dict(), tmp_path / "state.pt")
    for out in (tmp_path / "no" / "m.safetensors", tmp_path):
        argv = ["compress", str(tmp_path / "state.pt"), "--recipe", "int8", "--out", str(out)]
        assert main(argv) == 2
        assert "--out" in one_error_line(capsys.readouterr().err)


class RunsCode:
    """Unpickling this calls os.mkdir(marker): a stand-in for any code a file may run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_without_the_flag(tmp_path, capsys):
    marker = tmp_path / "the-file-ran-code"
    evil = tmp_path / "model.pt"
    torch.save(RunsCode(str(marker)), evil)
    argv = ["compress", str(evil), "--recipe", "int8", "--input-shape", "2,8"]
    argv += ["--out", str(tmp_path / "m.safetensors"), "--quiet"]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--trust-pickle" in line and "run code" in line
    assert not marker.exists()
    # the same for an example input
    torch.save(torch.nn.Linear(8, 4).state_dict(), tmp_path / "state.pt")
    argv2 = ["compress", str(tmp_path / "state.pt"), "--recipe", "int8", "--example", str(evil)]
    assert main([*argv2, "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "--trust-pickle" in one_error_line(capsys.readouterr().err)
    assert not marker.exists()
    # with the flag the file is trusted: its code runs (the proof that the refusal
    # mattered), and what it yields is still checked
    assert main([*argv, "--trust-pickle"]) == 2
    assert marker.is_dir()
    assert "not a model" in one_error_line(capsys.readouterr().err)


@pytest.fixture
def tiny_bert_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(tmp_path / "tiny")
    batch = {
        "input_ids": torch.randint(0, 64, (2, 12)),
        "attention_mask": torch.ones(2, 12, dtype=torch.long),
    }
    torch.save(batch, tmp_path / "batch.pt")  # tensors only: loads with weights_only
    return tmp_path / "tiny", tmp_path / "batch.pt", batch


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=oct)
def test_a_model_directory_compresses_and_the_file_follows_the_umask(tiny_bert_dir, mask, capsys):
    import transformers

    folder, example, batch = tiny_bert_dir
    out = folder.parent / "tiny-int8.safetensors"
    old = os.umask(mask)
    try:
        argv = ["compress", str(folder), "--recipe", "int8", "--example", str(example)]
        assert main([*argv, "--out", str(out), "--quiet"]) == 0
    finally:
        os.umask(old)
    assert "CompressionReport: int8" in capsys.readouterr().out
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask
    fresh = transformers.BertModel.from_pretrained(folder).eval()
    want, _ = pk.compress(fresh, "int8", batch, progress=False)
    got = pk.load(out, transformers.BertModel.from_pretrained(folder).eval())
    with torch.no_grad():
        assert torch.equal(got(**batch).last_hidden_state, want(**batch).last_hidden_state)


def test_the_demo_checks_its_arguments_before_loading(capsys):
    assert main(["demo", "--recipe", "int8", "--recipe", "lowrank:x", "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("python -m pykernels demo: error: --recipe 'lowrank:x'")
    assert main(["demo", "--recipe", "int8", "--report", "sparse:0.5"]) == 2
    assert "--report 'sparse:0.5'" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("bad", ["0", "-3", "two"])
def test_counts_must_be_positive(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--reps", bad])
    assert e.value.code == 2
    assert "--reps" in capsys.readouterr().err
