"""The delta-tuning papers' claims, checked against one run's numbers: supports, contradicts, or
cannot tell.

A claim "A > B" is decided by the paired 95% interval of A - B (`compare`): above 0 supports it,
below 0 contradicts it, containing 0 cannot tell (the run's noise is as large as the
difference). "A ≈ B" (convergence) is supported only when that interval lies within one dev
evaluation interval of 0 (the curve's resolution: closer than that the run cannot measure), is
contradicted when it excludes 0, and cannot tell otherwise. Nothing is decided from point
estimates alone, so a run too small to separate two methods says so instead of ranking them.

Claims (Ding et al. 2023, "Parameter-efficient fine-tuning of large-scale pre-trained language
models", Nature Machine Intelligence; its Table 2 for the combinations):
performance full > LoRA > adapter > prefix > prompt; convergence full > adapter ≈ LoRA > prefix >
prompt; delta tuning saves memory and time per step against full fine-tuning; adding prompt
tuning to adapter / BitFit lowered the GLUE average.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import compare as C
from .compare import Cells
from .stats import Interval, PairingError, paired_t

SUPPORTS, CONTRADICTS, CANNOT_TELL, NOT_MEASURED = "supports", "contradicts", "cannot tell", "not measured"
PERFORMANCE = ("full", "lora", "adapter", "prefix", "prompt")
REPRESENTATIVE = ("lora", "adapter", "prefix", "prompt")
# (faster, slower, relation) in steps to a fraction of full's score
CONVERGENCE = (("full", "adapter", ">"), ("full", "lora", ">"), ("adapter", "lora", "≈"),
               ("adapter", "prefix", ">"), ("lora", "prefix", ">"), ("prefix", "prompt", ">"))
# (with prompt tuning added, without)
COMBINATIONS = (({"adapter", "prompt"}, {"adapter"}), ({"bitfit", "prompt"}, {"bitfit"}),
                ({"adapter", "bitfit", "prompt"}, {"adapter", "bitfit"}))


@dataclass
class Finding:
    claim: str
    verdict: str
    checks: list[str] = field(default_factory=list)  # one line per comparison behind the verdict


def components(label: str) -> frozenset[str]:
    """The method names in a spec label: ``prompt+adapter:r=4`` -> {prompt, adapter}."""
    return frozenset(part.split(":", 1)[0].strip() for part in label.split("+"))


def resolve(methods: list[str], names: set[str] | str) -> str | None:
    """The run's label for a method (or combination, order-free); the plain label when several
    variants ran (``prefix`` over ``prefix:lr=1e-3``)."""
    want = frozenset({names} if isinstance(names, str) else names)
    hits = [m for m in methods if components(m) == want]
    plain = [m for m in hits if ":" not in m]
    return (plain or hits or [None])[0]


def verdict_of(iv: Interval, relation: str = ">", margin: float = 0.0) -> str:
    """The verdict on "difference > 0" (``>``) or "difference ≈ 0 within ±margin" (``≈``)."""
    if not iv.has_interval:
        return CANNOT_TELL
    side = iv.excludes(0.0)
    if relation == "≈":
        if side:
            return CONTRADICTS
        return SUPPORTS if -margin <= iv.low and iv.high <= margin else CANNOT_TELL
    return {1: SUPPORTS, -1: CONTRADICTS, 0: CANNOT_TELL}[side]


def overall(verdicts: list[str]) -> str:
    """A chain of comparisons: contradicted by any contradiction, supported only by all."""
    measured = [v for v in verdicts if v != NOT_MEASURED]
    if not measured:
        return NOT_MEASURED
    if CONTRADICTS in measured:
        return CONTRADICTS
    return SUPPORTS if all(v == SUPPORTS for v in measured) and len(measured) == len(verdicts) else CANNOT_TELL


def _fmt(iv: Interval, scale: float, unit: str = "") -> str:
    if not iv.has_interval:
        return f"{iv.mean * scale:+.1f}{unit} (no interval: one seed)"
    return f"{iv.mean * scale:+.1f}{unit} [{iv.low * scale:+.1f}, {iv.high * scale:+.1f}]"


def _check(name: str, fn: Callable[[], Interval], judge: Callable[[Interval], str], scale: float,
           unit: str = "") -> tuple[str, str]:
    try:
        iv = fn()
    except PairingError as e:
        return NOT_MEASURED, f"{name}: not measured ({e})"
    v = judge(iv)
    return v, f"{name}: {_fmt(iv, scale, unit)}: {v}"


def performance(c: Cells, methods: list[str], tasks: list[str]) -> Finding:
    labels = [resolve(methods, m) for m in PERFORMANCE]
    out = Finding("Performance: full > LoRA > adapter > prefix > prompt (average dev score, x100)", NOT_MEASURED)
    verdicts = []
    for (a, la), (b, lb) in zip(zip(PERFORMANCE, labels), zip(PERFORMANCE[1:], labels[1:])):
        if la is None or lb is None:
            verdicts.append(NOT_MEASURED)
            out.checks.append(f"{a} > {b}: not measured (not in this run)")
            continue
        v, line = _check(f"`{la}` − `{lb}`", lambda: C.difference(c, la, lb, tasks), verdict_of, 100)
        verdicts.append(v)
        out.checks.append(line)
    out.verdict = overall(verdicts)
    return out


def convergence(c: Cells, methods: list[str], tasks: list[str], eval_every: int,
                fraction: float = C.FRACTION) -> Finding:
    out = Finding(f"Convergence: full > adapter ≈ LoRA > prefix > prompt (steps to {fraction:.0%} of "
                  f"full's final score; ≈ means within ±{eval_every} steps, one evaluation)", NOT_MEASURED)
    verdicts = []
    for fast, slow, rel in CONVERGENCE:
        la, lb = resolve(methods, fast), resolve(methods, slow)
        if la is None or lb is None:
            verdicts.append(NOT_MEASURED)
            out.checks.append(f"{fast} {rel} {slow}: not measured (not in this run)")
            continue

        def diff(la: str = la, lb: str = lb) -> Interval:
            sa, sb = C.steps_to(c, la, tasks, fraction), C.steps_to(c, lb, tasks, fraction)
            return paired_t({s: v for s, (v, _) in sb.items()}, {s: v for s, (v, _) in sa.items()})

        v, line = _check(f"steps(`{lb}`) − steps(`{la}`)", diff,
                         lambda iv, rel=rel: verdict_of(iv, rel, eval_every), 1, " steps")
        verdicts.append(v)
        out.checks.append(line)
    out.verdict = overall(verdicts)
    return out


def savings(c: Cells, methods: list[str], tasks: list[str], cost: str) -> Finding:
    """Each delta method's cost over full's: the claim (over the four representative methods)
    holds when each one's ratio interval lies below 1; the other methods are listed too."""
    out = Finding(f"Efficiency: delta tuning saves {cost} against full fine-tuning (ratio to full; < 1 saves)",
                  NOT_MEASURED)
    if "full" not in methods:
        out.checks.append("not measured: no full fine-tuning in this run")
        return out
    rep = [resolve(methods, m) for m in REPRESENTATIVE]
    verdicts = [NOT_MEASURED for m in rep if m is None]
    for m in [m for m in methods if m != "full"]:
        try:
            iv = C.cost_ratio(c, m, tasks, cost)
        except PairingError as e:
            v, line = NOT_MEASURED, f"`{m}`: not measured ({e})"
        else:
            v = verdict_of(Interval(1 - iv.mean, 1 - iv.high, 1 - iv.low, iv.n, iv.how))  # saving > 0
            spread = f" [{iv.low:.2f}, {iv.high:.2f}]" if iv.has_interval else " (no interval: one seed)"
            line = f"`{m}`: {iv.mean:.2f}x{spread}: {v}"
        out.checks.append(line)
        if m in rep:
            verdicts.append(v)
    out.verdict = overall(verdicts)
    return out


