"""Bits of facts a model stores, from its per-question answer losses (capacity_and_grokking.md §1.5, §3).

Stored bits = Σ over subjects a of  mult_a · N · max(0, H(a) − L(a))  +  S_name + S_date,
where H(a) is the prior entropy of subject a's answer (bits), L(a) the model's mean answer loss in bits
(summed over the answer's tokens and its EOS), N the number of profiles, and S_name, S_date the cost of
knowing which names and dates exist. A model with zero loss stores exactly the dataset entropy.

Schemes (EleutherAI's names):
  optimal         H(a) = log2(distinct realized values); S_name = log2 C(names space, N) exactly
  enumerate       as optimal, but the name set costs N · log2(names space) (a list, not a set)
  independent     relations cost log2(names space) and dates log2(date support); no selection terms
  2-hop-big-hash  two-hop answers stored per (person, relation, subject): mult = R
  2-hop-double    two-hop losses mapped to per-hop losses (p₂ = p² + (1 − p)/n) and relation facts
                  stored twice
  azl             Allen-Zhu & Li's R(F) numerator: N · (log2 S₀ − Σ_a L(a)), S₀ the product of the
                  value spaces; their name term is left out, as names are never generated in QA training

Against EleutherAI's implementation: a subject the model knows worse than the prior adds 0 bits, not
negative bits (the data could be coded with the prior for that subject instead); the selection
terms are the exact log-binomials, not n log n approximations, and are credited only as far as the
model's answers show it knows the name and date sets (`selection_share`; EleutherAI credits them to
every model, so an untrained one "stores" them); 2-hop-double's factor 2 applies to
relation subjects only (theirs stuck to every later subject); and the parameter count leaves out
unused embedding rows (Allen-Zhu & Li's convention), with the full count reported beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reasonlab.tasks.profiles import ATTRIBUTES, RELATIONS

SCHEMES = ("optimal", "enumerate", "independent", "2-hop-big-hash", "2-hop-double", "azl")
ONE_HOP_SCHEMES = ("optimal", "enumerate", "independent", "azl")
TWO_HOP_SCHEMES = ("optimal", "enumerate", "independent", "2-hop-big-hash", "2-hop-double")
LN2 = math.log(2)


def log2_binomial(n: float, k: float) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / LN2


def subjects(relations: int) -> list[str]:
    return [*ATTRIBUTES, *RELATIONS[:relations]]


def names_space(stats: dict) -> float:
    """Names the realized name parts could form."""
    return float(stats["distinct_first"]) * stats["distinct_middle"] * stats["distinct_last"]


def entropies(stats: dict, scheme: str) -> dict[str, float]:
    """Prior entropy in bits of each subject's answer."""
    out = {"birth_date": math.log2(stats["distinct_dates"])}
    for a in ATTRIBUTES[1:]:
        out[a] = math.log2(stats[f"distinct_{a}"])
    for r in RELATIONS[: stats["relations"]]:
        out[r] = math.log2(stats[f"distinct_{r}"])
    if scheme == "independent":
        out["birth_date"] = math.log2(stats["date_support"])
        for r in RELATIONS[: stats["relations"]]:
            out[r] = math.log2(names_space(stats))
    if scheme == "azl":  # the generator's value spaces
        out = {"birth_date": math.log2(stats["date_support"]),
               **{a: math.log2(stats[f"pool_{a}"]) for a in ATTRIBUTES[1:]},
               **{r: math.log2(stats["num_profiles"] - 1) for r in RELATIONS[: stats["relations"]]}}
    return out


def selection_bits(stats: dict, scheme: str) -> float:
    """Bits to know which names and which birth dates the dataset uses."""
    if scheme in ("independent", "azl"):
        return 0.0
    n = stats["num_profiles"]
    space = names_space(stats)
    names = n * math.log2(space) if scheme == "enumerate" else log2_binomial(space, n)
    return names + log2_binomial(stats["date_support"], stats["distinct_dates"])


def invert_two_hop_loss(loss_bits: float, n: float) -> float:
    """The per-hop loss −log2 p for which a two-hop answer is right with p² + (1 − p)/n, the chance
    of two correct hops or a lucky guess among n values."""
    if loss_bits >= math.log2(n):
        return math.log2(n)
    p2 = 2.0 ** -loss_bits
    p = (1 / n + math.sqrt(max(0.0, 1 / n**2 - 4 * (1 / n - p2)))) / 2
    return -math.log2(p)


@dataclass
class SubjectLoss:
    mean_bits: float
    var_bits: float  # variance of one question's loss
    count: int  # questions measured
    fraction: float = 1.0  # of the subject's questions; 1 means a census, without sampling error


