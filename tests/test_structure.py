"""The package's shape: no import cycles (module-level or inside functions), no imports of private
names across modules, no test helpers inside the package, no upward imports between its layers (listed
at LAYERS below), no module above MAX_LINES lines unless listed with its reason, no config key that
nothing reads. Each check has a negative control on synthetic input."""

from __future__ import annotations

import ast
import os
import re

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "zeda_megatron")


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py") and "remote_code" not in root:  # remote_code ships into exports on its own
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(name: str, path: str, modules: dict[str, str]):
    """(imported module, imported names) for every import in the file, at any depth."""
    tree = ast.parse(open(path).read())
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [a.name for a in node.names]
            # "from pkg import module" imports a module
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            for s in subs:
                yield s, []
            yield base, [n for n in names if f"{base}.{n}" not in modules]


def _graph():
    modules = _modules()
    graph, private = {}, []
    for name, path in modules.items():
        deps = set()
        for mod, names in _imports(name, path, modules):
            if mod in modules and mod != name:
                deps.add(mod)
                private += [(name, mod, n) for n in names if n.startswith("_") and not n.startswith("__")]
        graph[name] = deps
    return graph, private


def _cycles(graph):
    # package __init__ re-exports are edges from a package to its own children: not a cycle of concerns
    state, stack, found = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if d.startswith(n + "."):
                continue
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return [c for c in found if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]


def test_no_import_cycles():
    graph, _ = _graph()
    assert "zeda_megatron.train" in graph and graph["zeda_megatron.train"], "the import graph was not read"
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_private_names_imported_across_modules():
    _, private = _graph()
    assert private == []


def test_no_test_helpers_in_the_package():
    modules = _modules()
    assert not [m for m in modules if m.rpartition(".")[2] in ("testing", "fixtures", "conftest")
                or m.rpartition(".")[2].startswith("test_")]


# ---- layers: no upward imports --------------------------------------------------------------------------
# A module may import modules of its own layer or lower ones, at module level or inside functions. The
# layers, lowest first (a package's layer covers its submodules; a module is placed by its longest
# listed prefix; the root package's __init__ is listed on its own):
#   0  the ZEDA idea and process basics, no package imports above them: routing, losses, linear_kl (the
#      fused output-layer KL), assumptions (data-dependent values without data), layout (layout rules),
#      platform (the CPU patches), quiet (warning filters)
#   1  megatron-core glue: mcore (the null-expert layer), distributed (process groups)
#   2  bridge: HF <-> megatron-core checkpoints, DeepSpeed student weights
#   3  spec: the config resolved and checked into a RunSpec
#   4  plan: the memory/time plan of a RunSpec
#   5  training: engines, data, the step, the sampler, checkpoints
#   6  applications built on them: eval (scoring, baselines), embedded (the demo's corpus and models),
#      pipeline (the phases of the demo and the Slurm job), rehearse (the fake-tensor rehearsal)
#   7  entry modules (python -m zeda_megatron.<name>)
LAYERS = {
    "zeda_megatron": 0,
    **dict.fromkeys(("routing", "losses", "linear_kl", "assumptions", "layout", "platform", "quiet"), 0),
    **dict.fromkeys(("mcore", "distributed"), 1),
    "bridge": 2,
    "spec": 3,
    "plan": 4,
    "training": 5,
    **dict.fromkeys(("eval", "embedded", "scoring", "baselines", "pipeline", "rehearse"), 6),
    **dict.fromkeys(("train", "generate", "evaluate", "prepare_data", "demo", "compare", "harness"), 7),
}


def _layer(module: str, layers=LAYERS) -> int:
    """The layer of ``module`` (a dotted name): its longest listed prefix below the root package."""
    parts = module.split(".")
    if len(parts) == 1:
        return layers[module]
    for n in range(len(parts), 1, -1):
        key = ".".join(parts[1:n])
        if key in layers:
            return layers[key]
    raise KeyError(f"{module} has no layer: add it (or its package) to LAYERS in tests/test_structure.py")


