"""LoRA (Hu et al. 2021) with rsLoRA (Kalajdzievski 2023), DoRA (Liu et al. 2024), LoRA+ (Hayou et al.
2024) and the initialisations PiSSA (Meng et al. 2024), OLoRA (Büyükakyüz 2024) and LoftQ (Li et al.
2023).

h = W x + s * B A x, with A (r x in) Kaiming-uniform (or Gaussian), B (out x r) zero, and
s = alpha / r (or alpha / sqrt(r) with rsLoRA). DoRA rescales the merged direction per output:
W' = m * (W + ΔW) / ||W + ΔW||, m initialised to ||W + ΔW|| at init (row norms; ||W|| when ΔW
starts at zero), the norm not back-propagated (as in the DoRA paper, section 4.3, and peft). Works on
nn.Linear, GPT-2's Conv1D and nn.Embedding. ``rank_pattern`` / ``alpha_pattern`` give single modules
their own r / alpha, matched as peft does (a regex matching the end of the module path, first match
wins), so peft checkpoints carry over.

Initialisations that read the pretrained weight W (Linear / Conv1D only; r <= min(in, out)):

- ``pissa`` (PiSSA, section 3): W = U S V^T; A = S_r^(1/2) V_r^T / sqrt(s), B = U_r S_r^(1/2) / sqrt(s),
  so s B A = U_r S_r V_r^T, the principal part, and the residual W - s B0 A0 is the frozen base.
  ``pissa_niter_N``: the same from ``torch.svd_lowrank(W, q=r, niter=N)`` (the paper's fast SVD,
  section 4.5). As peft's ``pissa_init`` (peft/tuners/lora/layer.py), whose products this repeats
  so that peft's and our A, B agree bit for bit.
- ``olora`` (OLoRA, section 3): W = Q R (reduced QR); B = Q[:, :r], A = R[:r, :]; the residual
  W - s B0 A0 is the frozen base. As peft's ``olora_init`` (written by the paper's author): no
  division by s, so s B0 A0 is s times the QR part.
- ``loftq`` (LoftQ, Algorithm 1) on a base this init quantizes itself: with B0 A0 = 0, T =
  ``loftq_iter`` times: Q = nf4(W - s B A), then (B, A) = the best rank-r s-scaled approximation of
  W - Q (truncated SVD, S^(1/2) on each side, divided by sqrt(s)), so that Q + s B A ≈ W (peft's
  ``loftq_init`` leaves out the 1/s: peft issue #1982; with s != 1 its Q + s B A is off by s).
  Each target's weight becomes NF4 (deltatune.quantize's format: block 64, double-quantized scales
  in blocks of 256, computing in the weight's dtype), Q in place of nf4(W): the base it needs. Not
  identity: the model starts at Q + s B A, ||W - (Q + s B A)||_F below QLoRA's ||W - nf4(W)||_F
  (benchmarks/loftq_error.py, MiniLM query / value, r = 8: 0.0933 of ||W||_F for QLoRA, 0.0892 /
  0.0862 / 0.0828 for T = 1 / 2 / 5; r = 16: 0.0855 / 0.0811 / 0.0767).

PiSSA and OLoRA are identity at init in function, not in split: the model computes W x at init, but
the frozen part is now the residual W - s B0 A0 and the trainable factors hold the principal (QR)
part, so training moves the top directions of W instead of adding a zero-initialised update.

How PiSSA and OLoRA keep the base: not by writing the residual into it (peft does). The base weight
stays W; the layer holds the initial factors B0, A0 (frozen, saved with the delta: the rank-r
tensors once more on disk) and computes W x + s B A x - s B0 A0 x = (W - s B0 A0) x + s B A x,
PiSSA's function with PiSSA's gradients (the subtracted term is constant). At init the two products
are the same numbers, so the output is the base's bit for bit; disabling, removing or unwrapping the
delta gives the pretrained model, other deltas on the module see W, and a saved delta loads onto a
fresh pretrained base with the same logits bit for bit (B0, A0 are read from the file, not
recomputed). With dropout, B A sees the dropped-out input and B0 A0 the plain one (peft's residual
base sees the plain input). Merging adds s (B A - B0 A0). Cost: B0 A0 x once more per forward
(no gradient of its own), 2 r (in + out) numbers of memory per module. On a quantized base
(deltatune.quantize before or after), B0 A0 come from the dequantized weight and the base stays
nf4(W), not PiSSA's nf4(W - s B0 A0) (QPiSSA): the start is QLoRA's; for a quantized start closer to
W, use ``loftq``. peft: init_lora_weights="pissa" / "olora" files hold A, B (peft rebuilds B0 A0 from
the pretrained base at load, as deltatune does); what peft cannot rebuild (the randomized SVD, OLoRA
on Conv1D) is written as peft's converted plain LoRA [A; A0], [B, -B0] of rank 2r (interop/peft_methods.py).

How LoftQ keeps its base: the NF4 codes of Q are part of the delta's state (``loftq_*`` tensors per
module: half a byte per weight plus the block scales, ~1/8 of the fp32 weight), so that loading onto
a fresh pretrained (dense) base puts the very same Q there, whatever SVD a machine computes. The
targets stay quantized when the delta is removed (as after ``deltatune.quantize``). A LoftQ delta is
made on the dense model (it needs W): ``deltatune.quantize(dm)`` afterwards quantizes the rest.

LoRA+ (section 4): B trains at ``lr_ratio`` times A's learning rate (``lr_scales``, honoured by
``dm.optimizer_groups(lr)`` and the bench); 1 is plain LoRA. peft's ``create_loraplus_optimizer``
also puts 1-D parameters (DoRA's magnitude) in B's group and embeddings at a fixed 1e-6; here only
B is scaled, for embeddings too.
"""
from __future__ import annotations