@dataclass
class Capacity:
    scheme: str
    hops: int
    bits: float
    dataset_entropy: float
    ci95: float  # half-width of the 95% interval from sampling questions (0 when every fact was measured)


def capacity(losses: dict[str, SubjectLoss], stats: dict, hops: int, scheme: str) -> Capacity:
    """Stored bits under `scheme` from mean answer losses per subject (see the module docstring)."""
    if scheme not in (ONE_HOP_SCHEMES if hops == 1 else TWO_HOP_SCHEMES):
        raise ValueError(f"scheme {scheme!r} does not apply to {hops}-hop questions")
    n, r = stats["num_profiles"], stats["relations"]
    prior = entropies(stats, scheme)
    bits = entropy = variance = 0.0
    for a in subjects(r):
        if a not in losses:
            if hops == 2:  # a held-out second-hop subject is never trained two-hop: not counted
                continue
            raise ValueError(f"no answer losses measured for subject {a!r}")
        loss = losses[a]
        mult, mean, slope = 1, loss.mean_bits, 1.0
        if hops == 2 and scheme == "2-hop-big-hash":
            mult = r
        if hops == 2 and scheme == "2-hop-double":
            mean = invert_two_hop_loss(loss.mean_bits, 2.0 ** prior[a])
            mult = 2 if a in RELATIONS else 1
            slope = 0.0  # the inverse is not linear; its sampling error is left out of the interval
        if scheme == "azl":
            gain = prior[a] - mean  # not clipped: Allen-Zhu & Li's formula as written
        else:
            gain = max(0.0, prior[a] - mean)
        bits += mult * n * gain
        entropy += mult * n * prior[a]
        if gain > 0 or scheme == "azl":
            fpc = max(0.0, 1 - loss.fraction)  # a census has no sampling error
            variance += (mult * n * slope) ** 2 * loss.var_bits / max(loss.count, 1) * fpc
    selection = selection_bits(stats, scheme)
    earned = selection * selection_share(losses, stats) if selection else 0.0
    return Capacity(scheme, hops, bits + earned, entropy + selection, 1.96 * math.sqrt(variance))


def selection_share(losses: dict[str, SubjectLoss], stats: dict) -> float:
    """How much of the name and date sets the model shows it knows, from 0 to 1: how far its relation
    (birth date) answers are below the uninformed prior over the whole name space (date support), as a
    share of the way down to the prior over the realized names (dates). EleutherAI credits both sets to
    every model, an untrained one included; here an untrained model stores 0 bits."""
    def share(loss: float, uninformed: float, informed: float) -> float:
        return min(1.0, max(0.0, (uninformed - loss) / (uninformed - informed))) if uninformed > informed else 1.0

    relations = [losses[r].mean_bits for r in RELATIONS[: stats["relations"]] if r in losses]
    names_known = share(float(np.mean(relations)), math.log2(names_space(stats)),
                        float(np.mean([math.log2(stats[f"distinct_{r}"]) for r in RELATIONS[: stats["relations"]]])))
    dates_known = share(losses["birth_date"].mean_bits, math.log2(stats["date_support"]),
                        math.log2(stats["distinct_dates"])) if "birth_date" in losses else 0.0
    n = stats["num_profiles"]
    space = names_space(stats)
    name_bits = log2_binomial(space, n)
    date_bits = log2_binomial(stats["date_support"], stats["distinct_dates"])
    return (names_known * name_bits + dates_known * date_bits) / (name_bits + date_bits)


def subject_losses(subject: np.ndarray, loss_nats: np.ndarray, relations: int,
                   fraction: float = 1.0) -> dict[str, SubjectLoss]:
    """Per-subject mean and variance of answer losses (in bits) from one row per question; `fraction`
    of all questions was measured (uniformly)."""
    names = subjects(relations)
    bits = np.asarray(loss_nats, dtype=np.float64) / LN2
    out = {}
    for i, a in enumerate(names):
        sel = bits[np.asarray(subject) == i]
        if len(sel):
            var = float(sel.var(ddof=1)) if len(sel) > 1 else 0.0
            out[a] = SubjectLoss(float(sel.mean()), var, len(sel), fraction)
    return out


