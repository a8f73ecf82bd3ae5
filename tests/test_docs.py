"""The README and docs/ stay short, linked and honest about their commands.

- README.md has at most 250 lines; it links every page in docs/ (the topic pages), and every relative link
  in README.md and docs/*.md points at a file that exists (and, with ``#anchor``, at one of its headings).
- Every command in a fenced ```bash block of README.md or docs/*.md says how it is checked, with a marker in
  its trailing comment (on the last line of a command continued with ``\\``):

      python -m zeda_megatron.plan model=qwen3_30b_a3b ...   # tested: tests/test_plan.py::test_plan_cli_prints_table_and_json_line
      sbatch slurm/adapt_qwen.sh model.hf_dir=...             # needs: cluster
      tools/gpu_smoke.sh                                      # needs: gpu
      bash scripts/test.sh                                    # run by: .ci/run

  ``tested: FILE::TEST``: FILE exists under tests/, defines TEST (``Class::test`` for a method), and its source
  names the command's entry point (the module after ``-m``, else the script: ``tools/bench_kl.py`` or
  ``bench_kl.py``). ``run by: FILE``: FILE (a script CI runs) contains the command as written.
  ``needs: cluster`` / ``needs: gpu``: runs only where a Slurm cluster / CUDA GPUs exist.
  A command that no test runs yet is listed in NOT_RUN_BY_A_TEST below, by its exact text.
- Commands go in ```bash blocks: a command line (python, torchrun, sbatch, bash, ...) in another fenced block
  or in an indented code block is reported.
"""

from __future__ import annotations

import ast
import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 250

# Pages other engineers are writing: the README and the docs may link them before they land. The lead empties
# this list as each page lands; any other broken link fails.
PAGES_NOT_WRITTEN_YET: set[str] = set()

# Documented commands that no test runs (exact text of the command, marker-free). Each one is a gap: add a test
# that runs it (and mark it ``tested:``), then delete it here.
NOT_RUN_BY_A_TEST = {
    # run_demo.sh = scripts/setup.sh + `python -m zeda_megatron.demo` (tests/test_demo.py runs the latter)
    "bash scripts/run_demo.sh",
    # the EP=2 form of the layer demo and of the layer benchmark (the tests run them in one process)
    "torchrun --nproc_per_node 2 tools/demo_null_layer.py",
    "torchrun --nproc_per_node 2 tools/bench_moe_layer.py --ep 2",
    # model.mcore through the trainer's command line (tests/test_mcore_settings.py validates and builds it)
    "python -m zeda_megatron.train model=tiny_qwen3 +model.mcore.moe_z_loss_coeff=1e-3",
    # DeepSpeed config passthrough (engine.config)
    "torchrun --nproc-per-node 2 -m zeda_megatron.train model=tiny_qwen3 parallel=ep2 engine=deepspeed "
    "'engine.config={zero_optimization: {reduce_bucket_size: 50000000}}'",
    # the engine benchmark
    "python tools/bench_engines.py",
}

MARKER = re.compile(r"(?:needs:\s*(?P<needs>cluster|gpu)\b|tested:\s*(?P<file>tests/[\w/]+\.py)::(?P<test>[\w:]+)"
                    r"|run by:\s*(?P<runner>[\w./-]+))")
LAUNCHERS = ("python", "python3", "torchrun", "bash", "sbatch", "srun", "pip", "lm_eval", ".venv/", "tools/",
             "scripts/", "slurm/")