from typing import ClassVar

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.layer import DeltaLayer
from ..core.registry import register
from ..errors import CheckpointError, ConfigError
from ..quant import is_quantized, nf4
from . import _lora_merge
from ._weights import LowRankLayer, dense_weight, module_dims, stored_layout, weight_out_in, writable_weight

INITS = ("kaiming", "gaussian", "pissa", "olora", "loftq")  # and "pissa_niter_<N>"
FROM_WEIGHT = ("pissa", "olora", "loftq")  # the inits that read the pretrained weight
_NITER = re.compile(r"pissa_niter_(0|[1-9][0-9]*)")
LOFTQ_BLOCK, LOFTQ_SCALER_BLOCK = 64, 256  # deltatune.quantize's NF4 defaults (QLoRA's)


@dataclass
class LoRAConfig(DeltaConfig):
    """init: "kaiming" | "gaussian" (A ~ N(0, 1/r)) with B zero, or "pissa" | "pissa_niter_<N>" |
    "olora" | "loftq" (from the pretrained weight: see the module docstring). loftq_iter: LoftQ's
    alternations T (init="loftq"). lr_ratio: LoRA+'s learning rate of B over A's (1: plain LoRA)."""
    method: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "kaiming"
    rank_pattern: dict[str, int] | None = None     # {regex on module path: r}, e.g. {"layer.0.*query": 4}
    alpha_pattern: dict[str, float] | None = None  # {regex on module path: alpha}
    loftq_iter: int = 1
    lr_ratio: float = 1.0

    def validate(self) -> None:
        super().validate()
        self.check_range("r", 0, low_open=True, integer=True)
        self.check_range("alpha", 0, low_open=True)
        self.check_range("dropout", 0.0, 1.0, high_open=True)
        if not isinstance(self.init, str) or (self.init not in INITS and not _NITER.fullmatch(self.init)):
            self._fail("init", self.init, f"one of {', '.join(map(repr, INITS))} or 'pissa_niter_<N>' "
                                          f"(N >= 0 randomized-SVD iterations, e.g. 'pissa_niter_4')")
        self.check_choice("rslora", (True, False))
        self.check_choice("dora", (True, False))
        self._check_pattern("rank_pattern", integer=True)
        self._check_pattern("alpha_pattern", integer=False)
        self.check_range("loftq_iter", 1, integer=True)
        if self.loftq_iter != 1 and self.init != "loftq":
            self._fail("loftq_iter", self.loftq_iter, f"1 unless init='loftq' (init={self.init!r} does "
                                                      f"not alternate quantization and SVD)")
        self.check_range("lr_ratio", 0, low_open=True)

    def _check_pattern(self, name: str, integer: bool) -> None:
        patterns = getattr(self, name)
        if patterns is None:
            return
        kind = "positive integers" if integer else "positive numbers"
        if not isinstance(patterns, dict):
            self._fail(name, patterns, f"a dict {{module-path regex: value}} of {kind}")
        for key, value in patterns.items():
            ok = isinstance(value, int) if integer else isinstance(value, (int, float))
            if not isinstance(key, str) or isinstance(value, bool) or not ok or value <= 0:
                self._fail(name, patterns, f"a dict {{module-path regex: value}} of {kind}")
            try:
                re.compile(key)
            except re.error as e:
                self._fail(name, patterns, f"valid regexes ({key!r}: {e})")

    @property
    def init_kind(self) -> str:
        """The init without its options: "pissa" for "pissa_niter_<N>" too."""
        return "pissa" if _NITER.fullmatch(self.init) else self.init

    @property
    def svd_niter(self) -> int | None:
        """N of "pissa_niter_<N>" (randomized SVD); None for the exact SVD."""
        m = _NITER.fullmatch(self.init)
        return int(m.group(1)) if m else None

    @property
    def scaling(self) -> float:
        return self.scaling_for(self.r, self.alpha)

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / (math.sqrt(r) if self.rslora else r)

    def rank_alpha(self, path: str) -> tuple[int, float]:
        """r and alpha of the module at `path`: the first matching pattern, else the defaults."""
        return (_pattern_value(self.rank_pattern, path, self.r),
                _pattern_value(self.alpha_pattern, path, self.alpha))