def _upward_imports(graph, layers=LAYERS) -> list[str]:
    return sorted(f"{m} (layer {_layer(m, layers)}) imports {d} (layer {_layer(d, layers)})"
                  for m, deps in graph.items() for d in deps if _layer(d, layers) > _layer(m, layers))


def test_no_upward_imports_between_layers():
    graph, _ = _graph()
    assert len(graph) > 50 and all(_layer(m) >= 0 for m in graph)  # every module has a layer
    assert _upward_imports(graph) == []


def test_the_layer_check_finds_an_upward_import_and_an_unplaced_module():
    graph = {"zeda_megatron.bridge.checkpoint": {"zeda_megatron.training.ds_weights", "zeda_megatron.mcore.config"},
             "zeda_megatron.training.step": {"zeda_megatron.distributed"}}
    assert _upward_imports(graph) == [
        "zeda_megatron.bridge.checkpoint (layer 2) imports zeda_megatron.training.ds_weights (layer 5)"]
    with pytest.raises(KeyError, match="zeda_megatron.newthing has no layer"):
        _layer("zeda_megatron.newthing")


# ---- module size ----------------------------------------------------------------------------------------
MAX_LINES = 450
LARGER = {  # module -> why it stays one file: the one concern it holds
    "zeda_megatron.linear_kl": "the fused output-layer + KL per token chunk: forward, hand-written backward, TP",
}


def _too_large(sizes: dict[str, int], limit=MAX_LINES, larger=LARGER) -> list[str]:
    return sorted(f"{m}: {n} lines" for m, n in sizes.items() if n > limit and m not in larger)


def test_no_module_above_the_size_limit():
    sizes = {m: len(open(p).read().splitlines()) for m, p in _modules().items()}
    assert sizes["zeda_megatron.train"] > 10  # the sizes were read
    assert _too_large(sizes) == []


def test_the_size_check_finds_a_large_module():
    assert _too_large({"zeda_megatron.a": MAX_LINES + 1, "zeda_megatron.b": MAX_LINES,
                       "zeda_megatron.linear_kl": 10 * MAX_LINES}) == [f"zeda_megatron.a: {MAX_LINES + 1} lines"]


# ---- config keys: every key the configs define is read --------------------------------------------------
# A key a.b.c counts as read when one source file (the package, slurm/, tools/, or a config's own
# interpolations) holds both its name "c" and its parent's "b" as an attribute name or a word of a string
# (cfg.b.c, get(cfg, "a.b.c"), wcfg.get("c") beside cfg.a.b, ${a.b.c}). An interpolation that picks a
# child by another value (${a.b.${stage.name}}) reads every child of a.b. Keys read as a whole mapping:
GENERIC = {
    "model.hf_config": "the HF config.json in force: handed whole to transformers and bridge/hf_config.py",
    "model.mcore": "TransformerConfig fields, passed through (bridge/hf_config.check_mcore_settings)",
    "engine.config": "merged into DeepSpeed's config as it is (training/ds_engine.ds_config)",
}
ROOT = os.path.dirname(PKG)
CONF = os.path.join(ROOT, "conf")
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _config_keys(conf=CONF) -> dict[str, str]:
    """{dotted key: defining file} of every leaf the YAML files under ``conf`` define (group options in
    their group's package unless ``# @package _global_``; Hydra's own ``hydra``/``defaults`` left out)."""
    from omegaconf import OmegaConf

    keys = {}
    for root, _, files in os.walk(conf):
        for f in sorted(files):
            if not f.endswith(".yaml"):
                continue
            path = os.path.join(root, f)
            group = os.path.relpath(root, conf)
            glob = "@package _global_" in open(path).read()
            prefix = "" if group == "." or glob else group.replace(os.sep, ".") + "."
            tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
            if not prefix:
                tree = {k: v for k, v in tree.items() if k not in ("hydra", "defaults")}
            tree.pop("defaults", None)

            def walk(node, key):
                if isinstance(node, dict) and node:
                    for k, v in node.items():
                        walk(v, f"{key}.{k}" if key else str(k))
                else:
                    keys.setdefault(key, os.path.relpath(path, ROOT))

            walk(tree, prefix.rstrip("."))
    return keys


