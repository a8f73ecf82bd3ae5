"""Text every machine with Python has: the standard library's own source, plus generated arithmetic.

* Code: ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` excluded), listed in
  sorted relative-path order, shuffled with ``random.Random(seed)`` and split **by file** into a
  training part and a held-out part (the held-out files are never seen by the teacher or the student).
  The split depends only on the seed and the Python version's stdlib (same machine image -> same text).
* Arithmetic: ``"a op b = c"`` lines, ops ``+ - *``: ``+``/``-`` on 0..99 (``-`` with a >= b, so no
  negative results), ``*`` on 0..99 x 0..9. Deterministic for a seed; evaluation problems come from a
  different random stream than training problems (overlap is possible but not arranged).

Public functions: :func:`stdlib_files`, :func:`split_files`, :func:`training_texts`,
:func:`heldout_code`, :func:`heldout_code_records`, :func:`arithmetic_lines`,
:func:`arithmetic_problems`, :func:`distill_prompts`, :func:`write_prompts`, :func:`write_stage1_data`.
"""

from __future__ import annotations

import io
import json
import os
import random
import sysconfig
import tokenize as pytokenize

ARITH_OPS = ("+", "-", "*")


# ---- stdlib code --------------------------------------------------------------------------------------
def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(max_bytes: int = 200_000) -> list[str]:
    """Sorted relative paths of the stdlib's ``*.py`` files (no site-packages, no files over max_bytes)."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for fn in filenames:
            if fn.endswith(".py"):
                full = os.path.join(dirpath, fn)
                try:
                    if os.path.getsize(full) <= max_bytes:
                        out.append(os.path.relpath(full, root))
                except OSError:
                    pass
    return sorted(out)


def _read(rel: str) -> str:
    try:
        with open(os.path.join(stdlib_root(), rel), encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return ""


def split_files(seed: int = 0, heldout_frac: float = 0.1) -> tuple[list[str], list[str]]:
    """(train_files, heldout_files): a seeded shuffle of :func:`stdlib_files`, split by file."""
    files = stdlib_files()
    random.Random(f"split-{seed}").shuffle(files)
    n_held = max(1, int(len(files) * heldout_frac))
    return files[n_held:], files[:n_held]


def _take_code(files: list[str], max_chars: int) -> list[tuple[str, str]]:
    docs, total = [], 0
    for rel in files:
        if total >= max_chars:
            break
        text = _read(rel)
        if not text.strip():
            continue
        text = text[: max_chars - total]
        docs.append((rel, text))
        total += len(text)
    return docs


# ---- arithmetic -------------------------------------------------------------------------------------
def _problem(rng: random.Random, ops=ARITH_OPS) -> tuple[str, str]:
    op = rng.choice(ops)
    if op == "*":
        a, b = rng.randint(0, 99), rng.randint(0, 9)
        if rng.random() < 0.5:
            a, b = b, a
        c = a * b
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if op == "-":
            a, b = max(a, b), min(a, b)
            c = a - b
        else:
            c = a + b
    return f"{a} {op} {b} =", str(c)


def arithmetic_lines(n: int, seed: int = 0) -> list[str]:
    """``n`` training lines ``"a op b = c"`` (no trailing newline)."""
    rng = random.Random(f"arith-train-{seed}")
    return [f"{p} {c}" for p, c in (_problem(rng) for _ in range(n))]


def arithmetic_problems(n: int = 200, seed: int = 0, ops=("+", "-")) -> list[dict]:
    """Evaluation problems ``{"prompt": "a op b =", "answer": "c", "op": op}`` (default: 2-operand add/sub)."""
    rng = random.Random(f"arith-eval-{seed}")
    out = []
    for _ in range(n):
        p, c = _problem(rng, ops)
        out.append({"prompt": p, "answer": c, "op": p.split()[1]})
    return out


# ---- training text ---------------------------------------------------------------------------------
def training_texts(seed: int = 0, code_chars: int = 1_500_000, arith_lines: int = 60_000,
                   arith_block: int = 16) -> list[str]:
    """Documents for teacher / tokenizer training: stdlib training files (whole, up to ``code_chars``
    characters in all) and blocks of ``arith_block`` arithmetic lines, shuffled together (seeded)."""
    train_files, _ = split_files(seed)
    docs = [t for _, t in _take_code(train_files, code_chars)]
    lines = arithmetic_lines(arith_lines, seed)
    docs += ["\n".join(lines[i: i + arith_block]) + "\n" for i in range(0, len(lines), arith_block)]
    random.Random(f"docs-{seed}").shuffle(docs)
    return docs


# ---- held-out code ---------------------------------------------------------------------------------
def _prose_mask(text: str) -> list[bool]:
    """Per character: True inside a comment or a string literal (docstrings), by Python's tokenizer."""
    mask = [False] * len(text)
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    try:
        for tok in pytokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (pytokenize.COMMENT, pytokenize.STRING):
                a = line_starts[tok.start[0] - 1] + tok.start[1]
                b = line_starts[tok.end[0] - 1] + tok.end[1]
                for i in range(a, min(b, len(text))):
                    mask[i] = True
    except (pytokenize.TokenError, IndentationError, SyntaxError, IndexError):
        pass
    return mask