FENCE = re.compile(r"^(\s*)(```|~~~)(.*)$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def doc_files() -> list[str]:
    docs = os.path.join(ROOT, "docs")
    pages = sorted(os.path.join("docs", f) for f in os.listdir(docs) if f.endswith(".md")) if os.path.isdir(docs) else []
    return ["README.md", *pages]


# ---- parsing -------------------------------------------------------------------------------------------------
def code_blocks(text: str):
    """Yield (language, first line number, lines) for each fenced block, and ("indented", n, lines) for each
    indented code block (4 spaces after a blank line, outside fences and lists)."""
    lines = text.splitlines()
    i, prev_blank = 0, True
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            lang, start, body = m.group(3).strip().split(" ")[0], i + 1, []
            i += 1
            while i < len(lines) and not FENCE.match(lines[i]):
                body.append(lines[i])
                i += 1
            yield lang, start + 1, body
            i, prev_blank = i + 1, False
            continue
        if prev_blank and lines[i].startswith("    ") and lines[i].strip() and not re.match(r"\s*([-*+]|\d+\.)\s",
                                                                                          lines[i]):
            start, body = i, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            yield "indented", start + 1, body
            prev_blank = True
            continue
        prev_blank = not lines[i].strip()
        i += 1


def split_comment(line: str) -> tuple[str, str]:
    """(code, trailing comment) of one shell line: the comment starts at the first '#' outside quotes that
    begins a word."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k].rstrip(), line[k + 1:].strip()
    return line.rstrip(), ""


def commands(lines: list[str], first_line: int):
    """Yield (line number, command text, trailing comment) for each command of a bash block: full-line comments
    and blank lines are skipped, lines continued with a backslash are joined."""
    parts, start = [], None
    for n, raw in enumerate(lines, first_line):
        code, comment = split_comment(raw)
        if not parts and not code.strip():
            continue
        start = n if not parts else start
        if code.endswith("\\"):
            parts.append(code[:-1].strip())
            continue
        parts.append(code.strip())
        yield start, " ".join(p for p in parts if p), comment
        parts = []


def entry_point(command: str) -> str | None:
    """The module (after -m) or the script the command runs; None when neither is recognisable."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]  # leading VAR=value assignments
    if not words:
        return None
    if "-m" in words and words.index("-m") + 1 < len(words):
        return words[words.index("-m") + 1]
    for w in words:
        if w.endswith((".py", ".sh")):
            return w
    return words[0] if not words[0].startswith("-") else None


def looks_like_a_command(line: str) -> bool:
    word = re.sub(r"^([A-Za-z_][A-Za-z0-9_]*=\S*\s+)+", "", line.strip()).split(" ")[0]
    return bool(word) and word.startswith(LAUNCHERS) and not word.endswith(":")


# ---- checks --------------------------------------------------------------------------------------------------
def marker_test_problem(file: str, test: str, entry: str | None) -> str | None:
    path = os.path.join(ROOT, file)
    if not os.path.isfile(path):
        return f"{file} does not exist"
    src = open(path).read()
    names = test.split("::")
    scope = ast.parse(src).body
    for name in names:
        found = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name]
        if not found:
            return f"{file} defines no {test}"
        scope = found[0].body
    if entry is None:
        return "no entry point (a module after -m, or a .py/.sh script) in the command"
    candidates = {entry, os.path.basename(entry)} if entry.endswith((".py", ".sh")) else {entry}
    if not any(re.search(re.escape(c) + r"(?![\w])", src) for c in candidates):
        return f"{file} never names the command's entry point {entry!r}"
    return None


def command_problems(doc: str, text: str, not_run: set[str] = frozenset()) -> list[str]:
    """Every unmarked, wrongly marked or misplaced command of one document, as 'doc:line: why'."""
    problems = []
    for lang, first, lines in code_blocks(text):
        if lang != "bash":
            for n, line in enumerate(lines, first):
                if lang != "python" and looks_like_a_command(line):
                    problems.append(f"{doc}:{n}: command outside a ```bash block: {line.strip()}")
            continue
        for n, cmd, comment in commands(lines, first):
            m = MARKER.search(comment)
            if m is None:
                if cmd not in not_run:
                    problems.append(f"{doc}:{n}: no marker (tested:/needs:/run by:): {cmd}")
                continue
            if cmd in not_run:
                problems.append(f"{doc}:{n}: marked, so delete it from NOT_RUN_BY_A_TEST: {cmd}")
            if m.group("file"):
                why = marker_test_problem(m.group("file"), m.group("test"), entry_point(cmd))
                if why:
                    problems.append(f"{doc}:{n}: {why}: {cmd}")
            elif m.group("runner"):
                runner = os.path.join(ROOT, m.group("runner"))
                if not os.path.isfile(runner) or cmd not in open(runner).read():
                    problems.append(f"{doc}:{n}: {m.group('runner')} does not run {cmd!r}")
    return problems


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown text's headings: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            k, base = 0, slug
            while slug in out:
                k += 1
                slug = f"{base}-{k}"
            out.add(slug)
    return out


def link_problems(doc: str, text: str, missing_ok: set[str] = frozenset(), read_doc=None) -> list[str]:
    """Broken relative links of one document (a missing file, or a missing heading for '#anchor' in a
    Markdown file), as 'doc:line: why'; URLs are not followed."""
    read_doc = read_doc or read
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(doc), file)) if file else doc
            if not file:
                body = text
            elif os.path.exists(os.path.join(ROOT, path)):
                body = read_doc(path) if path.endswith(".md") else None
            else:
                if path not in missing_ok:
                    problems.append(f"{doc}:{n}: broken link {target} ({path})")
                continue
            if anchor and body is not None and anchor not in anchors(body):
                problems.append(f"{doc}:{n}: no heading for #{anchor} in {path}")
    return problems


def read(doc: str) -> str:
    with open(os.path.join(ROOT, doc)) as f:
        return f.read()


# ---- tests ---------------------------------------------------------------------------------------------------
def test_readme_is_short():
    n = len(read("README.md").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}: move detail to docs/)"


def unlinked_pages(readme: str, pages: list[str]) -> list[str]:
    """The topic pages (docs/*.md, except content waiting to be folded in: docs/_moved_*.md) README.md does not
    link."""
    linked = {os.path.normpath(t.split("#")[0]) for t in LINK.findall(readme)}
    return [p for p in pages if not os.path.basename(p).startswith("_moved_") and p not in linked]


def test_readme_links_every_docs_page():
    pages = doc_files()[1:]
    assert pages, "docs/ has no pages"
    unlinked = unlinked_pages(read("README.md"), pages)
    assert not unlinked, f"README.md does not link {unlinked}"


