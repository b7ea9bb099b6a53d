"""Everyday use: installed commands, help texts, config lookup, the usage text of the chain submitter, progress lines."""
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scripts() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


# Run by the venv's Python from outside the checkout: every console script of the installed distribution
# resolves to a callable whose --help names the command (one process: one torch import for all of them).
ENTRY_POINTS_CHECK = """
import contextlib, importlib.metadata, io, json, os, sys
out = {}
for ep in importlib.metadata.distribution("rear_ds").entry_points:
    if ep.group != "console_scripts":
        continue
    sys.argv = [os.path.join(os.path.dirname(sys.executable), ep.name), "--help"]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            ep.load()()
        except SystemExit as e:
            code = e.code
    out[ep.name] = {"code": code, "usage": text.getvalue().splitlines()[0],
                    "script": os.path.isfile(sys.argv[0]), "module": sys.modules[ep.module].__file__}
print(json.dumps(out))
"""


@pytest.mark.timeout(600)
def test_installed_commands_work_outside_the_checkout(tmp_path):
    """`pip install -e .` into a throwaway venv (system packages visible, no download, no build isolation), then
    the installed commands from a folder outside the checkout, without PYTHONPATH."""
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")

    def run(*cmd):
        return subprocess.run([str(c) for c in cmd], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)

    res = run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv)
    assert res.returncode == 0, res.stderr
    py = venv / "bin" / "python"
    res = run(py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", ROOT)
    assert res.returncode == 0, res.stdout + res.stderr

    res = run(py, "-c", ENTRY_POINTS_CHECK)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)
    assert set(found) == set(scripts()) >= {"rear-tokenize", "rear-sample", "rear-evaluate", "rear-export",
                                            "rear-model-info", "rear-demo"}
    for name, r in found.items():
        assert r["code"] == 0 and r["usage"].startswith(f"usage: {name} ") and r["script"], (name, r)
        assert r["module"].startswith(os.path.join(ROOT, "rear_ds") + os.sep), (name, r)  # this checkout

    # A real run of an installed script: configs/ is found in the checkout the install points at.
    res = run(venv / "bin" / "rear-model-info", "configs/toy.yaml", "--json", "--world-size", "2")
    assert res.returncode == 0, res.stderr
    from rear_ds.config import load_config
    from rear_ds.model_info import model_info

    assert json.loads(res.stdout) == json.loads(json.dumps(model_info(load_config(os.path.join(
        ROOT, "configs", "toy.yaml")), 2)))


def help_of(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_keeps_usage_examples_and_shows_defaults(capsys):
    from rear_ds import evaluate, sample, train
    from rear_ds.config import Config
    from rear_ds.data import tokenize_job
    from rear_ds.evaluation import ref_stats

    texts = {name: help_of(main, ["--help"], capsys) for name, main in (
        ("train", train.parse_args), ("sample", sample.main), ("evaluate", evaluate.main),
        ("ref_stats", ref_stats.main), ("tokenize", tokenize_job.main))}
    for name, text in texts.items():  # a `\` + newline in the examples: the continuation survived
        assert re.search(r" \\\n +\S", text), f"{name}: usage example lost its line continuation:\n{text}"
    assert "(default: 50)" in texts["evaluate"] and "(default: 4)" in texts["tokenize"]
    assert "(default: None)" not in "".join(texts.values())
    t = texts["train"]
    for section in Config.__dataclass_fields__:
        assert re.search(rf"^  {section} +\w+Config ", t, re.M), f"section {section} not named in train --help"
    assert os.path.join(ROOT, "rear_ds", "config.py") in t
    assert re.search(r"exit codes:\n  0 +finished\n  75 +stopped by SIGTERM/SIGUSR1.*\n  1 +error", t)


def test_config_lookup_names_where_it_looked(tmp_path, monkeypatch):
    from rear_ds.config import ConfigError, find_config_file, load_config
    from rear_ds.training.ds_config import load_json

    monkeypatch.chdir(tmp_path)  # outside the checkout
    assert load_config("configs/toy.yaml").model.hidden_size == 128
    assert find_config_file("toy.yaml") == os.path.join(ROOT, "configs", "toy.yaml")
    assert load_json("zero2_bf16.json")["zero_optimization"]["stage"] == 2
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "toy.yaml").write_text("model:\n  hidden_size: 64\n  num_heads: 4\n")
    assert find_config_file("configs/toy.yaml") == "configs/toy.yaml"  # a file where the user is comes first
    with pytest.raises(ConfigError) as e:
        load_json("ds_configs/zero9.json")
    assert str(tmp_path / "ds_configs" / "zero9.json") in str(e.value)
    assert os.path.join(ROOT, "ds_configs", "zero9.json") in str(e.value) and "does not exist" in str(e.value)