def heldout_code_records(seed: int = 0, n_chunks: int = 64, chunk_chars: int = 600) -> list[dict]:
    """Held-out code chunks ``{"text", "prose_mask", "file"}`` (``prose_mask``: per char, True inside
    comments/strings). Up to 2 chunks per held-out file, from the start of the file and its middle."""
    _, held = split_files(seed)
    out = []
    for rel in held:
        if len(out) >= n_chunks:
            break
        text = _read(rel)
        if len(text) < chunk_chars:
            continue
        mask = _prose_mask(text)
        starts = [0] if len(text) < 3 * chunk_chars else [0, len(text) // 2]
        for s in starts:
            if s:  # start the middle chunk at a line start
                s = text.find("\n", s) + 1
                if s <= 0 or s + chunk_chars > len(text):
                    continue
            out.append({"text": text[s: s + chunk_chars], "prose_mask": mask[s: s + chunk_chars], "file": rel})
            if len(out) >= n_chunks:
                break
    return out


def heldout_code(seed: int = 0, n_chunks: int = 64, chunk_chars: int = 600) -> list[str]:
    """Held-out code text chunks (files the teacher never trained on)."""
    return [r["text"] for r in heldout_code_records(seed, n_chunks, chunk_chars)]


# ---- prompts and stage-1 data ---------------------------------------------------------------------
def distill_prompts(n: int = 256, seed: int = 0, arith_frac: float = 0.5, prefix_chars: int = 160,
                    split_seed: int = 0) -> list[str]:
    """Prompts for distillation: code prefixes (from the *training* files of the teacher's split
    ``split_seed``: the held-out files stay unseen) and arithmetic prompts ``"a op b ="``, interleaved
    (sampled with ``seed``)."""
    rng = random.Random(f"prompts-{seed}")
    train_files, _ = split_files(split_seed)
    n_arith = int(round(n * arith_frac))
    arng = random.Random(f"arith-prompt-{seed}")
    prompts = [_problem(arng)[0] for _ in range(n_arith)]
    files = list(train_files)
    rng.shuffle(files)
    i = 0
    while len(prompts) < n and i < len(files):
        text = _read(files[i])
        i += 1
        if len(text) < 4 * prefix_chars:
            continue
        s = text.find("\n", rng.randrange(0, len(text) - 2 * prefix_chars)) + 1
        prompt = text[s: s + prefix_chars]
        cut = prompt.rfind("\n")  # end at a line end: the continuation starts on a new line
        if cut > prefix_chars // 3:
            prompt = prompt[: cut + 1]
        if prompt.strip():
            prompts.append(prompt)
    rng.shuffle(prompts)
    return prompts


def write_prompts(path: str, n: int = 256, seed: int = 0, **kw) -> str:
    """Write :func:`distill_prompts` as JSONL ``{"prompt": ...}`` (stage-2 data). Returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for p in distill_prompts(n, seed, **kw):
            f.write(json.dumps({"prompt": p}) + "\n")
    return path


def write_stage1_data(path: str, teacher_dir: str | None = None, n: int = 256, seed: int = 0,
                      mode: str = "generate", max_new_tokens: int = 48, do_sample: bool = False,
                      temperature: float = 1.0, batch_size: int = 32, text_chars: int = 600) -> str:
    """Stage-1 data. ``mode="generate"``: JSONL ``{"prompt","response"}``, responses generated by the
    teacher at ``teacher_dir`` (greedy, or sampled with ``seed``; cut after the first line for
    arithmetic prompts). ``mode="text"``: JSONL ``{"text"}`` held-in (training-file) text, for the
    trainer's teacher-scored forward KL. Returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows = []
    if mode == "text":
        docs = [d for d in training_texts(seed, code_chars=n * text_chars * 2, arith_lines=n * 8) if d.strip()]
        for d in docs[:n]:
            rows.append({"text": d[:text_chars]})
    elif mode == "generate":
        if teacher_dir is None:
            raise ValueError("write_stage1_data(mode='generate') needs teacher_dir")
        from .hf_model import generate

        prompts = distill_prompts(n, seed)
        outs = generate(teacher_dir, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, seed=seed, batch_size=batch_size)
        for p, r in zip(prompts, outs):
            if p.rstrip().endswith("="):  # arithmetic: keep the answer line
                r = r.split("\n")[0] + "\n"
            if r.strip():
                rows.append({"prompt": p, "response": r})
    else:
        raise ValueError(f"mode={mode!r}: 'generate' or 'text'")
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
