"""One run in a few numbers: the dict behind `stabilitylab analyze` and `compare_runs`."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .dips import find_knn_dips, knn_curves
from .leadlag import spike_lead_lag
from .spikes import SpikeRule, find_spikes, peak_ratio

FINAL_LOSS_STEPS = 100
DIP_FIELDS = ["source", "start_step", "bottom_step", "end_step", "peak", "bottom", "depth",
              "depth_noise", "recovered", "confirmed"]


def summarize_run(run, *, first=None, rule=None) -> dict:
    """Summarize a run (anything with name, meta, steps, knn, layers, grad_norms()).

    kNN numbers use the `val` source when the run has one (a fresh feature bank), else
    `queue`; `knn_source` says which. Keys:
    name, status, n_steps, last_step, final_loss (mean of the last 100 finite losses),
    knn_source, final_top1, best_top1, n_dips, deepest_dip, dip_area (top-1 x epochs),
    roughness (sum of the falls between consecutive evaluations), all for that source;
    dips (every source's dips, with `confirmed` by the other source), n_confirmed_dips,
    n_unconfirmed_dips; spikes (events per layer), n_first_layer_spikes,
    first_peak_ratio / last_peak_ratio (largest gradient norm over its running median, see
    `peak_ratio`, for `first` and for the lead-lag's last layer),
    first_leads_frac (share of matched later-layer events that `first` preceded),
    lead_lag (last-layer verdict, p_value, median_lag, summary); notes (what is missing).
    spike_rule (the rule's text). Missing data gives None values and a note, never an error.
    JSON-serializable. rule: the `SpikeRule` (or its text) of every spike number; default
    `DEFAULT_RULE`. first: the first layer; default the run's meta "first_layer" (written by
    the trainer and the Monitor), else "patch_embed"; the last layer compared is the meta's
    "last_block" when logged, else the last `blocks.N` column.
    """
    rule = SpikeRule.parse(rule)
    meta = run.meta or {}
    first = first or meta.get("first_layer") or "patch_embed"
    steps = run.steps
    loss = steps["loss"].astype(float) if "loss" in steps else pd.Series(dtype=float)
    loss = loss[np.isfinite(loss)]
    s = {
        "name": run.name,
        "status": (run.meta or {}).get("status", "unknown"),
        "n_steps": len(steps),
        "last_step": steps["step"].max() if len(steps) else None,
        "final_loss": loss.tail(FINAL_LOSS_STEPS).mean() if len(loss) else None,
        "spike_rule": str(rule),
        "notes": [],
    }
    s.update(_knn_summary(run.knn, s["notes"]))
    s.update(_spike_summary(run, first, meta.get("last_block"), rule, s["notes"]))
    return _jsonable(s)


def _knn_summary(knn: pd.DataFrame, notes: list) -> dict:
    curves = knn_curves(knn)
    if not curves:
        notes.append("no kNN evaluations")
        return dict(knn_source=None, final_top1=None, best_top1=None, n_dips=None, deepest_dip=None,
                    dip_area=None, roughness=None, dips=[], n_confirmed_dips=0, n_unconfirmed_dips=0)
    source = "val" if "val" in curves else next(iter(curves))
    curve = curves[source]
    top1 = curve["top1"]
    dips = find_knn_dips(knn)
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


def _spike_summary(run, first: str, last: str | None, rule: SpikeRule, notes: list) -> dict:
    grad_norms = run.grad_norms() if len(run.layers) else pd.DataFrame()
    if grad_norms.empty:
        notes.append("no per-layer gradient norms")
        return dict(spikes={}, n_first_layer_spikes=None, first_peak_ratio=None, last_peak_ratio=None,
                    first_leads_frac=None, lead_lag=None)
    ratios = peak_ratio(grad_norms, rule)
    if first not in grad_norms.columns:
        notes.append(f"{first} not logged: no lead-lag")
        events = find_spikes(grad_norms, rule)
        lead_lag, leads, last_layer = None, None, None
    else:
        ll = spike_lead_lag(grad_norms, first=first, rule=rule,
                            last=last if last in grad_norms.columns and last != first else None)
        events = ll.events
        leads = (ll.matches["lag"] > 0).mean() if len(ll.matches) else None
        last_layer = ll.last
        last = ll.per_layer[ll.per_layer["layer"] == ll.last].to_dict("records")
        last = last[0] if last else {}
        lead_lag = dict(first=first, last=ll.last, verdict=ll.verdict, p_value=last.get("p_value"),
                        median_lag=last.get("median_lag"), n_matched=last.get("n_matched"),
                        xcorr_lag=last.get("xcorr_lag"), summary=ll.summary)
    spikes = events.groupby("layer", observed=False).size()
    return dict(spikes=spikes.to_dict(), n_first_layer_spikes=spikes.get(first),
                first_peak_ratio=ratios.get(first), last_peak_ratio=ratios.get(last_layer),
                first_leads_frac=leads, lead_lag=lead_lag)


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


def format_summary(summary: dict) -> str:
    """Readable text of a `summarize_run` dict, for `stabilitylab analyze`."""
    s = summary

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    confirmed = {True: "confirmed", False: "NOT confirmed (monitor artifact?)", None: "unchecked"}
    lines = [f"Run {s['name']} ({s['status']}, {s['n_steps']} steps)"]
    if s.get("final_loss") is not None:
        lines.append(f"Final loss (mean of last {FINAL_LOSS_STEPS} steps): {s['final_loss']:.4f}")
    if s.get("knn_source"):
        lines.append(f"kNN top-1 ({s['knn_source']}): final {pct(s['final_top1'])}, "
                     f"best {pct(s['best_top1'])}, roughness {100 * s['roughness']:.1f} points")
        lines.append(f"Dips ({s['knn_source']}): {s['n_dips']}, deepest {100 * s['deepest_dip']:.1f} "
                     f"points; over all sources {s['n_confirmed_dips']} confirmed, "
                     f"{s['n_unconfirmed_dips']} not confirmed by the other kNN")
        for d in s["dips"]:
            noise = "" if d["depth_noise"] is None else f" ({d['depth_noise']:.1f} noise)"
            lines.append(f"  {d['source']:>5} steps {d['start_step']}-{d['bottom_step']}-{d['end_step']}: "
                         f"-{100 * d['depth']:.1f} points{noise}, "
                         f"{'recovered' if d['recovered'] else 'not recovered'}, "
                         f"{confirmed[d['confirmed']]}")
    if s.get("first_peak_ratio") is not None:
        last = s["lead_lag"]["last"] if s.get("lead_lag") else "last layer"
        tail = "" if s.get("last_peak_ratio") is None else f", {last} {s['last_peak_ratio']:.1f}x"
        lines.append(f"Largest gradient norm over its running median: first layer "
                     f"{s['first_peak_ratio']:.1f}x{tail} (paper-style spikes: >= 10x)")
    if s.get("spikes"):
        lines.append("Spike events: " + ", ".join(f"{k} {v}" for k, v in s["spikes"].items()))
    if s.get("lead_lag"):
        lines.append("Lead-lag: " + s["lead_lag"]["summary"])
    lines += [f"Note: {n}" for n in s["notes"]]
    return "\n".join(lines)
