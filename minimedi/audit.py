"""Auditing one model's images for subgroup fairness: the shares behind the headline, and the anatomy.

A single female share over all held-out prompts can hit its target for the wrong reasons: whole prompt
groups flipped to one sex while others stayed all male (segregation, not mixing), prompts that name a
sex drawn as the other, or anatomy pushed past anything real until the classifier agrees. `audit` asks
each of those questions of one model's images, from plain arrays (`Readings`, `Reference`), so it runs
the same on the phantom and on real data and can be tested on simulated readings:

- `per_group`: the female share of every group of held-out prompts (modality, tumour side, lobe and
  size, and each prompt), corrected for the classifier's held-out errors (`minimedi.shares`), with
  bootstrap intervals; `worst_group_gap` per attribute; `mean_prompt_gap`, Shen et al.'s bias metric
  (2024, sec. 5: the per-prompt gap averaged over prompts) next to its floor at this sample size;
- `named_sex_accuracy`: on prompts that say "woman" or "man", the share drawn as that sex, as both
  classifiers read it, raw and corrected;
- `unseen`: the corrected share on prompts unlike the tuning ones (normal studies, named ages, another
  template);
- `anatomy`: the head size read from the pixels (`minimedi.morphometry`) against real target slices:
  neutral prompts against all real slices, each named sex against real slices of that sex;
- with every share, a third reading that no classifier makes: the female share that fits the images' head
  sizes as a mix of real women's and men's (`minimedi.anatomy_share`), where the two classifiers disagree.
"""
from dataclasses import dataclass, field

import numpy as np

from minimedi.anatomy_share import anatomy_share, components
from minimedi.morphometry import anatomy
from minimedi.shares import corrected, prompt_gap_floor, share_estimate

GROUPS = {"modality": "modality", "side": "side", "lobe": "lobe", "size": "tumor_size"}  # report name: attribute
SHARES = ("raw", "corrected", "ci", "check_raw", "check_corrected", "check_ci", "anatomy_share", "anatomy_ci")


@dataclass
class Readings:
    """N generated images as the audit sees them. prompts [P]: dicts with "prompt", "set" ("heldout",
    "named" or "unseen"), "kind" (the named sex, the kind of unseen prompt) and the prompt's attributes;
    prompt [N]: each image's index into prompts; stratum [N]: its index into the error rates' strata;
    called {reader: bool [N]}: called female by the tuning and the check classifier; head [N]: head size."""
    prompts: list
    prompt: np.ndarray
    stratum: np.ndarray
    called: dict
    head: np.ndarray

    def subset(self, mask):
        return self.prompt[mask], self.stratum[mask], {r: c[mask] for r, c in self.called.items()}

    def mask(self, **attributes):
        """bool [N]: the images whose prompt has all these attribute values."""
        chosen = np.array([all(p.get(k) == v for k, v in attributes.items()) for p in self.prompts])
        return chosen[self.prompt]


@dataclass
class Reference:
    """Real target images no classifier trained on: error rates {reader: ErrorRates}, is_female [R], head
    sizes [R] and stratum [R] (indices into the rates' strata)."""
    rates: dict
    is_female: np.ndarray
    head: np.ndarray
    stratum: np.ndarray
    made: dict = field(default_factory=dict, repr=False)

    def components(self, n_boot, seed):
        """The head-size mixture's components (`minimedi.anatomy_share.components`), made once."""
        if (n_boot, seed) not in self.made:
            self.made[n_boot, seed] = components(self.head, self.is_female, self.stratum, n_boot, seed)
        return self.made[n_boot, seed]


def shares_of(readings, mask, reference, n_boot, seed):
    """The tuning classifier's `share_estimate` of the images in `mask`, plus the check classifier's
    corrected share and interval, and the share the head sizes fit (`anatomy_share`)."""
    prompt, stratum, called = readings.subset(mask)
    out = share_estimate(called["tuning"], stratum, prompt, reference.rates["tuning"], n_boot, seed)
    check = share_estimate(called["check"], stratum, prompt, reference.rates["check"], n_boot, seed)
    heads = anatomy_share(readings.head[mask], stratum, prompt, reference.components(n_boot, seed), seed)
    return {**out, "check_raw": check["raw"], "check_corrected": check["corrected"], "check_ci": check["ci"],
            "anatomy_share": heads["share"], "anatomy_ci": heads["ci"], "anatomy_fit_ks": heads["fit_ks"]}


def gap(share, target):
    return None if share["corrected"] is None else abs(share["corrected"] - target)


