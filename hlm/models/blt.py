"""Byte Latent Transformer with entropy patches (Pagnoni et al. 2024, "Byte Latent Transformer:
Patches Scale Better Than Tokens").

    bytes -> byte + hash n-gram embeddings -> local encoder (local-attention byte layers)
          -> cross-attention pooling: one query per patch, attending to its own bytes only
          -> global transformer over patches (causal)
          -> local decoder: byte layers, each byte cross-attending to the global output of
             the last patch completed at or before it -> byte head

Patches come from a frozen entropy model (hlm/models/entropy_patcher.py has the rules): byte
t starts a patch when the entropy of p(x_t | x_<t) is high. Byte t belongs to patch
pid(t) = sum(s[1..t]) and reads memory slot read(t) = sum(s[1..t+1]), where slot 0 is a
learned null patch and slot k the global output of patch k-1. Patch j ends at t exactly when
byte t+1 starts a patch, which H[t+1] (a function of x_<=t) decides: so byte t reads the
patches whose bytes are all <= t and never one that is still open (the shift BLT's
`decoder_patch_ids_from_lengths` makes; the last byte of a patch reads that patch).

Entropies: in training from the precomputed side file `<split>.<entropy_file>.bin` when the
config names one (data_prep/entropy_patches.py), else from the entropy model, which also runs
at evaluation and generation. The entropy model's weights are a frozen submodule, saved in
the checkpoint. The side file scores each byte with up to the entropy model's context, reaching
before a training window; on the fly the context starts at the window, so the first patches of a
window can differ slightly between training and evaluation.

Static shapes: the global transformer sees `max_patches` positions. Patches past the cap are
dropped and later bytes keep reading the last patch that fits; `patch_cap_hit` logs it.
Pooling and reading are gathers and `index_add_` over [B, max_patches + 1] slots; nothing of
size [B, T, patches] is built.

Hash n-grams: e_t = E(x_t) + sum_n E_n[hash(x_{t-n+1..t}) mod hash_vocab], a polynomial
hash; bytes before the window count as 0x00 (the document separator), so an n-gram near the
start of a window hashes as if a document had just begun.

Pooling, the decoder's cross-attention and the cached decoder are hlm/models/parts; the
boundary rule is hlm/models/entropy_patcher.py. Generation (`CachedDecoder`) keeps KV caches for
the entropy model, the encoder, the decoder and the global transformer; a new byte costs one
position of each byte stack, and one global position for the rows whose patch it closes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlm import HLMError
from hlm.models.base import LanguageModel, ModelOutput
from hlm.models.blocks import RMSNorm, Transformer, at_least_fp32, init_weights
from hlm.models.entropy_patcher import PATCHING_MODES, EntropyModel, next_start, patch_starts
from hlm.models.parts.boundaries import group_first, group_index
from hlm.models.parts.decoding import GroupedDecoder, rows_step
from hlm.models.parts.downsample import PatchPooling, cap_metrics
from hlm.models.parts.upsample import CrossAttendingDecoder

HASH_PRIME, HASH_BASE = 1_000_000_007, 1_000_003  # products stay below 2**51


class BLTError(HLMError):
    """A BLT config or input that cannot be used."""


@dataclass
class BLTConfig:
    family: str = "blt"
    vocab_size: int = 256  # bytes
    block_size: int = 4096  # context length in bytes
    d_local: int = 768  # width of the encoder and decoder byte layers
    n_head_local: int = 12
    n_enc: int = 1  # local encoder byte layers
    n_dec: int = 2  # local decoder byte layers (each with a cross-attention to its patch)
    byte_window: int = 512  # local attention window of the byte layers (0: full causal)
    d_model: int = 768  # width of the global transformer
    n_head: int = 12
    n_layer: int = 12  # global layers
    mlp_ratio: float = 4.0
    max_patches: int = 0  # global positions per window (0: block_size // 4)
    cross_attn_k: int = 2  # the decoder reads each patch as this many d_local slots
    hash_ngrams: bool = True
    hash_sizes: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])
    hash_vocab: int = 16384  # rows of each n-gram table
    entropy_model: str = ""  # hlm byte GPT checkpoint (configs/entropy_gpt.yaml); "random": untrained (tests)
    entropy_n_layer: int = 4  # the entropy model's shape (checked against the checkpoint)
    entropy_n_head: int = 6
    entropy_d_model: int = 384
    entropy_window: int = 1024  # its training context: it reads this many bytes back
    entropy_file: str = ""  # side-file stem of precomputed entropies for training ("": compute on the fly)
    patching: str = "global"  # global | monotonic
    entropy_threshold: float | None = None  # θ, from data_prep/entropy_patches.py --target-bytes-per-patch
    target_bytes_per_patch: float = 0.0  # with entropy_threshold null: train.py reads θ for it from the data
                                         # folder's calibration (`fill_from_data`); 0: give θ itself
    max_patch_len: int = 0  # 0: no limit
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def fill_from_data(self, data_path: str | Path) -> None:
        """Before training: θ for `target_bytes_per_patch`, when θ is not given, from the calibration that
        data_prep/entropy_patches.py recorded in the data folder (`patches.<entropy_file>.json`) for this
        entropy model, patching mode and patch length limit. The run's config then holds θ itself."""
        if self.entropy_threshold is not None or not self.target_bytes_per_patch:
            return
        target, name = self.target_bytes_per_patch, self.entropy_file or "entropy"
        path = Path(data_path) / f"patches.{name}.json"
        redo = (f"run data_prep/entropy_patches.py {self.entropy_model} --data {data_path} --name {name} "
                f"--target-bytes-per-patch {target:g}")
        if not path.is_file():
            raise BLTError(f"model.target_bytes_per_patch={target:g}: {path} not found; {redo}")
        try:
            info = json.loads(path.read_text())
            made_with, records = Path(info["entropy_model"]), list(info["calibration"])
        except (ValueError, KeyError, TypeError):
            raise BLTError(f"{path}: not a calibration record of data_prep/entropy_patches.py; {redo}") from None
        if self.entropy_model != "random" and made_with.resolve() != Path(self.entropy_model).resolve():
            raise BLTError(f"{path} was calibrated on the entropies of {made_with}, not of model.entropy_model="
                           f"{self.entropy_model}; {redo}")
        for rec in records:
            if (math.isclose(float(rec.get("target_bytes_per_patch", 0)), target) and rec.get("mode") == self.patching
                    and rec.get("max_patch_len") == self.max_patch_len):
                self.entropy_threshold = float(rec["threshold"])
                return
        raise BLTError(f"{path} has no threshold for {target:g} bytes per patch with model.patching={self.patching} "
                       f"and model.max_patch_len={self.max_patch_len}; {redo} --mode {self.patching} "
                       f"--max-patch-len {self.max_patch_len}")

    def describe(self) -> str:
        hashes = f"hash{min(self.hash_sizes)}-{max(self.hash_sizes)}" if self.hash_ngrams else "nohash"
        theta = "unset" if self.entropy_threshold is None else f"{self.entropy_threshold:.4g}"
        return (f"blt {self.n_enc}+{self.n_layer}+{self.n_dec}L/{self.d_local}-{self.d_model}d "
                f"{self.patching} θ={theta} {hashes}")


