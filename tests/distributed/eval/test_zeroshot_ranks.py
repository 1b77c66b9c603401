"""Zero-shot evaluation split over 4 real processes (gloo) gives one process's metrics exactly, on dataset sizes no
rank count divides (some ranks get no batch); `bigmodel eval --nproc 2` (torchrun, `python -m bigmodel.eval`) writes the
same result JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bigmodel.cli.main import main
from bigmodel.eval import evaluate_zeroshot
from tests.distributed.launch import run_worker
from tests.support.cli import bigmodel
from tests.unit.eval.test_datasets import digit_images, png

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("zeroshot_worker.py")


def write_datasets(root: Path) -> tuple[Path, Path]:
    """37 digit images in class folders (5 batches of 8: ranks get 2, 1 or no batch; 10 classes x 2 templates make
    20 prompts, 3 batches), and the first 13 with 3 captions each (39 captions) for retrieval."""
    samples = digit_images(4)[:37]
    classes, retrieval = root / "classes", root / "retrieval"
    captions = {}
    for n, (image, digit) in enumerate(samples):
        (classes / str(digit)).mkdir(parents=True, exist_ok=True)
        (classes / str(digit) / f"{n:02d}.png").write_bytes(png(image))
        if n < 13:
            retrieval.mkdir(exist_ok=True)
            (retrieval / f"{n:02d}.png").write_bytes(png(image))
            captions[f"{n:02d}.png"] = [f"a {digit}", f"a large white {digit}", f"digit {digit} small"]
    (retrieval / "captions.json").write_text(json.dumps(captions))
    (classes / "zeroshot_classification_templates.txt").write_text("a {c}\na large white {c}\n")
    return classes, retrieval


@pytest.mark.slow
def test_metrics_equal_one_process_for_4_and_2_ranks(tmp_path, capsys):
    run = tmp_path / "run"
    trained = subprocess.run(
        [sys.executable, "-m", "bigmodel.cli.main", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
         "--train.steps=1", "--train.warmup_steps=0", "--log.progress=false", f"--train.out_dir={run}"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    classes, retrieval = write_datasets(tmp_path)
    check_bad_templates_are_one_line(run, classes, tmp_path, capsys)  # here, where a checkpoint exists
    one = {
        task: evaluate_zeroshot(run, task, str(data), batch_size=8)["metrics"]
        for task, data in (("zeroshot_classification", classes), ("zeroshot_retrieval", retrieval))
    }
    every = run_worker(4, str(WORKER), tmp_path / "x4.json", str(run), str(classes), str(retrieval))
    # Exact: every rank embeds the same batches as one process and computes the metrics from the same gathered
    # embeddings.
    assert every == [one] * 4

    # `bigmodel eval --nproc 2` starts `torchrun --nproc-per-node=2 -m bigmodel.eval` (bigmodel/eval/__main__.py).
    out = tmp_path / "result.json"
    args = (str(run), "--task", "zeroshot_classification", "--dataset", str(classes), "--batch-size", "8")
    launched = bigmodel("eval", *args, "--out", str(out), "--nproc", "2")
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("acc1") == 1  # one rank prints
    result = json.loads(out.read_text())
    assert result["metrics"] == one["zeroshot_classification"]  # exact, as above
    assert {k: result[k] for k in ("dataset", "task")} == {"dataset": str(classes), "task": "zeroshot_classification"}


def check_bad_templates_are_one_line(run: Path, classes: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {c}\na photo\n")
    assert main(["eval", str(run), "--task", "zeroshot_classification", "--dataset", str(classes), "--templates",
                 str(bad)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err == f"error: {bad} line 2 ('a photo') has no {{c}} for the class name\n", err
