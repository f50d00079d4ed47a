# %% [markdown]
# # Prove the neurons against baselines, then map them
# Reads the run of example 01 (`runs/example`), or any run directory: `python examples/02_prove_and_map.py DIR`
# (or `QRNCA_EXAMPLE_RUN=DIR`). Everything comes from the run itself: its model, dtype and stored prompts.

# %%
import os
import sys

import qrnca_lens as ql
from qrnca_lens.render import analysis

run_dir = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("QRNCA_EXAMPLE_RUN", "runs/example")
run = ql.LocateResult.load(run_dir)                   # scores, clusters and QR neurons from the run store
model = ql.load_model(run.model)                      # the run's model (embedded or its checkpoint), in its dtype
queries = run.stored_queries()                        # the queries as attributed (the data file may have changed)

# %% Every locator's neurons judged by the same metrics (PCR vs unrelated queries, editing, free-form)
res = ql.evaluate(model, run, queries, cfg=ql.EvalConfig(methods=("qrnca", "activation", "random", "logprob")))
print(res.table())

# %% Maps: overlap between groups, where the neurons live, what the common neurons write
doc = run.neurons_json()
groups, overlap = analysis.overlap_matrix(doc)
print(groups)
print(overlap.round(3))
print(analysis.layer_distribution(doc, model.cfg.n_layers))

# %% The offline report (figures, projections, circuitsvis views), on the prompts the run stored
print("report:", ql.write_report(run_dir, model))
