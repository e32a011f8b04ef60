"""Regenerate examples/analysis.ipynb from the cells below and execute it, so that the
committed notebook shows its outputs (tests/test_notebook.py executes it again).

    python examples/make_notebook.py
"""
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

CELLS = [
    new_markdown_cell(
        "# Analysing a real instability\n\n"
        "`configs/cpu_unstable.yaml` trains a small ViT (width 64, depth 8, batch 256, AdamW, constant peak lr "
        "1.28e-1 after 300 warm-up steps) with MoCo v3 on the full CIFAR-10 training split. On one CPU core it "
        "breaks in 2 of 2 seeds: the representation collapses early, then a storm of >=10x gradient spikes "
        "spreads through the network and the fresh-bank kNN falls without recovering (docs/findings.md, "
        "\"R1, hotter\"). `data_samples/runs/findings/r1_lr_hot/` holds both seeds, 3,000 steps each, and the "
        "cooler 6.4e-2 run beside them. The preset stops at 1,600 steps: by then the storm has reached every block "
        "and the fall has begun (13 and 16 noise units; 26 by step 3,000). This notebook finds "
        "the fall, counts the spikes under a named spike rule, asks which layer spiked first and whether the "
        "patch projection leads (the paper's claim), looks at the attention logits, and reads the replays of "
        "the storm's window with each mitigation."),
    new_code_cell(
        "%matplotlib inline\n"
        "from pathlib import Path\n\n"
        "import matplotlib.pyplot as plt\n"
        "import pandas as pd\n\n"
        "import stabilitylab as sl\n"
        "from analysis import (DEFAULT_RULE, SpikeRule, compare_runs, display_table, find_knn_dips, find_spikes,\n"
        "                      spike_lead_lag)\n"
        "from stabilitylab import figures\n"
        "from stabilitylab.plots_probes import replay_comparisons\n\n"
        "root = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / 'data_samples' / 'runs').is_dir())\n"
        "sweep = sl.load_runs(root / 'data_samples' / 'runs' / 'findings' / 'r1_lr_hot')\n"
        "hot = [run for run in sweep if run.config_value('optim.base_lr') == 1.28e-1]\n"
        "run = hot[0]\n"
        "norms = run.grad_norms()  # wide: one column per layer group, in model order\n"
        "print(run.name, run.meta['status'], len(run.steps), 'steps;', ', '.join(norms.columns))"),
    new_markdown_cell(
        "## The kNN curve and its fall\n\n"
        "Two kNN monitors: the queue kNN every 50 steps (2,000 held-out queries against the MoCo queue) and the "
        "fresh-bank kNN every 100 steps (`val`: 10,000 training images embedded anew, 5,000 held-out queries). "
        "A dip is measured in units of each evaluation's binomial noise, and confirmed, or not, by the other "
        "source."),
    new_code_cell(
        "dips = pd.concat({r.name: find_knn_dips(r.knn) for r in hot}, names=['run', 'dip']).query(\"source == 'val'\")\n"
        "display(figures.knn_plot(hot, {name: d for name, d in dips.groupby('run')}))  # the fresh-bank dips shaded\n"
        "dips.reset_index('dip', drop=True)[['start_step', 'bottom_step', 'depth', 'depth_noise', 'recovered', 'confirmed']]"),
    new_markdown_cell(
        "For 1,200 steps the fresh-bank top-1 stays at the untrained network's level (29.2% and 27.5% at step -1, "
        "28-31% after): the representation collapsed within 100 steps. Then it falls. Seed 0 drops to 22.1% at "
        "step 1,299, climbs back to 25.7% and falls again, to 14.5% at its last evaluation (still falling); seed 1 "
        "drops to 19.2% by step 1,599 and ends at 16.6% (bottom 13.8%). Each fall is 26 noise units and never "
        "recovers: not the paper's dip, which does.\n\n"
        "## Spikes under a named rule\n\n"
        "A spike is whatever one `SpikeRule` says (docs/analysis.md). The default, `mad:6+ratio:3|ratio:10`, "
        "takes a value at least 6 robust sigmas and 3x above its causal running median, or any value 10x "
        "above it; `ratio:10` keeps only the paper-style 10x excursions. Both skip a layer's first 50 values. "
        "In this storm they agree but for one event: nearly every spike is 10x or more."),
    new_code_cell(
        "rules = {'default': SpikeRule.parse(DEFAULT_RULE), '>= 10x': SpikeRule.parse('ratio:10')}\n"
        "events = {name: find_spikes(norms, rule) for name, rule in rules.items()}\n"
        "pd.DataFrame({name: e.groupby('layer', observed=False).size() for name, e in events.items()})"),
    new_markdown_cell(
        "## Where the storm starts\n\n"
        "The paper sees spikes appear first in the patch projection and reach the last layers a few "
        "iterations later. Here is the first >=10x event of each layer, in both seeds:"),
    new_code_cell(
        "onsets = pd.DataFrame({r.name: find_spikes(r.grad_norms(), rules['>= 10x']).groupby('layer', observed=True)\n"
        "                       ['step'].min() for r in hot})\n"
        "onsets.sort_values(run.name).astype('Int64')"),
    new_markdown_cell(
        "The storm begins in the class token and the middle blocks (seed 0: the class token at step 1,152, blocks.4 "
        "two steps later; seed 1: blocks.5 at 1,057, after two early class-token events at 296 and 354). The patch "
        "projection joins mid-storm, 7th and 6th of 12 layers, 116 and 409 steps after the first. Figure 4 of the paper, the "
        "first layer against the last transformer block, each over its running median with the default rule's "
        "events marked:"),
    new_code_cell("figures.first_last_plot(norms, run.name)"),
    new_markdown_cell(
        "## Do first-layer spikes lead?\n\n"
        "Two questions, two p-values: *association* (do last-block spikes come within `max_lag` steps of "
        "first-layer spikes more often than under circular shifts of the first layer's train?) and "
        "*direction* (among the matched pairs, is the first layer first more often than a coin flip "
        "would be? an exact sign test). The verdict \"first leads\" needs direction p < 0.05."),
    new_code_cell(
        "lead = spike_lead_lag(norms, rule=rules['default'])\n"
        "print(lead.verdict)\n"
        "print(lead.summary)\n"
        "lead.per_layer.set_index('layer')[['n_first_events', 'n_layer_events', 'n_matched', 'n_first_leads',\n"
        "                                   'n_first_follows', 'median_lag', 'association_p', 'direction_p']]"),
    new_markdown_cell(
        "## The attention logits\n\n"
        "The attention probe logs each block's largest pre-softmax logit every 10 steps (docs/probes.md). "
        "Attention-entropy collapse, one of the later mechanisms, shows as a growing max logit. In the storm "
        "the largest logits grow from ~5 to 10^4-10^5 (the first block's to 5.5x10^5 at step 2,500). Other blocks "
        "end at a max logit of exactly 0 (every query-key product is 0: dead queries or keys, uniform attention), "
        "and blocks.6 falls to -19,115. The axis is symmetric-log, linear within +-1:"),
    new_code_cell(
        "max_logit = run.table('attention').pivot_table(index='step', columns='layer', values='max_logit', observed=True)\n"
        "fig, ax = plt.subplots(figsize=(7, 3.2))\n"
        "max_logit[['blocks.0', 'blocks.2', 'blocks.6', 'blocks.7']].plot(ax=ax, lw=1)\n"
        "ax.set_yscale('symlog', linthresh=1)\n"
        "ax.legend(ncol=4, fontsize=7)\n"
        "ax.set(xlabel='step', ylabel='max attention logit', title=run.name)\n"
        "plt.show()\n"
        "max_logit.loc[[0, 1000, 1200, 1500, 2500, 2990]].round(1)"),
    new_markdown_cell(
        "## The storm's window replayed: mitigations against a placebo\n\n"
        "`stabilitylab replay` reran steps 1,000-1,299 from the checkpoint after step 999, unchanged and once per "
        "change: a frozen patch projection, Adam beta2 0.95, half the lr, and a placebo (weight decay 0.1 -> "
        "0.099). Per replay: the largest gradient norm over its running median in steps 1,100-1,299 per layer, "
        "the spike events there, and the fresh-bank kNN at step 1,299. The unchanged replay is the original bit "
        "for bit. The placebo removes 29 of the 30 events and the kNN drop, as the frozen projection does, so one "
        "window of one seed cannot tell a mitigation from a perturbation; only half the lr keeps every layer "
        "under 10x."),
    new_code_cell(
        "[comparison] = replay_comparisons(run, rule=rules['default'])\n"
        "knn_1299 = comparison.knn.query(\"source == 'val' and step == 1299\").set_index('replay')['top1']\n"
        "comparison.ratios[['spikes', 'patch_embed', 'cls_token', 'blocks.0', 'blocks.4', 'blocks.7']].round(1).assign(\n"
        "    knn_top1_1299=(100 * knn_1299).round(1))"),
    new_markdown_cell(
        "## The runs side by side\n\n"
        "`compare_runs` gives one row per run (fractions); `display_table` shows it as `stabilitylab "
        "compare` does: top-1 and dip depth in percent, roughness in points, spike counts under the rule."),
    new_code_cell(
        "table = compare_runs(sweep, rule=rules['>= 10x'])\n"
        "display_table(table)[['run', 'final_top1', 'best_top1', 'n_dips', 'deepest_dip', 'roughness',\n"
        "                      'n_first_layer_spikes', 'n_spikes', 'first_peak_ratio', 'last_peak_ratio']]"),
]


def build() -> nbformat.NotebookNode:
    notebook = new_notebook(cells=CELLS, metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}})
    NotebookClient(notebook, timeout=300, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(HERE)}}).execute()
    return notebook


if __name__ == "__main__":
    nbformat.write(build(), HERE / "analysis.ipynb")