def combinations(c: Cells, methods: list[str], tasks: list[str]) -> Finding:
    out = Finding("Combinations (Ding et al. 2023, Table 2): adding prompt tuning to adapter / BitFit "
                  "lowers the average score (x100)", NOT_MEASURED)
    verdicts = []
    for with_prompt, without in COMBINATIONS:
        la, lb = resolve(methods, with_prompt), resolve(methods, without)
        name = "+".join(sorted(without)) + " + prompt"
        if la is None or lb is None:
            out.checks.append(f"{name}: not measured (not in this run)")
            continue
        v, line = _check(f"`{la}` − `{lb}`", lambda la=la, lb=lb: C.difference(c, la, lb, tasks),
                         lambda iv: verdict_of(iv.scaled(-1)), 100)
        verdicts.append(v)
        out.checks.append(line)
    out.verdict = overall(verdicts)
    return out


def findings(c: Cells, methods: list[str], tasks: list[str], eval_every: int) -> list[Finding]:
    return [performance(c, methods, tasks), convergence(c, methods, tasks, eval_every),
            savings(c, methods, tasks, "memory"), savings(c, methods, tasks, "step time"),
            combinations(c, methods, tasks)]


def markdown(found: list[Finding]) -> list[str]:
    lines = ["Each claim of the delta-tuning papers against this run: a comparison decides only when "
             "its paired 95% interval excludes 0 (else: cannot tell).", ""]
    for f in found:
        lines.append(f"- **{f.claim}**: **{f.verdict}**")
        lines += [f"  - {c}" for c in f.checks]
    return lines
