"""The torchrun entry point end to end on 2 gloo ranks: metrics, checkpoint and resume, and
training through TorchRec's TrainPipelineSparseDist."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

SMALL = ["--max-seq-len", "100", "--batch-size", "32", "--eval-batches", "4", "--eval-every", "0",
         "--num-workers", "0"]


def train(out: Path, *args: str) -> Dict:
    cmd: List[str] = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node=2", "-m", "torchrec_longseq.train", *SMALL, "--out", str(out),
                      *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test auc=" in proc.stdout  # printed at the end, as the README says
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("model", ["eta", "sim-soft"])
def test_resume_reaches_the_same_result(tmp_path: Path, model: str) -> None:
    straight = train(tmp_path / "straight", "--model", model, "--steps", "12")
    half = train(tmp_path / "resumed", "--model", model, "--steps", "6", "--checkpoint-every", "6")
    resumed = train(tmp_path / "resumed", "--model", model, "--steps", "12", "--resume")
    for key in ("auc", "gauc", "logloss", "val_auc", "val_logloss"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6, abs=1e-7), key
    # the 6 steps after the checkpoint changed the model: equality above is not trivial
    assert half["logloss"] != pytest.approx(straight["logloss"], rel=1e-6, abs=1e-7)


def test_metrics_json_has_the_documented_fields(tmp_path: Path) -> None:
    result = train(tmp_path / "run", "--model", "sim-hard", "--steps", "3")
    for key in ("auc", "gauc", "logloss", "samples_per_sec", "model", "max_seq_len"):
        assert key in result
    assert result["model"] == "sim-hard" and result["max_seq_len"] == 100
    assert 0.0 <= result["auc"] <= 1.0 and result["logloss"] > 0 and result["samples_per_sec"] > 0


@pytest.mark.parametrize("model", ["eta", "avgpool"])
def test_pipeline_trains_the_same_model(tmp_path: Path, model: str) -> None:
    """``--pipeline`` (TrainPipelineSparseDist, with a validation in the middle: the pipeline is
    detached for it and attached again) reaches the metrics of the plain loop."""
    args = ["--model", model, "--steps", "8", "--eval-every", "4"]
    plain = train(tmp_path / "plain", *args)
    piped = train(tmp_path / "piped", *args, "--pipeline")
    for key in ("auc", "gauc", "logloss", "val_auc", "val_logloss"):
        assert piped[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-7), key
    [mid_plain], [mid_piped] = plain["validation_history"], piped["validation_history"]
    assert mid_piped["step"] == 4 and mid_piped["auc"] == pytest.approx(mid_plain["auc"], rel=1e-6)
    # the last 4 steps changed the model: equality above is not trivial
    assert mid_plain["logloss"] != pytest.approx(plain["val_logloss"], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("option, value, low", [("--k", "-1", 0), ("--twin-k", "-3", 0),
                                                ("--heads", "0", 1), ("--short-window", "-5", 0),
                                                ("--batch-size", "0", 1)])
def test_cli_rejects_out_of_range_options(option: str, value: str, low: int, capsys) -> None:
    from torchrec_longseq.train import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--model", "eta", option, value])
    assert f"argument {option}: must be >= {low}, got {value}" in capsys.readouterr().err
    assert parse_args(["--model", "eta", option, str(low)])  # the bound itself is accepted


def test_own_model_example_trains_on_two_ranks() -> None:
    """``examples/own_model.py`` (the README's own-model snippet) runs with torchrun on 2 ranks
    and prints its test AUC."""
    example = Path(__file__).resolve().parents[1] / "examples" / "own_model.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(example), "--steps", "4", "--batch-size", "32", "--eval-batches", "2",
           "--max-seq-len", "100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "own model (ETA over clicks, SIM hard over purchases): test auc=" in proc.stdout


@pytest.fixture(scope="module")
def taobao_store(tmp_path_factory) -> Path:
    """A store prepared from a made-up log in the Taobao UserBehavior layout, as
    ``examples/taobao_user_behavior.py --demo`` writes it (two sequences: clicks and buys)."""
    import taobao_user_behavior
    out = tmp_path_factory.mktemp("taobao") / "store"
    taobao_user_behavior.main(["--demo", "20000", "--out", str(out), "--max-seq-len", "100",
                               "--num-shards", "3"])
    return out


@pytest.mark.parametrize("model", ["avgpool", "din", "din-full", "sim-hard", "sim-soft", "eta",
                                   "sdim", "twin"])
def test_every_model_trains_from_a_prepared_store(tmp_path: Path, taobao_store: Path,
                                                  model: str) -> None:
    """``--data DIR`` with ``--config`` (the example's YAML, its flags overridden): both of the
    store's sequences through ``model``, 2 ranks, evaluated; the resolved options are written
    next to the metrics."""
    import yaml
    config = Path(__file__).resolve().parents[1] / "examples" / "taobao.yaml"
    result = train(tmp_path / "run", "--config", str(config), "--data", str(taobao_store),
                   "--model", model, "--sequence-model", f"clicks={model}",
                   "--sequence-model", f"buys={model}", "--steps", "3")
    assert result["data"] == str(taobao_store) and result["max_seq_len"] == 100
    assert 0.0 <= result["auc"] <= 1.0 and result["logloss"] > 0
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["model"] == model and resolved["steps"] == 3  # the flags won
    assert resolved["sequence_model"] == [f"clicks={model}", f"buys={model}"]
    assert resolved["embedding_dim"] == 16 and resolved["k"] == 50  # from the file


def test_a_config_file_with_an_unknown_option_is_named(tmp_path: Path) -> None:
    from torchrec_longseq.train import parse_args
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: eta\nno_such_option: 3\n")
    with pytest.raises(SystemExit, match="unknown option 'no_such_option'"):
        parse_args(["--config", str(bad)])
    good = tmp_path / "good.yaml"
    good.write_text("model: eta\nk: 7\npipeline: true\n")
    args = parse_args(["--config", str(good), "--k", "9"])
    assert (args.model, args.k, args.pipeline) == ("eta", 9, True)


def test_console_is_quiet_and_resume_without_checkpoint_is_one_line(tmp_path: Path) -> None:
    """A run prints the project's own lines, no third-party warning (the known harmless ones are
    avoided at their cause or filtered by message) and no progress bar in a log; ``--resume``
    without a checkpoint says so in one line, not a traceback per rank."""
    import re
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "torchrec_longseq.train", *SMALL, "--model", "eta", "--steps", "3",
           "--eval-every", "2", "--out", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    noisy = [l for l in lines if re.search(r"warn|^\[rank\d\]:W|^W\d{4} |it/s", l, re.I)]
    assert not noisy, noisy
    assert any(l.startswith("step 2 validation auc=") for l in lines)
    assert any(l.startswith("test auc=") for l in lines)
    proc = subprocess.run(cmd[:-2] + ["--out", str(tmp_path / "none"), "--resume"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    ours = [l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith("--resume")]
    assert ours == [f"--resume: no checkpoint in {tmp_path / 'none' / 'checkpoint'} (save one "
                    f"with --checkpoint-every N)"]
    assert "FileNotFoundError" not in proc.stderr


def test_early_stop_keeps_the_best_validated_model(tmp_path: Path) -> None:
    """``--early-stop 2``: training stops at the first validation that is the second in a row
    without a better AUC than the best before it (recomputed here from the validation history),
    and the model it tests is the best one: validating it again gives the best AUC exactly. The
    console stays quiet (the checkpoint's ShardedTensor notice is filtered)."""
    every, patience = 2, 2
    result = train(tmp_path / "run", "--model", "eta", "--steps", "40", "--eval-every",
                   str(every), "--early-stop", str(patience))
    history = [(h["step"], h["auc"]) for h in result["validation_history"]]
    best_auc, best_step, stop = float("-inf"), None, None
    for step, auc in history:
        if auc > best_auc:
            best_auc, best_step = auc, step
        elif step - best_step >= patience * every:
            stop = step
            break
    # the data and the model are seeded: on this setup the AUC falls after step 2
    assert stop is not None and stop < 40, history
    assert result["early_stopped"] is True
    assert (result["stopped_step"], result["best_step"]) == (stop, best_step)
    assert history[-1][0] == stop  # no validation after the stop
    assert result["val_auc"] == pytest.approx(best_auc, rel=1e-6, abs=1e-7)
    assert json.loads((tmp_path / "run" / "best.json").read_text())["step"] == best_step


def test_early_stop_needs_validation(capsys) -> None:
    from torchrec_longseq.train import main

    with pytest.raises(SystemExit, match="--early-stop needs --eval-every"):
        main(["--early-stop", "3", "--eval-every", "0"])


def test_cooccurrence_pretraining_moves_only_the_tables() -> None:
    """``pretrain_tables``: steps of the co-occurrence losses alone change the looked-up rows
    of the tables and no dense parameter (they get no gradient); the loss is the model's
    ``sequence_arch.losses``, so pretraining without a weight is refused before training, and
    so is a pretraining rate without pretraining steps."""
    import torch

    import helpers
    from torchrec_longseq.models.longseq_ctr import LongSeqCTRTrain
    from torchrec_longseq.train import main, pretrain_tables

    ctr = helpers.build_small_model("eta", cooccurrence=1.0)
    model = LongSeqCTRTrain(ctr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.05)
    pretrain_tables(model, optimizer, ctr, iter([helpers.make_batch(i) for i in range(3)]), 3,
                    torch.device("cpu"), rank=1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("embedding_collection" in n for n in changed), changed
    # at a rate of 0 for the pretraining nothing moves, and the rate is the optimizer's again
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    pretrain_tables(model, optimizer, ctr, iter([helpers.make_batch(i) for i in range(2)]), 2,
                    torch.device("cpu"), rank=1, tables=optimizer, lr=0.0)
    assert all(torch.equal(p, moved[n]) for n, p in model.named_parameters())
    assert [g["lr"] for g in optimizer.param_groups] == [0.05]
    with pytest.raises(SystemExit, match="--cooccurrence W > 0"):
        main(["--cooccurrence-pretrain", "5"])
    with pytest.raises(SystemExit, match="give it N > 0 steps"):
        main(["--cooccurrence", "1", "--pretrain-sparse-lr", "0.1"])


def test_cooccurrence_pretraining_runs_on_two_ranks(tmp_path: Path) -> None:
    """``--cooccurrence-pretrain 3`` with the ESU's similarity term: the pretrained tables give
    another model than the same run without pretraining, and ``--pretrain-sparse-lr`` sets
    the fused optimizer's rate meanwhile (restoring it after: the unit test above)."""
    args = ["--model", "eta", "--steps", "2", "--cooccurrence", "1", "--esu-similarity", "item"]
    plain = train(tmp_path / "plain", *args)
    pretrained = train(tmp_path / "pretrained", *args, "--cooccurrence-pretrain", "3")
    assert pretrained["logloss"] != pytest.approx(plain["logloss"], rel=1e-6, abs=1e-7)
    # the pretraining's rate reaches TorchRec's fused optimizer: --sparse-lr's own rate gives
    # the same model, another rate another one
    same = train(tmp_path / "same", *args, "--cooccurrence-pretrain", "3",
                 "--pretrain-sparse-lr", "0.05")
    faster = train(tmp_path / "faster", *args, "--cooccurrence-pretrain", "3",
                   "--pretrain-sparse-lr", "0.5")
    for key in ("auc", "logloss", "val_auc", "val_logloss"):
        assert same[key] == pytest.approx(pretrained[key], rel=1e-6, abs=1e-7), key
    assert faster["logloss"] != pytest.approx(pretrained["logloss"], rel=1e-6, abs=1e-7)