def test_links_resolve():
    problems = [p for doc in doc_files() for p in link_problems(doc, read(doc), PAGES_NOT_WRITTEN_YET)]
    assert not problems, "\n".join(problems)
    landed = sorted(p for p in PAGES_NOT_WRITTEN_YET if os.path.exists(os.path.join(ROOT, p)))
    assert not landed, f"these pages exist now: delete them from PAGES_NOT_WRITTEN_YET: {landed}"


def test_every_command_is_run_by_a_test_or_needs_a_cluster_or_gpu():
    problems, seen = [], set()
    for doc in doc_files():
        text = read(doc)
        problems += command_problems(doc, text, NOT_RUN_BY_A_TEST)
        seen |= {cmd for lang, first, lines in code_blocks(text) if lang == "bash"
                 for _, cmd, _ in commands(lines, first)}
    stale = sorted(NOT_RUN_BY_A_TEST - seen)
    assert not problems, "\n".join(problems)
    assert not stale, f"NOT_RUN_BY_A_TEST lists commands no document has: {stale}"


# ---- negative controls: the checks above can fail ------------------------------------------------------------
SYNTHETIC = """# A page

```bash
python -m zeda_megatron.plan model=tiny_glm
python -m zeda_megatron.plan model=tiny_glm   # tested: tests/test_plan.py::test_no_such_test
python -m zeda_megatron.demo --preset test    # tested: tests/test_plan.py::test_plan_cli_prints_table_and_json_line
torchrun --nproc_per_node 8 -m zeda_megatron.train model=glm47_flash \\
    parallel=reference_8gpu                   # needs: gpu
bash scripts/test.sh --lf                     # run by: .ci/run
python tools/bench_kl.py --small              # tested: tests/test_nope.py::test_x
```

    python -m zeda_megatron.evaluate model=embedded_glm

```
sbatch slurm/adapt_glm.sh
```

[a page](docs/nope.md), [the plan](time_plan.md), [a site](https://example.com), [here](#a-page)
[there](#no-such-heading), [the trainer](training.md#batches-and-padding), [gone](training.md#no-such-part)
"""


def test_checks_report_unmarked_wrong_and_misplaced_commands_and_broken_links():
    problems = command_problems("docs/x.md", SYNTHETIC)
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "docs/x.md:4: no marker" in text
    assert "docs/x.md:5: tests/test_plan.py defines no test_no_such_test" in text
    assert "docs/x.md:6: tests/test_plan.py never names the command's entry point 'zeda_megatron.demo'" in text
    assert ".ci/run does not run 'bash scripts/test.sh --lf'" in text
    assert "tests/test_nope.py does not exist" in text
    assert "docs/x.md:13: command outside a ```bash block: python -m zeda_megatron.evaluate" in text
    assert "docs/x.md:16: command outside a ```bash block: sbatch slurm/adapt_glm.sh" in text
    # the continued 8-GPU command is one command, marked on its last line: not reported
    assert "glm47_flash" not in text
    # a listed untested command passes unmarked; marked while listed, it is reported
    assert not command_problems("docs/x.md", "```bash\npython tools/bench_engines.py\n```\n",
                                {"python tools/bench_engines.py"})
    assert command_problems("docs/x.md", "```bash\npython tools/bench_engines.py  # needs: gpu\n```\n",
                            {"python tools/bench_engines.py"})
    links = link_problems("docs/x.md", SYNTHETIC, {"docs/time_plan.md"},
                          read_doc=lambda p: "## Batches and padding\n" if p == "docs/training.md" else read(p))
    assert links == ["docs/x.md:19: broken link docs/nope.md (docs/docs/nope.md)",
                     "docs/x.md:20: no heading for #no-such-heading in docs/x.md",
                     "docs/x.md:20: no heading for #no-such-part in docs/training.md"], links
    assert anchors("# A\n```\n# not a heading\n```\n## Tensor parallel + SP (CPU/gloo)\n## A\n") == {
        "a", "tensor-parallel--sp-cpugloo", "a-1"}


def test_unlinked_pages_are_reported():
    pages = ["docs/layer.md", "docs/data.md", "docs/_moved_gpu.md"]
    assert unlinked_pages("[the layer](docs/layer.md#api)", pages) == ["docs/data.md"]


def test_entry_points():
    assert entry_point("torchrun --nproc_per_node 2 -m zeda_megatron.train model=tiny_glm") == "zeda_megatron.train"
    assert entry_point("DRY_RUN=1 bash slurm/adapt_glm.sh") == "slurm/adapt_glm.sh"
    assert entry_point("sbatch --nodes=2 slurm/adapt_glm.sh model.hf_dir=/x") == "slurm/adapt_glm.sh"
    assert entry_point("lm_eval --model hf --tasks gsm8k") == "lm_eval"
    assert split_comment("python a.py 'x # y'   # needs: gpu") == ("python a.py 'x # y'", "needs: gpu")
