# %% [markdown]
# # Locate the neurons behind a fact, then boost and suppress them
# Runs on the embedded SmolLM2 (offline). `python examples/01_locate_and_intervene.py`, or cell by cell.
# The run is saved to `runs/example` for example 02. Another model, run directory or size:
# `QRNCA_EXAMPLE_MODEL=gemma3-270m` (or a local checkpoint directory), `QRNCA_EXAMPLE_RUN=DIR`,
# `QRNCA_EXAMPLE_LIMIT=N` (queries per relation, default 3).

# %%
import os

import torch

import qrnca_lens as ql
from qrnca_lens.data.queries import limit_per_group

model_name = os.environ.get("QRNCA_EXAMPLE_MODEL", "smollm2")
run_dir = os.environ.get("QRNCA_EXAMPLE_RUN", "runs/example")
per_relation = int(os.environ.get("QRNCA_EXAMPLE_LIMIT", "3"))

model = ql.load_model(model_name)                     # a TransformerLens TransformerBridge
pool = ql.load_data("builtin:facts")                  # 5 relations x 20 cloze facts
queries = limit_per_group(pool, per_relation)         # 3 queries per relation by default: 15 over 5 relations
proxy = ql.ProxyConfig("cloze")                       # 3 templates, 4 in-context facts each

# Competence first: attributing a proxy the model cannot do measures noise.
print(ql.accuracy(model, queries, proxy, pool=pool))

# %% QRNCA over the collection (ICA and common neurons need several queries), stored in run_dir
run = ql.locate(model, queries, ql.LocateConfig(proxy=proxy), pool=pool, out=run_dir, data="builtin:facts")
print(run)
print(run.to_dataframe().head(10))

# %% Boost and suppress one query's QR neurons on the very prompt the run attributed
query = queries[0]
prompt = run.stored_prompts([query.id])[query.id][0]
neurons = [(layer, n) for layer, n, _ in run.qr_neurons(query.id)]
tokens = torch.tensor([prompt.tokens])
first = prompt.target[0]


def p_first(logits):
    return torch.softmax(logits[0, -1], -1)[first].item()


with torch.no_grad():
    clean = p_first(model(tokens))
    with ql.boost(model, neurons):                    # f_i <- 2 f_i at the last position
        boosted = p_first(model(tokens))
    with ql.suppress(model, neurons):                 # f_i <- 0
        suppressed = p_first(model(tokens))
print(f"{query.question!r} -> {query.answer!r}: p = {clean:.3f}, boosted {boosted:.3f}, suppressed {suppressed:.3f}")
