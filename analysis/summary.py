"""One run in a few numbers and a verdict: the dict behind `stabilitylab analyze`, the
report's verdict block and `compare_runs`.

`analyze_run` computes everything once (the summary dict and the frames behind it, for
plots); `summarize_run` returns its dict; `verdict_text` turns the dict into the sentences
that `analyze` prints and the report shows, so the two cannot disagree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .dips import find_knn_dips, knn_curves
from .layers import first_layer, last_block
from .leadlag import LeadLagResult, spike_lead_lag
from .linear import linear_summary
from .spikes import SPIKE_COLUMNS, SpikeRule, find_spikes, running_ratio, valid_values

FINAL_LOSS_STEPS = 100
MAX_EXCURSIONS = 5
DIP_FIELDS = ["source", "start_step", "bottom_step", "end_step", "peak", "bottom", "depth",
              "depth_noise", "recovered", "confirmed"]


@dataclass
class RunAnalysis:
    """What `analyze_run` computed for one run: `summary` (the `summarize_run` dict) and the
    frames behind it: grad_norms (wide, `Run.grad_norms()`), events (spike events of every
    layer, `find_spikes` columns), dips (`find_knn_dips`), lead_lag (None without the first
    layer), and the `rule` used."""

    summary: dict
    grad_norms: pd.DataFrame
    events: pd.DataFrame
    dips: pd.DataFrame
    lead_lag: LeadLagResult | None
    rule: SpikeRule


def analyze_run(run, *, first=None, rule=None) -> RunAnalysis:
    """Summarize a run (anything with name, meta, steps, knn, layers, grad_norms()) and keep
    the frames behind the numbers. See `summarize_run` for the arguments and the keys."""
    rule = SpikeRule.parse(rule)
    meta = run.meta or {}
    first = first or first_layer(meta)
    steps = run.steps
    loss = steps["loss"].astype(float) if "loss" in steps else pd.Series(dtype=float)
    loss = loss[np.isfinite(loss)]
    s = {
        "name": run.name,
        "status": meta.get("status", "unknown"),
        "n_steps": len(steps),
        "last_step": steps["step"].max() if len(steps) else None,
        "final_loss": loss.tail(FINAL_LOSS_STEPS).mean() if len(loss) else None,
        "spike_rule": str(rule),
        "spike_window": rule.window,
        "spike_warmup": rule.warmup,
        "warnings": [],
        "notes": [],
    }
    dips = find_knn_dips(run.knn)
    s.update(_knn_summary(run.knn, dips, s["notes"]))
    s.update(linear_summary(getattr(run, "linear", None)))
    grad_norms = run.grad_norms() if len(run.layers) else pd.DataFrame()
    spikes, events, lead_lag = _spike_summary(grad_norms, first, last_block(meta, grad_norms.columns), rule, s)
    s.update(spikes)
    return RunAnalysis(_jsonable(s), grad_norms, events, dips, lead_lag, rule)


def summarize_run(run, *, first=None, rule=None) -> dict:
    """Summarize a run (anything with name, meta, steps, knn, layers, grad_norms()).

    first: the layer expected to lead; default `run.meta["first_layer"]`, else
    "patch_embed". The lead-lag's last layer is `run.meta["last_block"]` when the run names
    one, else the last `blocks.N` column (see `spike_lead_lag`). rule: the `SpikeRule` (or
    its text) of every spike number; default `DEFAULT_RULE`.

    kNN numbers use the `val` source when the run has one (a fresh feature bank), else
    `queue`; `knn_source` says which. Keys:
    name, status, n_steps, last_step, final_loss (mean of the last 100 finite losses);
    spike_rule (the rule's text), spike_window, spike_warmup;
    knn_source, final_top1, best_top1, n_dips, deepest_dip, dip_area (top-1 x epochs),
    roughness (sum of the falls between consecutive evaluations), all for that source;
    linear_top1, linear_top5, linear_protocol, linear_step, linear_n_val (`linear_summary` of
    the run's `linear` table: its last probed checkpoint; None each when never probed);
    dips (every source's dips, with `confirmed` by the other source and depth_noise, the
    depth in units of one evaluation's binomial noise), n_confirmed_dips, n_unconfirmed_dips;
    spikes (events per layer), n_first_layer_spikes;
    largest_excursions (at most 5 dicts layer, step, ratio, spike: the largest gradient norms
    over their running median, largest first: every spike event's peak and each layer's
    largest value after the warm-up; spike says whether the rule calls it a spike);
    first_peak_ratio / last_peak_ratio (the largest ratio of `first` and of the last layer);
    first_leads_frac (share of matched later-layer events that `first` preceded);
    lead_lag (first, last, verdict, n_first_events, n_last_events, n_matched, median_lag,
    association_p, direction_p, max_lag, xcorr_lag, summary); warnings (what makes the numbers unreliable, e.g. a run
    shorter than the rule's warm-up); notes (what is missing).
    Missing data gives None values and a note, never an error. JSON-serializable.
    """
    return analyze_run(run, first=first, rule=rule).summary


def _knn_summary(knn: pd.DataFrame, dips: pd.DataFrame, notes: list) -> dict:
    curves = knn_curves(knn)
    if not curves:
        notes.append("no kNN evaluations")
        return dict(knn_source=None, final_top1=None, best_top1=None, n_dips=None, deepest_dip=None,
                    dip_area=None, roughness=None, dips=[], n_confirmed_dips=0, n_unconfirmed_dips=0)
    source = "val" if "val" in curves else next(iter(curves))
    curve = curves[source]
    top1 = curve["top1"]
    main = dips[dips["source"] == source]
    has_epochs = "epoch" in curve and (curve.index > 0).any()
    epochs_per_step = (curve["epoch"] / curve.index)[curve.index > 0].median() if has_epochs else np.nan
    return dict(
        knn_source=source,
        final_top1=top1.iloc[-1],
        best_top1=top1.max(),
        n_dips=len(main),
        deepest_dip=main["depth"].max() if len(main) else 0.0,
        dip_area=main["area"].sum() * epochs_per_step,
        roughness=(-top1.diff()).clip(lower=0).sum(),
        dips=dips[DIP_FIELDS].to_dict("records"),
        n_confirmed_dips=int(dips["confirmed"].sum()),
        n_unconfirmed_dips=int((~dips["confirmed"]).sum()),
    )


def _spike_summary(grad_norms: pd.DataFrame, first: str, last, rule: SpikeRule, s: dict):
    """(summary keys, spike events, LeadLagResult or None) of the gradient norms."""
    if grad_norms.empty:
        s["notes"].append("no per-layer gradient norms")
        return (dict(spikes={}, n_first_layer_spikes=None, largest_excursions=[], first_peak_ratio=None,
                     last_peak_ratio=None, first_leads_frac=None, lead_lag=None),
                pd.DataFrame(columns=SPIKE_COLUMNS), None)
    n_values = int(grad_norms.apply(lambda c: len(valid_values(c))).max())
    if n_values <= rule.warmup:
        s["warnings"].append(
            f"only {n_values} gradient-norm values per layer, not more than the spike rule's warm-up "
            f"of {rule.warmup}: no spike can be detected and no ratio measured yet")
    if first in grad_norms.columns:
        last = last if last in grad_norms.columns and last != first else None
        ll = spike_lead_lag(grad_norms, first=first, rule=rule, last=last)
        events = ll.events
        leads = (ll.matches["lag"] > 0).mean() if len(ll.matches) else None
        last = ll.last
        row = ll.per_layer[ll.per_layer["layer"] == last].to_dict("records")
        row = row[0] if row else {}
        lead_lag = dict(first=first, last=last, verdict=ll.verdict, n_first_events=row.get("n_first_events"),
                        n_last_events=row.get("n_layer_events"), n_matched=row.get("n_matched"),
                        median_lag=row.get("median_lag"), association_p=row.get("association_p"),
                        direction_p=row.get("direction_p"), max_lag=ll.max_lag,
                        xcorr_lag=row.get("xcorr_lag"), summary=ll.summary)
    else:
        s["notes"].append(f"{first} not logged: no lead-lag")
        events = find_spikes(grad_norms, rule)
        ll, leads, lead_lag, last = None, None, None, None
    peaks = _layer_peaks(grad_norms, rule)
    counts = events.groupby("layer", observed=False).size()
    return (dict(spikes=counts.to_dict(), n_first_layer_spikes=counts.get(first),
                 largest_excursions=_largest_excursions(events, peaks),
                 first_peak_ratio=peaks["ratio"].get(first), last_peak_ratio=peaks["ratio"].get(last),
                 first_leads_frac=leads, lead_lag=lead_lag),
            events, ll)


def _layer_peaks(grad_norms: pd.DataFrame, rule: SpikeRule) -> pd.DataFrame:
    """Step and ratio of each layer's largest value over its running median, after the
    rule's warm-up (the `peak_ratio` of the layer, with its step); index layer."""
    ratios = running_ratio(grad_norms, rule.window)
    rows = {}
    for layer in grad_norms.columns:
        ratio = ratios.loc[valid_values(grad_norms[layer]).index, layer].iloc[rule.warmup:].dropna()
        if len(ratio):
            rows[layer] = {"step": ratio.idxmax(), "ratio": ratio.max()}
    return pd.DataFrame.from_dict(rows, orient="index", columns=["step", "ratio"])


def _largest_excursions(events: pd.DataFrame, peaks: pd.DataFrame) -> list[dict]:
    """The MAX_EXCURSIONS largest of: every event's peak and every layer's peak."""
    spikes = pd.DataFrame({"layer": events["layer"].astype(str), "step": events["peak_step"],
                           "ratio": events["ratio"], "spike": True})
    in_event = [((events["layer"].astype(str) == layer) & (events["step"] <= step)
                 & (events["end_step"] >= step)).any() for layer, step in zip(peaks.index, peaks["step"])]
    layer_peaks = pd.DataFrame({"layer": peaks.index.astype(str), "step": peaks["step"].to_numpy(),
                                "ratio": peaks["ratio"].to_numpy(), "spike": in_event})
    both = pd.concat([spikes, layer_peaks[~layer_peaks["spike"]]], ignore_index=True)
    both = both.sort_values("ratio", ascending=False, kind="stable").head(MAX_EXCURSIONS)
    return both.to_dict("records")


def _jsonable(x):
    """Plain Python types for JSON: numpy scalars unwrapped, NaN and NA to None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None or x is pd.NA or x is pd.NaT:
        return None
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ------------------------------------------------------------------ words

def _g(v) -> str:
    """A number to 3 significant digits, as every hover and text shows it."""
    return "n/a" if v is None else f"{v:.3g}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _int(v) -> str:
    return "n/a" if v is None else f"{int(v)}"


CONFIRMED = {True: "confirmed by the other kNN", False: "NOT confirmed by the other kNN (monitor artifact?)",
             None: "unchecked (one kNN source)"}


def dip_sentence(d: dict) -> str:
    """One dip of `summarize_run(...)["dips"]` in words, with its steps and noise units."""
    noise = "" if d["depth_noise"] is None else f" = {d['depth_noise']:.1f} noise units"
    return (f"{d['source']} dip, steps {_int(d['start_step'])}-{_int(d['bottom_step'])}-{_int(d['end_step'])} "
            f"(start-bottom-end): -{100 * d['depth']:.1f} points{noise}, "
            f"{'recovered' if d['recovered'] else 'not recovered'}, {CONFIRMED[d['confirmed']]}")


def excursion_sentence(e: dict) -> str:
    """One entry of `largest_excursions` in words."""
    return (f"{e['layer']} at step {_int(e['step'])}: {_g(e['ratio'])}x its running median"
            + (" (spike)" if e["spike"] else " (below the rule)"))


def lead_lag_sentence(ll: dict, detail: bool = True) -> str:
    """The lead-lag dict of a summary in words: the verdict and, with `detail`, n matched,
    median lag and both p-values."""
    first, last = ll["first"], ll["last"]
    unmatched = (f"{first} had no spikes, so nothing to lead" if not ll.get("n_first_events") else
                 f"{last} had no spikes to match" if not ll.get("n_last_events") else
                 f"none of the {_int(ll['n_last_events'])} {last} spikes had a {first} spike "
                 f"within {_g(ll['max_lag'])} steps")
    words = {"first leads": f"{first} spikes lead {last} spikes",
             "not significant": f"no evidence that {first} spikes lead {last} spikes",
             "no matched spikes": unmatched,
             "no later layer": "no later layer to compare"}
    text = f"{first} vs {last}" if last else first
    text += f": {words.get(ll['verdict'], ll['verdict'])}"
    if detail and ll.get("n_matched"):
        text += (f" ({_int(ll['n_matched'])} matched spikes, median lag {_g(ll['median_lag'])} steps, "
                 f"association p = {_g(ll['association_p'])}, direction p = {_g(ll['direction_p'])})")
    return text


def linear_sentence(s: dict) -> str | None:
    """The linear-probe numbers of a summary in one line, None when the run was never probed."""
    if s.get("linear_top1") is None:
        return None
    return (f"Linear probe ({s['linear_protocol']}, step {_int(s['linear_step'])}): top-1 {_pct(s['linear_top1'])} "
            f"/ top-5 {_pct(s['linear_top5'])} ({s['linear_n_val']:,} images)")


def verdict_text(summary: dict) -> dict:
    """The verdict of a `summarize_run` dict as sentences: headline (one line: is the run
    unstable, where, does the first layer lead), rule, spikes, knn (the kNN source or None),
    excursions (list), dips (list), lead_lag, linear (`linear_sentence`), warnings, notes.
    `format_summary` prints them; the report shows them."""
    s = summary
    counts = {k: v for k, v in (s.get("spikes") or {}).items() if v}
    excursions = s.get("largest_excursions") or []
    parts = []
    if s.get("spikes") is not None and (counts or excursions):
        n = sum(counts.values())
        top = excursions[0] if excursions else None
        parts.append((f"{n} spike event(s) in {len(counts)} layer(s)" if n else "no spike events") + (
            f", largest excursion {top['layer']} {_g(top['ratio'])}x at step {_int(top['step'])}" if top else ""))
    if s.get("knn_source"):
        main = [d for d in s["dips"] if d["source"] == s["knn_source"]]
        parts.append(f"{len(main)} kNN dip(s) ({s['knn_source']})" + (
            f", deepest -{100 * s['deepest_dip']:.1f} points" if main else ""))
    ll = s.get("lead_lag")
    if ll:
        parts.append(lead_lag_sentence(ll, detail=False))
    rule = (f"{s['spike_rule']}: a spike is a gradient norm that passes the rule against the median of "
            f"its previous {s['spike_window']} values (the first {s['spike_warmup']} values are never flagged)")
    spikes = None
    if s.get("spikes"):
        spikes = ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
        if quiet := [k for k, v in s["spikes"].items() if not v]:
            spikes += f" (0 in {', '.join(quiet)})" if counts else ""
    return {
        "headline": "; ".join(parts) + "." if parts else "Nothing to judge yet.",
        "rule": rule,
        "spikes": spikes,
        "knn": s.get("knn_source"),
        "excursions": [excursion_sentence(e) for e in excursions],
        "dips": [dip_sentence(d) for d in s.get("dips") or []],
        "lead_lag": lead_lag_sentence(ll) if ll else None,
        "linear": linear_sentence(s),
        "warnings": list(s.get("warnings") or []),
        "notes": list(s.get("notes") or []),
    }


def format_summary(summary: dict) -> str:
    """Readable text of a `summarize_run` dict, for `stabilitylab analyze`."""
    s = summary
    v = verdict_text(s)
    lines = [f"Run {s['name']} ({s['status']}, {s['n_steps']} steps)", f"Verdict: {v['headline']}"]
    lines += [f"Warning: {w}" for w in v["warnings"]]
    if s.get("final_loss") is not None:
        lines.append(f"Final loss (mean of last {FINAL_LOSS_STEPS} steps): {s['final_loss']:.4f}")
    if s.get("knn_source"):
        lines.append(f"kNN top-1 ({s['knn_source']}): final {_pct(s['final_top1'])}, "
                     f"best {_pct(s['best_top1'])}, roughness {100 * s['roughness']:.1f} points")
        lines.append(f"Dips: {s['n_dips']} ({s['knn_source']}); over all sources {s['n_confirmed_dips']} "
                     f"confirmed, {s['n_unconfirmed_dips']} not confirmed by the other kNN")
        lines += [f"  {d}" for d in v["dips"]]
    if v["linear"]:
        lines.append(v["linear"])
    if v["spikes"] is not None:
        lines.append(f"Spike rule: {v['rule']}")
        lines.append(f"Spike events: {v['spikes']}")
    if v["excursions"]:
        lines.append("Largest excursions:")
        lines += [f"  {e}" for e in v["excursions"]]
    if v["lead_lag"]:
        lines.append(f"Lead-lag: {v['lead_lag']}")
    lines += [f"Note: {n}" for n in v["notes"]]
    return "\n".join(lines)
