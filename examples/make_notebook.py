"""Regenerate examples/analysis.ipynb (outputs stripped) from the cells below."""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell(
        "# Analysing MoCo v3 stability runs\n\n"
        "The sample runs in `data_samples/runs/` were trained by `stabilitylab train` on the committed "
        "CIFAR-10 sample at a high learning rate, with a learned and a frozen random patch projection "
        "(see `data_samples/runs/README.md` for the commands). This notebook loads them, finds kNN dips, "
        "compares the first and last layer's gradient norms (the paper's Figure 4 form), tests whether "
        "first-layer spikes lead, and puts the runs side by side."),
    new_code_cell(
        "from pathlib import Path\n\n"
        "import stabilitylab as sl\n"
        "from stabilitylab import plots\n"
        "from analysis import compare_runs, find_knn_dips, find_spikes, spike_lead_lag\n\n"
        "root = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / 'data_samples' / 'runs').is_dir())\n"
        "runs = sl.load_runs(root / 'data_samples' / 'runs')\n"
        "runs"),
    new_markdown_cell("## kNN curve and its dips\n\nDips are measured against the evaluation's own "
                      "binomial noise; with both `queue` and `val` rows each dip is marked confirmed or not "
                      "by the other source."),
    new_code_cell(
        "run = next(r for r in runs if r.config_value('model.patch_proj') == 'learned')\n"
        "dips = find_knn_dips(run.knn)\n"
        "plots.knn_figure(run.knn, dips=dips).show()\n"
        "dips"),
    new_markdown_cell("## First vs last layer gradient norms (relative to each layer's median)"),
    new_code_cell(
        "norms = run.grad_norms()\n"
        "spikes = find_spikes(norms)\n"
        "plots.relative_grad_figure(norms, layers=[norms.columns[0], norms.columns[-1]], spikes=spikes).show()\n"
        "spikes.groupby('layer', observed=False).size()"),
    new_markdown_cell("## Do first-layer spikes lead?"),
    new_code_cell(
        "lead = spike_lead_lag(norms)\n"
        "print(lead.summary)\n"
        "lead.per_layer"),
    new_markdown_cell("## The runs side by side"),
    new_code_cell(
        "plots.overlay_knn(runs).show()\n"
        "compare_runs(runs)"),
]

if __name__ == "__main__":
    notebook = new_notebook(cells=CELLS, metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(notebook, Path(__file__).with_name("analysis.ipynb"))
