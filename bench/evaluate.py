"""Downstream evaluation throughput: ebb's in-process lm-eval `LM` on a checkpoint against
lm-eval's `hf` model on the same checkpoint's `to-hf` export (remote code), same tasks, CPU.

The checkpoint is the quickstart's model (configs/quickstart.yaml, 3.4M parameters; `--steps` of
training). Two local tasks are written from the embedded corpus (the Python standard library's
source), so nothing is downloaded: `bench_mc`, multiple choice (three lines of code, which of four
lines comes next), and `bench_ppl`, perplexity over whole chunks of source (loglikelihood_rolling,
several windows each). Both models run float32 with the same batch size and max length; each
task is timed `--rounds` times, the two alternating, and the table gives requests/s (lm-eval's
requests: one per choice, one per text) and ebb's over hf's. The scores must agree (to 1e-4,
printed). The export's own time is reported apart: ebb needs none.

    python bench/evaluate.py [--steps 2] [--docs 200] [--texts 40] [--batch-size 16] [--rounds 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pretrain.data.corpus import embedded_corpus  # noqa: E402

LOADER = '''import json
from pathlib import Path

import datasets


def load(name):
    rows = [json.loads(line) for line in (Path(__file__).parent / name).read_text().splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**kwargs):
    return load("mc.jsonl")


def perplexity(**kwargs):
    return load("ppl.jsonl")
'''
TASKS = {
    "bench_mc.yaml": """task: bench_mc
custom_dataset: !function data.multiple_choice
output_type: multiple_choice
test_split: test
doc_to_text: "{{context}}"
doc_to_target: "{{answer}}"
doc_to_choice: "{{choices}}"
target_delimiter: "\\n"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
    "bench_ppl.yaml": """task: bench_ppl
custom_dataset: !function data.perplexity
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""",
}


def write_tasks(folder: Path, docs: int, texts: int, seed: int = 0) -> None:
    """The two tasks' YAMLs, loader and data, from the embedded corpus."""
    rng = random.Random(seed)
    corpus = embedded_corpus(8_000_000)
    lines = [line for text in corpus for line in text.splitlines() if 8 < len(line.strip()) < 100]
    mc = []
    while len(mc) < docs:
        start = rng.randrange(len(lines) - 4)
        answer = lines[start + 3]
        choices = [answer, *rng.sample(lines, 3)]
        rng.shuffle(choices)
        mc.append({"context": "\n".join(lines[start:start + 3]), "choices": choices, "answer": choices.index(answer)})
    chunks = [text[:1500] for text in corpus if len(text) >= 1500]
    ppl = [{"text": chunk} for chunk in rng.sample(chunks, texts)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.py").write_text(LOADER)
    (folder / "mc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in mc))
    (folder / "ppl.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ppl))
    for name, text in TASKS.items():
        (folder / name).write_text(text)


def run(args: list[str], what: str) -> float:
    began = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{what} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - began


def timed(lm, task: str, manager) -> tuple[float, int, dict]:
    """Seconds, requests and results of one task on `lm`."""
    from lm_eval import simple_evaluate

    began = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0, log_samples=True)
    seconds = time.perf_counter() - began
    requests = sum(len(sample["arguments"]) for sample in results["samples"][task])
    return seconds, requests, results["results"][task]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="training steps of the quickstart model before it is scored")
    parser.add_argument("--docs", type=int, default=200, help="multiple-choice questions (4 requests each)")
    parser.add_argument("--texts", type=int, default=40, help="perplexity texts of 1500 bytes")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from pretrain.evaluate import evaluator

    root = Path(tempfile.mkdtemp(prefix="ebb-eval-bench-"))
    try:
        write_tasks(root / "tasks", args.docs, args.texts)
        run(["-m", "pretrain.train", "--config", "configs/quickstart.yaml", f"train.steps={args.steps}", f"train.run_dir={root / 'run'}",
             f"train.threads={args.threads}", "train.eval_interval=0", "logging.tensorboard=false", "logging.progress=false"], "training")
        export_s = run(["-m", "checkpoint.convert", "to-hf", "--checkpoint", str(root / "run"), "--output", str(root / "hf"), "--dtype", "fp32"], "to-hf")
        ebb = evaluator(root / "run", torch.device("cpu"), torch.float32, args.batch_size, None)
        hf = HFLM(pretrained=str(root / "hf"), trust_remote_code=True, dtype="float32", batch_size=args.batch_size,
                  max_length=ebb.max_length, device="cpu")
        manager = TaskManager(include_path=str(root / "tasks"), include_defaults=False)
        rows = {}
        for task in ("bench_mc", "bench_ppl"):
            times = {"ebb": [], "hf": []}
            for r in range(args.rounds):
                for name, lm in (("ebb", ebb), ("hf", hf)) if r % 2 == 0 else (("hf", hf), ("ebb", ebb)):
                    seconds, requests, scores = timed(lm, task, manager)
                    times[name].append(seconds)
                    rows.setdefault(task, {"requests": requests, "scores": {}})["scores"][name] = {
                        k: v for k, v in scores.items() if "," in k and isinstance(v, float)
                    }
            rows[task] |= {
                "ebb_requests_per_s": [rows[task]["requests"] / s for s in times["ebb"]],
                "hf_requests_per_s": [rows[task]["requests"] / s for s in times["hf"]],
                "ratio_per_round": [h / e for e, h in zip(times["ebb"], times["hf"])],
            }
        print(f"\nthe quickstart model (3.4M params, max_length {ebb.max_length}), batch {args.batch_size}, CPU, {args.threads} threads; "
              f"to-hf export (hf only): {export_s:.1f}s")
        print(f"{'task':10} {'requests':>9} {'ebb req/s':>10} {'hf req/s':>10} {'ebb / hf per round':>22}  scores (ebb | hf)")
        for task, row in rows.items():
            ratios = " ".join(f"{x:.2f}x" for x in row["ratio_per_round"])
            scores = ", ".join(f"{k} {row['scores']['ebb'][k]:.4f} | {v:.4f}" for k, v in row["scores"]["hf"].items())
            print(f"{task:10} {row['requests']:9d} {max(row['ebb_requests_per_s']):10.1f} {max(row['hf_requests_per_s']):10.1f} {ratios:>22}  {scores}")
            for key, value in row["scores"]["hf"].items():
                assert abs(row["scores"]["ebb"][key] - value) <= 1e-4 * max(1.0, abs(value)), (task, key)
        out = REPO / "bench" / "results" / "evaluate.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"batch_size": args.batch_size, "max_length": ebb.max_length, "threads": args.threads, "cpus": os.cpu_count(),
                                   "export_seconds": export_s, "tasks": rows}, indent=1) + "\n")
        print(f"\nwrote {out.relative_to(REPO)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
