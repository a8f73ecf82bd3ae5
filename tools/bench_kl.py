"""Peak memory and time of the fused chunked exact KL vs materialised logits (CPU, fp32).

Both variants compute the same loss from the student's and the teacher's final hidden states and
output weights ([V/TP, h], one TP rank's shard), forward + backward, with gradients to the
student's hidden states and output weight:

- ``unchunked``: the current path: logits = hidden @ weight.T for both models, then
  zeda_megatron.losses on the materialised [tokens, V/TP] logits, autograd backward;
- ``chunked``: zeda_megatron.linear_kl.fused_linear_losses (output layer + loss per token chunk,
  gradients computed in the forward pass).

Each variant runs in a fresh subprocess with glibc's malloc returning every allocation >= 64 KiB
to the OS (fixed mmap threshold), so resident memory tracks live tensors; after the inputs are
built (and a small warm-up), the kernel's peak-RSS counter is reset (/proc/self/clear_refs = 5)
and the peak above that baseline (VmHWM - VmRSS) is the variant's working memory, gradients
included. Values and gradients of both runs are compared in the parent.

    python tools/bench_kl.py                  # b=1, s=4096, h=2048, V/TP=38720 (154880 over TP4)
    python tools/bench_kl.py --small          # CI size
Ends with one JSON line: chunked_peak_bytes, unchunked_peak_bytes, max_rel_diff, max_grad_diff, ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOSSES = {  # name -> fused-call weights (the materialised reference mirrors them)
    "reverse": dict(reverse_kl_weight=1.0),
    "forward": dict(forward_kl_weight=1.0),
    "sft": dict(nll_weight=1.0, forward_kl_weight=1.0),
    "sampled": dict(sampled_kl_weight=1.0),
}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _inputs(args):
    import torch

    g = torch.Generator().manual_seed(args.seed)
    n, h, v = args.batch * args.seq, args.hidden, args.vocab
    w_std = 2.0 / h**0.5  # logits of std ~2
    hs = torch.empty(args.batch, args.seq, h).normal_(generator=g)
    ws = torch.empty(v, h).normal_(0.0, w_std, generator=g)
    ht = torch.empty(args.batch, args.seq, h).normal_(generator=g)
    wt = torch.empty(v, h).normal_(0.0, w_std, generator=g)
    labels = torch.randint(0, v, (args.batch, args.seq), generator=g)
    mask = torch.ones(args.batch, args.seq)
    mask[:, args.seq - args.seq // 8:] = 0  # right padding on the last eighth
    assert n == mask.numel()
    return hs.requires_grad_(True), ws.requires_grad_(True), ht, wt, labels, mask


def _unchunked(hs, ws, ht, wt, labels, mask, loss, temperature):
    import torch

    from zeda_megatron import losses

    zs = hs @ ws.t()
    with torch.no_grad():
        zt = ht @ wt.t()
    y = labels.clamp_min(0)
    kw = LOSSES[loss]
    per_token = 0
    if kw.get("nll_weight"):
        per_token = per_token - kw["nll_weight"] * losses.token_logprob(zs, y)
    if kw.get("forward_kl_weight"):
        per_token = per_token + kw["forward_kl_weight"] * losses.forward_kl(zs, zt, temperature)
    if kw.get("reverse_kl_weight"):
        per_token = per_token + kw["reverse_kl_weight"] * losses.reverse_kl(zs, zt, temperature)
    if kw.get("sampled_kl_weight"):
        per_token = per_token + kw["sampled_kl_weight"] * losses.sampled_reverse_kl(zs, zt, y)[0]
    return (per_token * mask).sum(), per_token.detach() * (mask != 0)


def _chunked(hs, ws, ht, wt, labels, mask, loss, temperature, chunk):
    from zeda_megatron import linear_kl

    out = linear_kl.fused_linear_losses(hs, ws, ht, wt, labels, mask, temperature=temperature,
                                        chunk_size=chunk, **LOSSES[loss])
    return out.loss, out.token_loss


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    hs, ws, ht, wt, labels, mask = _inputs(args)

    def run(sl=slice(None)):
        h = hs[:, sl].detach().requires_grad_(True)
        w = ws.detach().requires_grad_(True)
        t0, c0 = time.perf_counter(), time.process_time()
        if args.variant == "chunked":
            loss, per_token = _chunked(h, w, ht[:, sl], wt, labels[:, sl], mask[:, sl], args.loss,
                                       args.temperature, args.chunk)
        else:
            loss, per_token = _unchunked(h, w, ht[:, sl], wt, labels[:, sl], mask[:, sl], args.loss,
                                         args.temperature)
        t1, c1 = time.perf_counter(), time.process_time()
        fwd_peak = _status("VmHWM")
        loss.backward()
        t2, c2 = time.perf_counter(), time.process_time()
        return loss.detach(), per_token, h.grad, w.grad, (t1 - t0, t2 - t1, c1 - c0, c2 - c1), fwd_peak

    run(slice(0, min(args.seq, 64)))  # warm up the kernels (its memory goes back to the OS)
    base = _status("VmRSS")
    exact_peak = _reset_peak()
    loss, per_token, gh, gw, (t_fwd, t_bwd, cpu_fwd, cpu_bwd), fwd_hwm = run()
    peak = _status("VmHWM")
    if not exact_peak:  # no clear_refs: ru_maxrss covers the whole process (an upper bound)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save({"loss": loss, "per_token": per_token, "grad_h": gh, "grad_w": gw}, args.out)
    print(json.dumps({"peak_bytes": peak - base, "fwd_peak_bytes": fwd_hwm - base, "fwd_s": t_fwd,
                      "bwd_s": t_bwd, "fwd_cpu_s": cpu_fwd, "bwd_cpu_s": cpu_bwd, "baseline_rss_bytes": base, "exact_peak": exact_peak}))


def _run_child(variant, args, out):
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", variant, "--_out", out,
           "--batch", str(args.batch), "--seq", str(args.seq), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab), "--chunk", str(args.chunk), "--loss", args.loss,
           "--temperature", str(args.temperature), "--threads", str(args.threads), "--seed", str(args.seed)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               OMP_NUM_THREADS=str(args.threads), PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=38720, help="V/TP: this rank's vocabulary shard")
    p.add_argument("--chunk", type=int, default=0, help="tokens per chunk (0: linear_kl's default)")
    p.add_argument("--loss", choices=sorted(LOSSES), default="reverse")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="CI size: s=1024, h=256, V/TP=8192, chunk 128")
    p.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_out", dest="out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.small:
        args.seq, args.hidden, args.vocab, args.chunk = 1024, 256, 8192, args.chunk or 128
    if args.child:
        args.variant = args.child
        if not args.chunk:
            from zeda_megatron.linear_kl import default_chunk_size

            args.chunk = default_chunk_size(args.vocab)
        child(args)
        return {}
    if not args.chunk:
        sys.path.insert(0, REPO)
        from zeda_megatron.linear_kl import default_chunk_size

        args.chunk = default_chunk_size(args.vocab)

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        res, outs = {}, {}
        for variant in ("chunked", "unchunked"):
            path = os.path.join(tmp, f"{variant}.pt")
            res[variant] = _run_child(variant, args, path)
            outs[variant] = path
        a, b = torch.load(outs["chunked"]), torch.load(outs["unchunked"])
    mask = b["per_token"] != 0
    rel = lambda x, y: float(((x - y).abs() / y.abs().clamp_min(1e-30)).max())  # noqa: E731
    max_rel_diff = max(rel(a["per_token"][mask], b["per_token"][mask]), rel(a["loss"], b["loss"]))
    max_grad_diff = max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in ("grad_h", "grad_w"))
    c, u = res["chunked"], res["unchunked"]
    mib = lambda x: x / 2**20  # noqa: E731
    print(f"b={args.batch} s={args.seq} h={args.hidden} V/TP={args.vocab} loss={args.loss} T={args.temperature} "
          f"chunk={args.chunk} fp32 threads={args.threads}")
    print(f"{'variant':<11} {'peak fwd MiB':>13} {'peak fwd+bwd MiB':>17} {'fwd s':>8} {'bwd s':>8} "
          f"{'fwd cpu s':>10} {'bwd cpu s':>10}")
    for name, r in (("unchunked", u), ("chunked", c)):
        print(f"{name:<11} {mib(r['fwd_peak_bytes']):>13.1f} {mib(r['peak_bytes']):>17.1f} "
              f"{r['fwd_s']:>8.2f} {r['bwd_s']:>8.2f} {r['fwd_cpu_s']:>10.2f} {r['bwd_cpu_s']:>10.2f}")
    ratio = c["peak_bytes"] / u["peak_bytes"]
    print(f"chunked/unchunked peak: {ratio:.3f}; max rel diff of values {max_rel_diff:.2e}; "
          f"max grad diff (relative to the largest entry) {max_grad_diff:.2e}")
    out = {
        "chunked_peak_bytes": c["peak_bytes"], "unchunked_peak_bytes": u["peak_bytes"], "peak_ratio": ratio,
        "max_rel_diff": max_rel_diff, "max_grad_diff": max_grad_diff,
        "chunked_fwd_s": c["fwd_s"], "chunked_bwd_s": c["bwd_s"],
        "unchunked_fwd_s": u["fwd_s"], "unchunked_bwd_s": u["bwd_s"],
        "chunked_cpu_s": c["fwd_cpu_s"] + c["bwd_cpu_s"], "unchunked_cpu_s": u["fwd_cpu_s"] + u["bwd_cpu_s"],
        "batch": args.batch, "seq": args.seq, "hidden": args.hidden, "vocab_per_tp": args.vocab,
        "chunk": args.chunk, "loss": args.loss, "exact_peak": bool(c["exact_peak"] and u["exact_peak"]),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