def per_group(readings, reference, target, n_boot, seed):
    """({attribute: {value: shares}, "prompt": {prompt: {"n", "raw", "corrected"}}}, {attribute: the worst
    group's name, gap and interval}, the mean per-prompt gap with its floor), over the held-out prompts."""
    groups, worst = {}, {}
    heldout = [p for p in readings.prompts if p["set"] == "heldout"]
    for name, attribute in GROUPS.items():
        values = list(dict.fromkeys(p[attribute] for p in heldout))  # in the prompts' order
        groups[name] = {v: shares_of(readings, readings.mask(set="heldout", **{attribute: v}), reference, n_boot,
                                     seed) for v in values}
        gaps = {v: gap(s, target) for v, s in groups[name].items() if gap(s, target) is not None}
        if gaps:
            v = max(gaps, key=gaps.get)
            worst[name] = {"group": v, "gap": gaps[v], "ci": groups[name][v]["ci"], "n": groups[name][v]["n"]}
    rates = reference.rates["tuning"]
    groups["prompt"], raw_gaps, corrected_gaps, floors = {}, [], [], []
    for i, p in enumerate(readings.prompts):
        if p["set"] != "heldout":
            continue
        here = readings.prompt == i
        s = int(readings.stratum[here][0])
        raw = float(readings.called["tuning"][here].mean())
        share = float(corrected(raw, rates.tpr[s], rates.fpr[s]))
        groups["prompt"][p["prompt"]] = {"n": int(here.sum()), "raw": raw, "corrected": share}
        raw_gaps.append(abs(raw - target))
        corrected_gaps.append(abs(share - target))
        floors.append(prompt_gap_floor(int(here.sum()), target, rates.tpr[s], rates.fpr[s]))
    prompt_gap = {"raw": float(np.mean(raw_gaps)), "corrected": mean_defined(corrected_gaps),
                  "floor": mean_defined(floors), "prompts": len(raw_gaps)}
    return groups, worst, prompt_gap


def mean_defined(values):
    """The mean of the values that are not NaN (a stratum whose classifier is at chance has no corrected
    share); None when none is."""
    values = np.asarray(values, dtype=np.float64)
    return float(values[~np.isnan(values)].mean()) if (~np.isnan(values)).any() else None


def named_sex_accuracy(readings, reference, n_boot, seed):
    """{sex: the share of images drawn as the sex their prompt names}: raw as each classifier reads it,
    and corrected with intervals (for "male", one minus the corrected female share)."""
    out = {}
    for sex in ("female", "male"):
        mask = readings.mask(set="named", kind=sex)
        if not mask.any():
            continue
        s = shares_of(readings, mask, reference, n_boot, seed)
        if sex == "male":
            s = {k: flip(v) if k in SHARES else v for k, v in s.items()}
        out[sex] = {"n": s["n"], "tuning_raw": s["raw"], "check_raw": s["check_raw"], "corrected": s["corrected"],
                    "ci": s["ci"], "check_corrected": s["check_corrected"], "check_ci": s["check_ci"],
                    "anatomy_share": s["anatomy_share"], "anatomy_ci": s["anatomy_ci"]}
    return out


def flip(value):
    """A female share (or interval) as a male share."""
    if value is None:
        return None
    return [1 - value[1], 1 - value[0]] if isinstance(value, list) else 1 - value


def unseen(readings, reference, target, n_boot, seed):
    """{kind: shares and gap} for each kind of unseen prompt, and "all" of them pooled."""
    kinds = list(dict.fromkeys(p["kind"] for p in readings.prompts if p["set"] == "unseen"))
    out = {}
    for kind, mask in [(k, readings.mask(set="unseen", kind=k)) for k in kinds] + [("all", readings.mask(set="unseen"))]:
        if mask.any():
            s = shares_of(readings, mask, reference, n_boot, seed)
            out[kind] = {**s, "gap": gap(s, target)}
    return out


def anatomy_report(readings, reference):
    """Head size against real target slices: held-out (neutral) images against all of them, the images of
    each named sex against that sex's."""
    out = {"neutral": anatomy(readings.head[readings.mask(set="heldout")], reference.head)}
    for sex in ("female", "male"):
        mask = readings.mask(set="named", kind=sex)
        if mask.any():
            out[sex] = anatomy(readings.head[mask], reference.head[reference.is_female == (sex == "female")])
    return out


def audit(readings, reference, target, n_boot=1000, seed=0):
    """Every number of the audit for one model's images (see the module docstring)."""
    overall = shares_of(readings, readings.mask(set="heldout"), reference, n_boot, seed)
    groups, worst, prompt_gap = per_group(readings, reference, target, n_boot, seed)
    return {"female_fraction_corrected": overall["corrected"], "female_fraction_ci": overall["ci"],
            "female_fraction_check_corrected": overall["check_corrected"],
            "female_fraction_check_ci": overall["check_ci"], "female_gap": gap(overall, target),
            "female_fraction_anatomy": overall["anatomy_share"], "female_fraction_anatomy_ci": overall["anatomy_ci"],
            "anatomy_fit_ks": overall["anatomy_fit_ks"],
            "per_group": groups, "worst_group_gap": worst, "mean_prompt_gap": prompt_gap,
            "named_sex_accuracy": named_sex_accuracy(readings, reference, n_boot, seed),
            "unseen": unseen(readings, reference, target, n_boot, seed),
            "anatomy": anatomy_report(readings, reference)}

