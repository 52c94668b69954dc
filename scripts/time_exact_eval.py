"""Phase times of exact_bpb on 200 KB of enwiki val with the real tokenizer and a tiny random GPT (CPU).
Not a test: run before and after host-side changes to see where the seconds go."""

import json
import time

import torch

from hlm.bytes import exact_eval
from hlm.evaluate import split_documents
from hlm.models.gpt import GPT, GPTConfig
from hlm.tokenizers import load_tokenizer

CORPUS = "/work/corpora/enwiki_bpe"

tok = load_tokenizer(f"{CORPUS}/tokenizer.model")
docs = [split_documents(CORPUS, "val")[0][:200000]]
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=16384, block_size=1024, n_layer=1, n_head=2, d_model=64)).eval()

seconds = {"log_prefix_probs": 0.0}
log_prefix_probs = exact_eval._log_prefix_probs


def timed(*args):
    t0 = time.perf_counter()
    out = log_prefix_probs(*args)
    seconds["log_prefix_probs"] += time.perf_counter() - t0
    return out


exact_eval._log_prefix_probs = timed
res = exact_eval.exact_bpb(model, tok, docs, 2, "cpu", workers=2)
report = {k: round(v, 3) for k, v in {**res["seconds_split"], **seconds}.items()}
print(json.dumps({"bpb_conv": res["bpb_conv"], "bpb_canon": res["bpb_canon"], "nodes": res["nodes"],
                  "windows": res["windows"], "seconds": round(res["seconds"], 2), "split": report}, indent=1))