def capacity_rows(loss_table: dict[str, np.ndarray], stats: dict, n_params: int, n_params_used: int) -> list[dict]:
    """One row per hop count: capacity, dataset entropy and bits/parameter under every scheme that
    applies. `loss_table` holds the columns hops, subject, loss_nats and fraction (the share of all
    such questions that was measured), one row per question."""
    rows = []
    hops_column = np.asarray(loss_table["hops"])
    for hops in sorted(set(hops_column.tolist())):
        sel = hops_column == hops
        losses = subject_losses(np.asarray(loss_table["subject"])[sel], np.asarray(loss_table["loss_nats"])[sel],
                                stats["relations"], float(np.asarray(loss_table["fraction"])[sel][0]))
        row = {"n_params": n_params, "n_params_used": n_params_used, "num_profiles": stats["num_profiles"],
               "relations": stats["relations"], "hops": hops, "questions": int(sel.sum()),
               "mean_answer_loss_bits": float(np.mean([v.mean_bits for v in losses.values()]))}
        for scheme in SCHEMES:
            if scheme not in (ONE_HOP_SCHEMES if hops == 1 else TWO_HOP_SCHEMES):
                continue
            c = capacity(losses, stats, hops, scheme)
            row[f"capacity_{scheme}"] = c.bits
            row[f"ci95_{scheme}"] = c.ci95
            row[f"ci95_relative_{scheme}"] = c.ci95 / c.bits if c.bits > 0 else 0.0  # aim: under 0.02
            row[f"dataset_entropy_{scheme}"] = c.dataset_entropy
            row[f"selection_bits_{scheme}"] = selection_bits(stats, scheme)  # the most a model is credited
            row[f"bits_per_param_{scheme}"] = c.bits / n_params_used
        rows.append(row)
    return rows


def plot_capacity(rows: list[dict], path: str, scheme: str = "optimal") -> None:
    """capacity_vs_params.png: log-log capacity against parameters (unused embedding rows left out),
    one colour per dataset size, its dataset entropy dashed, and the 2 bits/parameter line. Models of one size
    trained with several seeds are drawn as their mean with a 95% interval over the seeds."""
    import matplotlib

    from reasonlab.analysis.intervals import mean_interval

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hops_list = sorted({r["hops"] for r in rows})
    fig, axes = plt.subplots(1, len(hops_list), figsize=(6 * len(hops_list), 4.5), squeeze=False)
    for ax, hops in zip(axes[0], hops_list):
        sub = [r for r in rows if r["hops"] == hops and r.get(f"capacity_{scheme}") is not None]
        sizes = sorted({(r["num_profiles"], r["relations"]) for r in sub})
        params = [r["n_params_used"] for r in sub]
        for i, (n, rel) in enumerate(sizes):
            color = f"C{i}"
            by_size: dict[int, list[tuple[float, float]]] = {}
            for r in sub:
                if (r["num_profiles"], r["relations"]) == (n, rel):
                    by_size.setdefault(r["n_params_used"], []).append((r[f"capacity_{scheme}"], r[f"ci95_{scheme}"]))
            # one model: its sampling interval; repeated seeds of one size: their mean and 95% t-interval
            x, y, err = zip(*[(size, *(runs[0] if len(runs) == 1 else mean_interval([c for c, _ in runs])))
                              for size, runs in sorted(by_size.items())])
            ax.errorbar(x, y, yerr=err, marker="o", color=color, label=f"N={n}, R={rel}", capsize=2)
            h = next(r[f"dataset_entropy_{scheme}"] for r in sub if (r["num_profiles"], r["relations"]) == (n, rel))
            ax.axhline(h, color=color, linestyle="--", linewidth=1, label=f"dataset entropy N={n}")
        if params:
            xs = np.geomspace(min(params) / 1.5, max(params) * 1.5, 50)
            ax.plot(xs, 2 * xs, color="black", linewidth=1, label="2 bits / parameter")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (unused embedding rows left out)")
        ax.set_ylabel(f"capacity, bits ({scheme})")
        ax.set_title(f"{hops}-hop questions")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure_answer_losses(model, tokenizer, method, task, *, batch_size: int, device, precision: str = "auto"):
    """The loss table of a model: one row per capacity question (hops, subject, loss_nats)."""
    from reasonlab.evaluate import answer_losses

    columns = {"hops": [], "subject": [], "loss_nats": [], "fraction": []}
    for hops, (examples, subject, fraction) in task.capacity_questions().items():
        loss = answer_losses(model, tokenizer, method, examples, batch_size=batch_size, device=device,
                             precision=precision)
        columns["hops"].append(np.full(len(examples), hops))
        columns["subject"].append(np.asarray(subject))
        columns["loss_nats"].append(loss)
        columns["fraction"].append(np.full(len(examples), fraction))
    return {k: np.concatenate(v) for k, v in columns.items()}