def _python_words(source: str) -> set[str]:
    words = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            words.update(WORD.findall(node.value))
    return words


def _yaml_reads(text: str, group: str) -> tuple[set[str], set[str]]:
    """(words of the interpolations ``${...}`` in a config file, with its group's name; prefixes read
    child by child through a nested interpolation)."""
    exprs = re.findall(r"\$\{([^{}]*(?:\$\{[^{}]*\}[^{}]*)*)\}", text)
    words = {w for e in exprs for w in WORD.findall(e)} | ({group} if group else set())
    dynamic = set(re.findall(r"\$\{([\w.]+)\.\$\{", text))
    return words, dynamic


def _sources(root=ROOT):
    """(word sets, one per source file; prefixes read whole) of the package, slurm/, tools/ and conf/."""
    word_sets, dynamic = [], set()
    for top in ("zeda_megatron", "slurm", "tools"):
        for r, _, files in os.walk(os.path.join(root, top)):
            word_sets += [_python_words(open(os.path.join(r, f)).read()) for f in files if f.endswith(".py")]
    for r, _, files in os.walk(os.path.join(root, "conf")):
        group = os.path.relpath(r, os.path.join(root, "conf"))
        for f in files:
            if f.endswith(".yaml"):
                words, dyn = _yaml_reads(open(os.path.join(r, f)).read(), "" if group == "." else group)
                word_sets.append(words)
                dynamic |= dyn
    return word_sets, dynamic


def _unread(keys, word_sets, dynamic=(), generic=GENERIC) -> list[str]:
    out = []
    for key in sorted(keys):
        if any(key == g or key.startswith(g + ".") for g in (*generic, *dynamic)):
            continue
        parts = key.split(".")
        need = set(parts[-2:])
        if not any(need <= words for words in word_sets):
            out.append(key)
    return out


def test_every_config_key_is_read():
    keys = _config_keys()
    assert {"trainer.max_steps", "stage.kl", "model.null_experts.ratio", "cluster.partition",
            "parallel.reference_micro_batch.sft"} <= set(keys)  # groups, globals and nesting were read
    word_sets, dynamic = _sources()
    unread = _unread(keys, word_sets, dynamic)
    assert unread == [], "config keys nothing reads (remove them, or read them): " + ", ".join(
        f"{k} ({keys[k]})" for k in unread)


def test_the_config_key_check_finds_an_unread_key():
    word_sets, dynamic = _sources()
    keys = {"trainer.max_steps": "x", "trainer.zz_never_read": "x", "zz_group.max_steps": "x"}
    assert _unread(keys, word_sets, dynamic) == ["trainer.zz_never_read", "zz_group.max_steps"]
    # what counts as a read: an attribute chain, a dotted string, a nested interpolation
    assert _unread({"a.b": "x"}, [_python_words("cfg.a.b")]) == []
    assert _unread({"a.b": "x"}, [_python_words("get(cfg, 'a.b')")]) == []
    assert _unread({"a.b": "x", "a.c": "x"}, [_python_words("cfg.a.c; x.b")]) == []  # a word set per file
    assert _unread({"a.b": "x"}, [_python_words("cfg.a"), _python_words("x.b")]) == ["a.b"]
    words, dyn = _yaml_reads("x: ${p.table.${stage.name}}\ny: ${.k}", "g")
    assert dyn == {"p.table"} and _unread({"p.table.sft": "x", "g.k": "x"}, [words], dyn) == []