def ngram_hashes(x: torch.Tensor, sizes: list[int], vocab: int) -> list[torch.Tensor]:
    """Table rows [B, T] of each n-gram ending at each byte of x [B, T], one tensor per n in
    `sizes`: a polynomial hash of x_{t-n+1..t} (bytes before x count as 0) mod `vocab`."""
    longest = max(sizes)
    padded = F.pad(x, (longest - 1, 0))
    h, out = torch.zeros_like(x), {}
    for n in range(1, longest + 1):  # add byte t-n+1 to the (n-1)-gram hash
        h = (h * HASH_BASE + padded[:, longest - n : longest - n + x.size(1)] + 1) % HASH_PRIME
        out[n] = h % vocab
    return [out[n] for n in sizes]


def patch_index(starts: torch.Tensor, max_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For patch starts s [B, T+1] (s[:, 0] True): the patch of each of the T bytes, clamped to
    `max_patches` (the overflow slot), and the memory slot each byte reads (module docstring)."""
    group = group_index(starts)  # group[t + 1]: patches completed at or before t
    return group[:, :-1].clamp(max=max_patches), group[:, 1:].clamp(max=max_patches)


class HashEmbedding(nn.Module):
    """Byte embedding plus hashed n-gram embeddings."""

    def __init__(self, d: int, sizes: list[int], vocab: int, enabled: bool):
        super().__init__()
        self.sizes, self.vocab = list(sizes), vocab
        self.byte = nn.Embedding(256, d)
        self.ngrams = nn.ModuleList(nn.Embedding(vocab, d) for _ in sizes) if enabled else nn.ModuleList()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of x [B, T]; `context` [B, < max(sizes)] are the bytes just before x (generation)."""
        e = self.byte(x)
        if len(self.ngrams):
            full = x if context is None else torch.cat([context, x], dim=1)
            for table, ids in zip(self.ngrams, ngram_hashes(full, self.sizes, self.vocab), strict=True):
                e = e + table(ids[:, full.size(1) - x.size(1) :])
        return e


class BLT(LanguageModel):
    def __init__(self, cfg: BLTConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.max_patches = P = cfg.max_patches or max(1, cfg.block_size // 4)
        dl, dg = cfg.d_local, cfg.d_model
        self.embed = HashEmbedding(dl, cfg.hash_sizes, cfg.hash_vocab, cfg.hash_ngrams)
        self.encoder = Transformer(cfg.n_enc, dl, cfg.n_head_local, cfg.block_size, cfg.mlp_ratio, cfg.rope_theta,
                                   cfg.byte_window)
        self.pool = PatchPooling(dl, cfg.n_head_local)
        self.down = nn.Sequential(RMSNorm(dl), nn.Linear(dl, dg, bias=False))
        self.glob = Transformer(cfg.n_layer, dg, cfg.n_head, P, cfg.mlp_ratio, cfg.rope_theta)
        self.null_patch = nn.Parameter(torch.zeros(dg))
        self.up = nn.Sequential(RMSNorm(dg), nn.Linear(dg, cfg.cross_attn_k * dl, bias=False))
        self.decoder = CrossAttendingDecoder(cfg.n_dec, dl, cfg.n_head_local, cfg.block_size, cfg.mlp_ratio,
                                             cfg.rope_theta, cfg.byte_window)
        self.norm = RMSNorm(dl)
        self.head = nn.Linear(dl, 256, bias=False)
        init_weights(self, cfg.n_enc + cfg.n_layer + cfg.n_dec, cfg.init_std)
        nn.init.normal_(self.null_patch, std=cfg.init_std)
        self.entropy = EntropyModel(cfg.entropy_n_layer, cfg.entropy_n_head, cfg.entropy_d_model, cfg.entropy_window,
                                    cfg.block_size)
        init_weights(self.entropy, cfg.entropy_n_layer, cfg.init_std)
        self.entropy.requires_grad_(False)
        # why the entropy model has no weights yet (None: it has them); a BLT checkpoint's state brings them
        self.entropy_missing = None if cfg.entropy_model == "random" else self._load_entropy_model(cfg.entropy_model)
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "entropy_missing", None))

    def _load_entropy_model(self, path: str) -> str | None:
        """Load the entropy model's weights from its checkpoint; or say why not. Evaluation and
        sampling rebuild the model from a BLT checkpoint, which holds them: the file may be gone."""
        if not Path(path).is_file():
            return f"model.entropy_model: {path} not found; the BLT model needs its trained entropy model"
        other = EntropyModel.from_checkpoint(path, self.cfg.block_size)
        cfg = self.cfg
        got = (len(other.transformer.blocks), other.transformer.n_head, other.embed.embedding_dim, other.window)
        want = (cfg.entropy_n_layer, cfg.entropy_n_head, cfg.entropy_d_model, cfg.entropy_window)
        if got != want:
            return (f"{path} has (layers, heads, d_model, block_size) {got} but model.entropy_n_layer, "
                    f"entropy_n_head, entropy_d_model, entropy_window say {want}")
        self.entropy.load_gpt_state(other.state_dict(), path)
        return None

    @property
    def side_inputs(self) -> dict[str, str]:
        """Per-byte files the trainer reads beside each split and passes to forward (training only)."""
        return {"entropies": self.cfg.entropy_file} if self.cfg.entropy_file else {}

    def extra_train_flops(self, tokens_per_step: int) -> int:
        """The patcher's forward FLOPs per training step when a side file stands in for it (the
        trainer adds them to the counted FLOPs, so a FLOP budget pays for patching either way;
        without a side file the entropy model runs inside forward and is counted there)."""
        return int(self.frozen_flops_per_token() * tokens_per_step) if self.cfg.entropy_file else 0

    def frozen_flops_per_token(self) -> float:
        """Forward FLOPs per byte of the entropy model over a full window (FlopCounterMode, which
        counts attention as full): what patching costs when it runs (evaluation, generation,
        training without a side file), and what precomputed side files save in training."""
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(1, self.cfg.block_size, dtype=torch.long, device=self.null_patch.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.entropy.entropies(x)
        return counter.get_total_flops() / self.cfg.block_size

    def starts(self, x: torch.Tensor, entropies: torch.Tensor | None = None) -> torch.Tensor:
        """Patch starts s [B, T+1] for inputs x [B, T]: s[:, t] for t < T says byte t starts a
        patch, s[:, T] whether the next byte would. `entropies` [B, T+1] are H of x (side file)."""
        if entropies is None:
            with torch.no_grad():
                h = self.entropy.entropies(x)
            entropies = torch.cat([h[:, :1], h], dim=1)  # H[0] := H[1] (no context)
        else:
            entropies = torch.cat([entropies[:, 1:2], entropies[:, 1:]], dim=1).float()
        return patch_starts(entropies, self.cfg.patching, self.cfg.entropy_threshold, self.cfg.max_patch_len)

    def memory_slots(self, glob_out: torch.Tensor) -> torch.Tensor:
        """[null, patches...] [B, S, D_global] -> decoder slots [B, S, k, d_local]."""
        return self.up(glob_out).view(*glob_out.shape[:2], self.cfg.cross_attn_k, self.cfg.d_local)

    def _run(self, x: torch.Tensor, entropies: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits [B, T, 256] for byte ids x [B, T], and the metrics."""
        if self.entropy_missing:  # also with side-file entropies: validation and checkpoints need the model
            raise BLTError(self.entropy_missing)
        B, T = x.shape
        P = self.max_patches
        s = self.starts(x, entropies)
        pid, read = patch_index(s, P)
        h = self.encoder(self.embed(x))
        patches = self.pool(h, pid, P + 1)[:, :P]  # slot P collects the bytes past the cap
        g = self.glob(self.down(patches))
        memory = torch.cat([self.null_patch.to(g.dtype).expand(B, 1, -1), g], dim=1)
        out = self.decoder(h, self.memory_slots(memory), read)
        per_patch, cap_hit, past_cap = cap_metrics(s[:, :T].sum(1).float(), pid, P, B * T)
        metrics = {"bytes_per_patch": per_patch, "patch_cap_hit": cap_hit, "bytes_past_cap": past_cap}
        return self.head(self.norm(out)), metrics

    def forward(self, idx: torch.Tensor, entropies: torch.Tensor | None = None) -> ModelOutput:
        """idx [B, T+1] byte ids; entropies [B, T+1] H of each byte of idx, from a side file (training
        only; the last one, H of the last target, decides whether that target starts a patch)."""
        inputs, targets = idx[:, :-1], idx[:, 1:]
        logits, metrics = self._run(inputs, entropies)
        nll = F.cross_entropy(at_least_fp32(logits.flatten(0, 1)), targets.flatten(), reduction="none")
        nll = nll.view_as(targets)
        return ModelOutput(nll.mean(), nll, metrics)

    def next_logprobs(self, idx: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, T, 256] of the next byte after each position of idx [B, T]."""
        return F.log_softmax(at_least_fp32(self._run(idx)[0]), dim=-1)

    def new_decoder(self, prompt: torch.Tensor) -> CachedDecoder:
        """All rows decode together with KV caches (`CachedDecoder`)."""
        return CachedDecoder(self, prompt)


def check_config(cfg: BLTConfig) -> None:
    if cfg.vocab_size != 256:
        raise BLTError("model.vocab_size must be 256: BLT reads bytes")
    if cfg.patching not in PATCHING_MODES:
        raise BLTError(f"model.patching: unknown '{cfg.patching}' (one of {', '.join(PATCHING_MODES)})")
    if cfg.entropy_threshold is None:
        raise BLTError("model.entropy_threshold is not set: calibrate it with data_prep/entropy_patches.py "
                       "--target-bytes-per-patch P and pass model.entropy_threshold=θ, or "
                       "model.target_bytes_per_patch=P for train.py to read θ from the data folder")
    if not cfg.entropy_model:
        raise BLTError("model.entropy_model: give the checkpoint of a trained byte GPT (configs/entropy_gpt.yaml), "
                       "or 'random' for an untrained one")
    if cfg.hash_ngrams and (not cfg.hash_sizes or min(cfg.hash_sizes) < 1 or cfg.hash_vocab < 1):
        raise BLTError("model.hash_sizes must be n-gram lengths >= 1 and model.hash_vocab >= 1")
    if cfg.max_patch_len < 0 or cfg.cross_attn_k < 1:
        raise BLTError("model.max_patch_len must be >= 0 and model.cross_attn_k >= 1")


class CachedDecoder(GroupedDecoder):
    """Incremental decoding of a batch (`GroupedDecoder`): KV caches for the entropy model, the
    encoder and the decoder (all rows advance together) and the global transformer (each row at
    its own patch count). A patch enters the global transformer when the entropy after its last
    byte says the next byte starts a new one."""

    def __init__(self, model: BLT, ids: torch.Tensor):
        super().__init__(model, ids, model.cfg.block_size, model.max_patches, BLTError)

    def prefill(self, ids: torch.Tensor) -> None:
        m, cfg, P = self.model, self.model.cfg, self.model.max_patches
        B, T = ids.shape
        self.ids = ids
        self.ent_cache = self.new_cache(m.entropy.transformer, B, cfg.block_size)
        self.enc_cache = self.new_cache(m.encoder, B, cfg.block_size)
        self.dec_cache = self.new_cache(m.decoder.stack, B, cfg.block_size)
        self.main, self.main_cache = m.glob, self.new_cache(m.glob, B, P)
        ent = m.entropy.entropies(ids, self.ent_cache)
        s = patch_starts(torch.cat([ent[:, :1], ent], dim=1), cfg.patching, cfg.entropy_threshold, cfg.max_patch_len)
        pid, read = patch_index(s, P)
        self.h = torch.zeros(B, cfg.block_size, cfg.d_local, device=ids.device, dtype=m.null_patch.dtype)
        self.h[:, :T] = m.encoder(m.embed(ids), self.enc_cache)
        rows = torch.arange(B, device=ids.device)
        patches = m.down(m.pool(self.h[:, :T], pid, P + 1)[:, :P])
        g = rows_step(m.glob, self.main_cache, patches, rows, torch.arange(P, device=ids.device).expand(B, P))
        slots = m.memory_slots(torch.cat([m.null_patch.expand(B, 1, -1), g], dim=1))
        out = m.decoder(self.h[:, :T], slots, read, self.dec_cache)
        self.logits = m.head(m.norm(out[:, -1]))
        self.slots = slots[rows, read[:, -1]][:, None]  # [B, 1, k, d_local]: what the next byte reads
        self.n_groups = read[:, -1]  # patches in the global transformer, per row
        self.open_from = group_first(s)[:, -1]
        self.last_ent = ent[:, -1]

    def encode(self, t: int) -> torch.Tensor:
        m, cfg = self.model, self.model.cfg
        x = self.ids[:, -1:]
        context = self.ids[:, max(0, t - max(cfg.hash_sizes) + 1) : t] if cfg.hash_ngrams else None
        self.ent = m.entropy.entropies(x, self.ent_cache)[:, 0]
        self.h[:, t] = m.encoder(m.embed(x, context), self.enc_cache)[:, 0]
        return self.h[:, t : t + 1]

    def closes(self, h: torch.Tensor, t: int) -> torch.Tensor:
        cfg = self.model.cfg
        return next_start(self.ent, self.last_ent, t + 1 - self.open_from, cfg.patching, cfg.entropy_threshold,
                          cfg.max_patch_len)

    def pool_open(self, rows: torch.Tensor, h: torch.Tensor, t: int) -> torch.Tensor:
        """Each closing row's patch: its last bytes; the ones before it go to a discarded slot."""
        span = int((t + 1 - self.open_from[rows]).max())
        pos = torch.arange(t + 1 - span, t + 1, device=h.device)
        pid = (pos[None] < self.open_from[rows, None]).long()
        return self.model.down(self.model.pool(self.h[rows, t + 1 - span : t + 1], pid, 2)[:, :1])

    def take_groups(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        self.slots[rows] = self.model.memory_slots(out)

    def close_open(self, closes: torch.Tensor, t: int) -> None:
        self.open_from = torch.where(closes, t + 1, self.open_from)
        self.last_ent = self.ent

    def decode(self, h: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        m = self.model
        out = m.decoder(h, self.slots, torch.zeros_like(self.ids[:, -1:]), self.dec_cache)
        return m.head(m.norm(out[:, -1]))
