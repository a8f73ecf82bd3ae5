"""Loaders and scoring for the zeda lm-evaluation-harness tasks (local files only, no downloads).

The data files in data/ are the embedded default's held-out sets, written by
``python -m zeda_megatron.harness --write-data lm_eval_tasks/data``: 500 arithmetic problems
(``corpus.arithmetic_problems(500, seed=0)``) and 48 held-out stdlib code chunks (files no model here
trained on).
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _jsonl(name):
    with open(os.path.join(HERE, "data", name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(rows):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def arith(**kwargs):
    return _dataset(_jsonl("arith_heldout.jsonl"))


def code(**kwargs):
    return _dataset(_jsonl("code_heldout.jsonl"))


def arith_exact_match(doc, results):
    """The project's own metric: the first generated line, stripped, equals the answer."""
    out = results[0].split("\n")[0].strip()
    return {"exact_match": float(out == doc["answer"])}
