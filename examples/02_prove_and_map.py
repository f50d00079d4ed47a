# %% [markdown]
# # Prove the neurons against baselines, then map them
# `qrnca-lens locate ... --out runs/facts` first (or run example 01 with `out=`); this reuses that run.

# %%
import sys

import qrnca_lens as ql
from qrnca_lens import analysis

run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/facts"
run = ql.LocateResult.load(run_dir)                   # scores, clusters and QR neurons from the run store
model = ql.load_model(run.model)
pool = ql.load_data(run.data)
queries = [q for q in pool if q.id in run.groups]

# %% Every locator's neurons judged by the same metrics (PCR vs unrelated queries, editing, free-form)
res = ql.evaluate(model, run, queries, pool, ql.EvalConfig(methods=("qrnca", "activation", "random", "logprob")))
print(res.table())

# %% Maps: overlap between groups, where the neurons live, what the common neurons write
doc = run.neurons_json()
groups, overlap = analysis.overlap_matrix(doc)
print(groups)
print(overlap.round(3))
print(analysis.layer_distribution(doc, model.cfg.n_layers))

# %% The offline report (figures, projections, the table above if saved, circuitsvis views)
ql.write_report(run_dir, model, queries=queries, pool=pool)