def _pattern_value(patterns: dict | None, path: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def check_init(cfg: LoRAConfig, path: str, module: nn.Module, r: int) -> None:
    """Refuse a module that `cfg.init` cannot start from (before any layer is built)."""
    kind = cfg.init_kind
    if kind not in FROM_WEIGHT:
        return
    if isinstance(module, nn.Embedding):
        raise ConfigError(f"init={cfg.init!r} factorizes Linear / Conv1D weights, not the embedding "
                          f"{path}: exclude embeddings from targets or use init='kaiming' / 'gaussian'.")
    d_in, d_out = module_dims(module)
    if r > min(d_in, d_out):
        raise ConfigError(f"init={cfg.init!r} takes r directions of {path}'s {d_out} x {d_in} weight, "
                          f"but r={r}: use r <= {min(d_in, d_out)} for it (rank_pattern).")
    if kind != "loftq":
        return
    if is_quantized(module.weight):
        raise ConfigError(f"init='loftq' needs the full-precision weight of {path}, which is quantized "
                          f"already: wrap the dense model with init='loftq' (it quantizes its targets "
                          f"itself), then deltatune.quantize(dm) for the rest.")
    if type(module) not in nf4.QUANTIZED_CLASS or not nf4.fits(module, LOFTQ_BLOCK):
        raise ConfigError(f"init='loftq' stores {path} ({type(module).__name__}, {module.weight.numel()} "
                          f"values) in NF4 blocks of {LOFTQ_BLOCK}: it fits plain Linear / Conv1D "
                          f"weights whose size is a multiple of {LOFTQ_BLOCK}; exclude it from targets.")


def _split(residual: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with s B A the best rank-r approximation of `residual` (S^(1/2) on each side)."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return u[:, :r] * root, root[:, None] * vh[:r]


class LoRALayer(LowRankLayer):
    """s B A on top of the shared low-rank layer: down = s A x, up = B h; lookups on embeddings;
    DoRA's per-row magnitude, which changes the forward and the merge; PiSSA / OLoRA's initial
    factors B0, A0 (buffers, None otherwise), subtracted; LoftQ's quantized base (``loftq_*``)."""

    def __init__(self, module: nn.Module, cfg: LoRAConfig, r: int | None = None, alpha: float | None = None):
        super().__init__(cfg.dropout)
        r = cfg.r if r is None else r
        alpha = cfg.alpha if alpha is None else alpha
        d_in, d_out = module_dims(module)
        w = module.weight
        self.embedding = isinstance(module, nn.Embedding)
        self.scaling = cfg.scaling_for(r, alpha)
        self.lora_A = nn.Parameter(torch.empty(r, d_in, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, dtype=w.dtype, device=w.device))
        self.register_buffer("lora_A0", None)  # PiSSA / OLoRA: the principal part taken out of W
        self.register_buffer("lora_B0", None)
        self._quantized: list[nn.Module] = []  # LoftQ: the module whose NF4 weight it made (no submodule)
        self._folded = False  # merged (LoftQ: its quantized base then holds the merge, not Q)
        kind = cfg.init_kind
        if kind in FROM_WEIGHT and self.embedding:
            raise ConfigError(f"init={cfg.init!r} factorizes Linear / Conv1D weights, not embeddings: "
                              f"exclude them from targets or use init='kaiming' / 'gaussian'.")
        if self.embedding:  # as peft: A zero, B normal, so that lookups start at zero
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        elif kind == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        elif kind == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            with torch.no_grad():
                if kind == "loftq":
                    self._init_loftq(module, cfg.loftq_iter)
                else:
                    self._init_principal(module, cfg)
        if cfg.dora:
            if self.embedding:
                raise ConfigError("DoRA supports Linear and Conv1D modules, not Embedding: "
                                  "exclude embeddings from targets or set dora=False.")
            with torch.no_grad():
                w = dense_weight(module)
                self.magnitude = nn.Parameter((w + self.update().to(w.dtype)).norm(dim=1))
        else:
            self.magnitude = None
        self._merged_norm: torch.Tensor | None = None

    # -- initialisations from the weight ------------------------------------------------------------
    def _init_principal(self, module: nn.Module, cfg: LoRAConfig) -> None:
        """PiSSA (exact or randomized SVD) or OLoRA (QR); B0, A0 keep the initial factors."""
        w = dense_weight(module).detach().float()
        r = self.lora_A.shape[0]
        if cfg.init_kind == "olora":
            q, upper = torch.linalg.qr(w)
            b, a = q[:, :r], upper[:r]
        else:
            niter = cfg.svd_niter
            if niter is None:
                v, s, uh = torch.linalg.svd(w, full_matrices=False)
                v, s, uh = v[:, :r], s[:r], uh[:r]
            else:
                v, s, u = torch.svd_lowrank(w, q=r, niter=niter)
                uh = u.t()
            root = torch.sqrt(s / self.scaling)
            a = torch.diag(root) @ uh  # peft's products: the same numbers as its pissa_init
            b = v @ torch.diag(root)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        self.lora_A0 = self.lora_A.detach().clone()
        self.lora_B0 = self.lora_B.detach().clone()

    def _init_loftq(self, module: nn.Module, iters: int) -> None:
        """LoftQ's alternation; the module's weight becomes the NF4 Q of the last iteration."""
        stored = module.weight.detach()
        w = weight_out_in(module).detach().float()
        r = self.lora_A.shape[0]
        b = a = None
        for _ in range(iters):
            target = w if b is None else w - (b @ a) * self.scaling
            q = nf4.to_nf4(stored_layout(module, target).to(stored.dtype), LOFTQ_BLOCK, LOFTQ_SCALER_BLOCK)
            b, a = _split(w - stored_layout(module, nf4.dequantize_nf4(q)).float(), r, self.scaling)
        module.weight = nn.Parameter(stored_layout(module, target).to(stored.dtype).contiguous(),
                                     requires_grad=False)
        nf4.quantize_module(module, LOFTQ_BLOCK, LOFTQ_SCALER_BLOCK, None)  # the same Q, installed
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        self._quantized = [module]

    # -- LoftQ's quantized base in the delta's state ------------------------------------------------
    def _base_codes(self) -> dict[str, torch.Tensor]:
        """The packed NF4 tensors of the base this LoftQ layer made (none once merged or dequantized)."""
        if not self._quantized or self._folded or not is_quantized(self._quantized[0].weight):
            return {}
        w = self._quantized[0].weight
        names, _ = w.__tensor_flatten__()
        return {f"loftq_{n}": getattr(w, n) for n in names if n != "nf4"}  # nf4: the constant level table

    def loftq_base_lost(self) -> bool:
        """Whether this LoftQ layer's base no longer holds its Q (dequantized, or merged into): its
        codes, which loading onto a pretrained base needs, cannot be saved any more."""
        return bool(self._quantized) and not self._base_codes()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, t in self._base_codes().items():
            destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name, t in self._base_codes().items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict.pop(key)
            if tuple(value.shape) != tuple(t.shape) or value.dtype != t.dtype:
                error_msgs.append(f"{key}: {tuple(value.shape)} {value.dtype} in the state, "
                                  f"{tuple(t.shape)} {t.dtype} in the quantized base")
                continue
            with torch.no_grad():
                t.copy_(value)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- the update ---------------------------------------------------------------------------------
    def update(self) -> torch.Tensor:
        """s * (B A - B0 A0) as (out, in)."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        if self.lora_A0 is not None:
            delta = delta - (self.lora_B0 @ self.lora_A0) * self.scaling
        return delta

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') with ΔW = B' A' exactly as factors: (A, s B), or ([A; A0], [s B, -s B0])."""
        if self.lora_A0 is None:
            return self.lora_A, self.lora_B * self.scaling
        return (torch.cat([self.lora_A, self.lora_A0]),
                torch.cat([self.lora_B * self.scaling, -self.lora_B0 * self.scaling], dim=1))

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.lora_A) * self.scaling

    def up(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.lora_B)

    def initial(self, x: torch.Tensor) -> torch.Tensor:
        """s B0 A0 x: what PiSSA / OLoRA took out of the base (the same ops as ``up(down(x))``)."""
        return F.linear(F.linear(x, self.lora_A0) * self.scaling, self.lora_B0)

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding:  # token ids, not features: look up A's columns (no dropout on ids)
            return F.embedding(x, self.lora_A.T) @ self.lora_B.T * self.scaling
        out = super().low_rank(x)
        return out if self.lora_A0 is None else out - self.initial(x)

    def post(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.magnitude is None:
            return super().post(module, x, y)
        return y + self._dora(module, x, y)

    def _dora(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to y = W x + bias. As peft, on the base W_r = W - s B0 A0 (W_r = W without
        B0, A0): (W_r x - W x) + (scale - 1) W_r x_d + scale s B A x_d, with scale = m / ||W_r + s B A||
        per row and x_d the dropped-out input (x itself without dropout)."""
        w = dense_weight(module)
        norm = (w + self.update().to(w.dtype)).norm(dim=1).detach()
        scale = self.magnitude / norm
        if self.dropout is None:
            bias = getattr(module, "bias", None)
            base = y - bias if bias is not None else y
            xd = x
        else:
            xd = self.dropout(x)
            base = F.linear(xd, w)
        out = (scale - 1) * base + scale * self.up(self.down(xd))
        if self.lora_A0 is not None:
            out = out - self.initial(x) - (scale - 1) * self.initial(xd)
        return out

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        if self.magnitude is None:
            super().merge(module)
        else:
            w = writable_weight(module)
            new = w + self.update().to(w.dtype)
            self._merged_norm = new.norm(dim=1)
            w.copy_(new * (self.magnitude / self._merged_norm).unsqueeze(1))
        self._folded = True

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        if self.magnitude is not None and self._merged_norm is not None:
            w = writable_weight(module, "unmerge from")
            w.copy_(w * (self._merged_norm / self.magnitude).unsqueeze(1))
            self._merged_norm = None
        super().unmerge(module)
        self._folded = False


def _tied(model: nn.Module) -> set[int]:
    """ids of parameters that several modules share (GPT-2's wte = lm_head)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


class LoRADelta(Delta):
    config_cls = LoRAConfig

    default_roles = ("query", "value")
    supported_types = (nn.Linear, Conv1D, nn.Embedding)

    def build(self, model: nn.Module) -> None:
        tied = _tied(model) if self.config.init_kind == "loftq" else set()
        for path, module in self.targets(model):
            if id(getattr(module, "weight", None)) in tied:
                raise ConfigError(f"init='loftq' would quantize {path}.weight, which is tied to another "
                                  f"module's weight (quantizing it unties them): exclude {path} from targets.")
            self.add_layer(path, self.make_layer(path, module))

    def make_layer(self, path: str, module: nn.Module) -> DeltaLayer:
        r, alpha = self.config.rank_alpha(path)
        check_init(self.config, path, module, r)
        return LoRALayer(module, self.config, r, alpha)

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """The saved tensors; refused for a LoftQ delta whose quantized base Q is gone (a file
        without Q's codes would load onto Q recomputed by another SVD, or not load at all)."""
        lost = [key for key, layer in self.layers.items() if isinstance(layer, LoRALayer) and layer.loftq_base_lost()]
        if lost:
            raise CheckpointError(
                f"delta {self.name!r} (init='loftq') cannot be saved: the NF4 base Q it quantized at "
                f"{len(lost)} module(s) was dequantized or merged into (deltatune.dequantize / "
                f"merge_quantized), and a load onto the pretrained model needs Q's codes. Save the delta "
                f"before dequantizing or merging it; a merged model is saved as a whole model.")
        return super().delta_state_dict()

    def lr_scales(self) -> dict[str, float]:
        """LoRA+: every trainable B at ``lr_ratio`` times the learning rate (A and the rest at 1)."""
        ratio = self.config.lr_ratio
        if ratio == 1:
            return {}
        return {n: float(ratio) for n, p in self.named_parameters() if n.endswith(".lora_B") and p.requires_grad}

    @classmethod
    def weighted(cls, name, deltas, weights, model, how="linear", **options):
        """linear (exact factor concatenation), svd, ties or dare: see methods/_lora_merge.py."""
        return _lora_merge.weighted(cls, LoRALayer, name, deltas, weights, model, how=how, **options)


register("lora", LoRAConfig, LoRADelta, family="reparameterized", lr=5e-3, paper="Hu et al. 2021 (LoRA); "
         "Kalajdzievski 2023 (rsLoRA); Liu et al. 2024 (DoRA); Hayou et al. 2024 (LoRA+); Meng et al. "
         "2024 (PiSSA); Büyükakyüz 2024 (OLoRA); Li et al. 2023 (LoftQ)")
