"""Device check of TreeMask attention (fifth session): on the first windows of 200 KB of val, the
log-probs of the tree layout against the same rows under the equivalent dense [W, W] mask, and the
forward time of each (batch 8, bf16 autocast)."""
import sys, time
import torch
from hlm.checkpoint import load_model
from hlm.evaluate import split_documents
from hlm.tokenizers import load_tokenizer
from hlm.bytes.covers import ConversionRules
from hlm.bytes.exact_eval import plan_documents, _Flat, _windows, _pack
from eval import truncate

DEV = "cuda" if torch.cuda.is_available() else "cpu"
model = load_model(sys.argv[1], DEV)[0].eval()
docs = truncate(split_documents("data/enwiki_bpe", "val"), 200_000)
tok = load_tokenizer("data/enwiki_bpe/tokenizer.model")
rules = ConversionRules(tok)
plans, _ = plan_documents(docs, rules, tok.eos_id, workers=16)
windows = _windows(_Flat(plans), model.cfg.block_size).to(DEV)
t, c, s, n_off = windows.n_trunk, windows.chunk, windows.span, windows.n_off
W = t + n_off
print(f"n_trunk {t} n_off {n_off} chunk {c} span {s} windows {len(windows.start) - 1}")


def dense_of(tree):
    n = n_off // c
    keep = tree.keep.view(-1, n, c, t + s + c)
    dense = torch.zeros(keep.size(0), 1, W, W, dtype=torch.bool, device=keep.device)
    dense[:, 0, :t, :t] = torch.ones(t, t, dtype=torch.bool, device=keep.device).tril()
    for k in range(n):
        q = slice(t + k * c, t + (k + 1) * c)
        dense[:, 0, q, :t] = keep[:, k, :, :t]
        lo = k * c - s
        j0 = max(0, -lo)
        dense[:, 0, q, t + lo + j0 : t + lo + s + c] = keep[:, k, :, t + j0 :]
    return dense


ac = torch.autocast("cuda", dtype=torch.bfloat16) if DEV == "cuda" else torch.autocast("cpu", enabled=False)
with torch.no_grad(), ac:
    worst = 0.0
    for i in (0, 8):
        ids, pos, tree, rows, nodes = _pack(windows, i, i + 8, 8)
        a = torch.log_softmax(model.logits(ids, attn_mask=tree, positions=pos).float(), -1).flatten(0, 1)[rows.to(DEV)]
        b = torch.log_softmax(model.logits(ids, attn_mask=dense_of(tree), positions=pos).float(), -1).flatten(0, 1)[rows.to(DEV)]
        worst = max(worst, float((a - b).abs().max()))
        print(f"batch {i // 8}: max |d log p| {float((a - b).abs().max()):.3e}, mean {float((a - b).abs().mean()):.3e}")
    ids, pos, tree, rows, nodes = _pack(windows, 0, 8, 8)
    dense = dense_of(tree)
    for name, mask in (("tree", tree), ("dense", dense)):
        for _ in range(2):
            model.logits(ids, attn_mask=mask, positions=pos)
        torch.cuda.synchronize() if DEV == "cuda" else None; t0 = time.perf_counter()
        for _ in range(10):
            model.logits(ids, attn_mask=mask, positions=pos)
        torch.cuda.synchronize() if DEV == "cuda" else None
        print(f"{name}: {(time.perf_counter() - t0) / 10 * 1e3:.1f} ms per batch of 8 windows (row width {W})")
