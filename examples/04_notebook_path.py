# %% [markdown]
# # The notebook path: your own facts, two locators, their verdicts, saved, reloaded and drawn
# No CLI: plain dicts in, `ql.locate` with two methods, `ql.evaluate` of each, `save`/`load`, a report with the
# evaluation table, and the run's model reloaded from the run alone. `python examples/04_notebook_path.py`
# (SmolLM2, offline), or cell by cell. `QRNCA_EXAMPLE_MODEL` (embedded name or checkpoint directory),
# `QRNCA_EXAMPLE_DTYPE` (e.g. `bfloat16`), `QRNCA_EXAMPLE_RUN` (default `runs/notebook`).

# %%
import os
from pathlib import Path

import torch

import qrnca_lens as ql

model_name = os.environ.get("QRNCA_EXAMPLE_MODEL", "smollm2")
dtype = getattr(torch, os.environ.get("QRNCA_EXAMPLE_DTYPE", "float32"))
root = Path(os.environ.get("QRNCA_EXAMPLE_RUN", "runs/notebook"))
model = ql.load_model(model_name, dtype=dtype)

# Queries as a notebook holds them: plain dicts (a pandas DataFrame with these columns works the same way).
facts = [
    {"id": "fr", "group": "capital", "question": "The capital city of France is", "answer": "Paris"},
    {"id": "it", "group": "capital", "question": "The capital city of Italy is", "answer": "Rome"},
    {"id": "jp", "group": "capital", "question": "The capital city of Japan is", "answer": "Tokyo"},
    {"id": "br", "group": "language", "question": "The main language spoken in Brazil is", "answer": "Portuguese"},
    {"id": "de", "group": "language", "question": "The main language spoken in Germany is", "answer": "German"},
    {"id": "mx", "group": "language", "question": "The main language spoken in Mexico is", "answer": "Spanish"},
]
proxy = ql.ProxyConfig("cloze", n_prompts=2, n_shots=2)   # in-context examples drawn from the other facts
print(ql.accuracy(model, facts, proxy, progress=False))   # competence first: does the model know them?

# %% Two locators through the one shape: QRNCA (IG, clusters, ICA) and attribution patching
cfg = ql.LocateConfig(proxy=proxy, ig=ql.IGConfig(steps=8))
qrnca = ql.locate(model, facts, cfg, out=root / "qrnca")
atp = ql.locate(model, facts, ql.RankConfig(proxy=proxy, top_k=20), method="atp", out=root / "atp")
print(qrnca.qr_neurons("fr")[:5], atp.qr_neurons("fr")[:5])

# %% Each judged by the same metrics; each verdict lands in its run directory as evaluation.json
quick = dict(n_boot=200, free_form=False, neuron_prediction=False)
res_qrnca = ql.evaluate(model, qrnca, cfg=ql.EvalConfig(methods=("qrnca", "atp", "random"), **quick))
res_atp = ql.evaluate(model, atp, cfg=ql.EvalConfig(budget=10, **quick))   # atp and random, 10 neurons each
print(res_qrnca.table())
print(res_atp.to_dataframe()[["method", "pcr_suppress", "pcr_suppress_lo", "pcr_suppress_hi", "mean_neurons"]])

# %% Saved results load back equal, and the report draws them with their evaluation table
again = ql.EvaluationResult.load(root / "atp")
assert again.table() == res_atp.table()
print("report:", ql.write_report(qrnca, model))

# %% A run alone is enough to start again: its model (embedded or checkpoint) in its dtype, its queries
run = ql.LocateResult.load(root / "qrnca")
reloaded = ql.load_model(run.model)
print(run.model, next(reloaded.parameters()).dtype, [q.id for q in run.stored_queries()])