def test_submit_chain_usage_parses_with_each_stage_tool():
    """Every stage's arguments in slurm/submit_chain.sh's usage text are accepted by the tool they go to."""
    from rear_ds import evaluate, sample, train
    from rear_ds.data import tokenize_job

    lines = open(os.path.join(ROOT, "slurm", "submit_chain.sh")).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "#   slurm/submit_chain.sh \\")
    usage = []
    for line in lines[start + 1:]:
        usage.append(line.lstrip("#").strip().rstrip("\\"))
        if not line.rstrip().endswith("\\"):
            break
    words = shlex.split(" ".join(usage))
    stages, stage = {}, None
    for w in words:
        if w.endswith(":") and w[:-1] in ("tokenize", "train", "sample", "evaluate"):
            stage = stages.setdefault(w[:-1], [])
        else:
            stage.append(w)
    assert set(stages) == {"tokenize", "train", "sample", "evaluate"}
    # What submit_chain.sh adds: train.out_dir, sample's --checkpoint, evaluate's --samples.
    tokenize_job.build_parser().parse_args(stages["tokenize"])
    args = train.parse_args(stages["train"] + ["train.out_dir=runs/x"])
    assert all("=" in o for o in args.overrides)
    sample.build_parser().parse_args(stages["sample"] + ["--checkpoint", "runs/x/checkpoints/latest"])
    evaluate.build_parser().parse_args(stages["evaluate"] + ["--samples", "runs/x/samples"])


def test_training_log_line_has_progress_and_eta(tmp_path, caplog):
    from rear_ds.config import load_config
    from rear_ds.training.metrics import RunLogger, format_duration

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["wandb.enabled=false", "train.max_steps=20"])
    caplog.set_level(logging.INFO, logger="rear_ds")
    resumed = RunLogger(str(tmp_path), cfg, True, {"start_step": 10})
    resumed.log_step({"step": 10, "loss": 2.5, "samples_per_s": 12.0, "mfu": None})  # nothing done yet here
    resumed.log_step({"step": 15, "loss": 2.25, "samples_per_s": 12.5, "mfu": 0.41})
    resumed.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert lines[0].startswith("step 10/20 | eta n/a | loss 2.5000") and "mfu n/a" in lines[0]
    assert re.match(r"step 15/20 \| eta \d+s \| loss 2\.2500 \|.* samples_per_s 12\.5 \|.* mfu 0\.410", lines[1])
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert recs[1]["eta_s"] is None and recs[2]["eta_s"] > 0
    assert [format_duration(s) for s in (42, 185, 3725)] == ["42s", "3m05s", "1h02m"]


def test_demo_echoes_training_progress_live(tmp_path, capsys):
    from rear_ds.demo import Runner

    line = "12:00:01 [rank 0] INFO step 3/9 | eta 1s | loss 2.0000 | ce 2.0 | samples_per_s 5.0 | mfu n/a"
    Runner(str(tmp_path)).run("t", [sys.executable, "-c", f"print({line!r}); print('other output')"])
    out = capsys.readouterr().out
    assert "    step 3/9 | eta 1s | loss 2.0000 | samples_per_s 5.0 | mfu n/a\n" in out
    assert not any(line.strip() == "other output" for line in out.splitlines())
    assert "other output" in (tmp_path / "logs" / "t.log").read_text()
